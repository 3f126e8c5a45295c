"""Backend registry, selection order and the helpful error for a missing GPU stack."""

import numpy as np
import pytest

import sparseattn as sa


def test_available_lists_host_backends():
    names = sa.backends.available()
    assert "cpu" in names and "reference" in names


def test_selection_order(monkeypatch):
    assert sa.backends.resolve().name == "cpu"
    monkeypatch.setenv("SPARSEATTN_BACKEND", "reference")
    assert sa.backends.resolve().name == "reference"
    with sa.use_backend("cpu"):
        assert sa.backends.resolve().name == "cpu"  # context beats environment
        assert sa.backends.resolve("reference").name == "reference"  # argument beats context
    assert sa.backends.resolve().name == "reference"


def test_use_backend_runs_calls(rng):
    q = rng.standard_normal((1, 6, 4))
    lay = sa.CSRLayout.from_dense(np.ones((6, 6), bool))
    with sa.use_backend("reference"):
        a = sa.attention(q, q, q, lay)
    np.testing.assert_allclose(a, sa.attention(q, q, q, lay), atol=1e-12)


def test_unknown_backend_messages(monkeypatch):
    with pytest.raises(ValueError, match="unknown backend"):
        sa.backends.get("tpu")
    monkeypatch.setenv("SPARSEATTN_BACKEND", "nope")
    with pytest.raises(ValueError, match="nope"):
        sa.backends.resolve()
    with pytest.raises(TypeError):
        sa.backends.get(3)


def test_cuda_unavailable_says_why():
    if "cuda" in sa.backends.available():
        pytest.skip("a GPU is usable here")
    reason = sa.backends.why_unavailable("cuda")
    assert reason
    with pytest.raises(sa.backends.BackendUnavailable):
        sa.backends.get("cuda")


def test_cpu_prefetch_heuristic_tells_scattered_rows_from_local_ones():
    """Only rows that mostly jump take the prefetching token kernel (a speed choice: both give
    the same results, which the tests above check on every kind of layout)."""
    from sparseattn.backends.cpu._prefetch import scattered as _scattered

    rng = np.random.default_rng(0)
    n = 2048
    scattered = np.sort(rng.choice(n, (n, 32)), axis=1)
    rand = sa.CSRLayout(np.arange(0, n * 32 + 1, 32), scattered.reshape(-1), (n, n), check=False)
    assert _scattered(sa.CSRLayout.from_dense(rand.to_dense()))
    assert not _scattered(sa.patterns.sliding_window(64).layout(n))
    assert not _scattered(sa.patterns.strided(128).layout(n))  # mostly its local window
    empty = np.zeros((1, 6, 50), bool)
    empty[0, 0, [1, 30]] = True  # trailing empty rows
    assert not _scattered(sa.CSRLayout.from_dense(np.zeros((1, 4, 4), bool)))
    _scattered(sa.CSRLayout.from_dense(empty))
