"""The selectors on the GPU (``sa.select.topk``, ``lsh``, ``routing`` with ``backend="cuda"``)
against the CPU backend, at moderate sizes; skipped where ``cuda`` is not available.

The kernels themselves also run under the CUDA simulator in CI (``tests/_cuda_sim_cases.py``).
Exact agreement is required wherever the scores are exact in any summation order (integer-valued
inputs: many exact ties, so the tie rule is checked too) and for every step fed the same inputs
(buckets, labels); with float inputs a score computed in another order may round differently, so
only near-ties (checked in float64) may be ranked differently.
"""

import numpy as np
import pytest

import sparseattn as sa

gpu = pytest.mark.skipif("cuda" not in sa.backends.available(), reason="no usable CUDA GPU here")
pytestmark = [gpu, pytest.mark.gpu]

N, HQ, HKV, D = 2048, 4, 2, 64


@pytest.fixture(params=["fast", "numba"])
def path(request, monkeypatch):
    """Both GPU paths of the selectors: the CuPy one (config.CUDA_SELECT_FAST, the default) and
    the Numba-CUDA kernels (the simulator's path, kept as the fallback)."""
    monkeypatch.setattr(sa.config, "CUDA_SELECT_FAST", request.param == "fast")
    return request.param


def _cp():
    import cupy

    return cupy


def _same(got, want):
    assert got.shape == want.shape and got.heads == want.heads
    np.testing.assert_array_equal(got.indptr, want.indptr)
    np.testing.assert_array_equal(got.indices, want.indices)


def _qk(rng, dtype, integer, nq=N, nk=N):
    if integer:  # |q . k| <= 4 * D: exact in float32, ties everywhere
        return (rng.integers(-2, 3, (HQ, nq, D)).astype(dtype),
                rng.integers(-2, 3, (HKV, nk, D)).astype(dtype))
    return (rng.standard_normal((HQ, nq, D)).astype(dtype),
            rng.standard_normal((HKV, nk, D)).astype(dtype))


def _check_near_ties(q, k, got, want, rtol):
    """Rows may differ only by keys whose float64 scores are within rounding of the row's cut."""
    group = q.shape[0] // k.shape[0]
    nq = q.shape[1]
    np.testing.assert_array_equal(got.indptr, want.indptr)  # row lengths never depend on scores
    for row in range(got.indptr.shape[0] - 1):
        a = got.indices[got.indptr[row]:got.indptr[row + 1]]
        b = want.indices[want.indptr[row]:want.indptr[row + 1]]
        if np.array_equal(a, b):
            continue
        h, i = divmod(row, nq)
        s = k[h // group].astype(np.float64) @ q[h, i].astype(np.float64)
        diff = np.setxor1d(a, b)
        cut = min(s[a].min(), s[b].min())
        scale = np.abs(q[h, i]).astype(np.float64) @ np.abs(k[h // group]).astype(np.float64).T
        assert np.all(np.abs(s[diff] - cut) <= rtol * scale[diff] + 1e-30), (row, diff)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("integer", [True, False])
def test_topk(dtype, causal, integer, path):
    cp = _cp()
    rng = np.random.default_rng(1)
    q, k = _qk(rng, dtype, integer)
    got = sa.select.topk(cp.asarray(q), cp.asarray(k), 32, causal=causal, backend="cuda")
    want = sa.select.topk(q, k, 32, causal=causal, backend="cpu")
    if integer or dtype == np.float64:
        _same(got, want)
    else:
        _check_near_ties(q, k, got, want, rtol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("causal", [False, True])
def test_topk_within_pattern(dtype, causal):
    cp = _cp()
    rng = np.random.default_rng(2)
    q, k = _qk(rng, dtype, True, nq=N - 100)  # Nq < Nk: the causal diagonal is offset
    within = sa.patterns.sliding_window(256, causal=False) | sa.patterns.dilated(7)
    got = sa.select.topk(cp.asarray(q), cp.asarray(k), 48, within=within, causal=causal,
                         backend="cuda")
    _same(got, sa.select.topk(q, k, 48, within=within, causal=causal, backend="cpu"))


def test_topk_large_k_and_result_feeds_attention(path):
    """top_k above the causal key count of early rows; the layout's device copy is cached."""
    cp = _cp()
    from sparseattn.backends.cuda._device import device_layout

    rng = np.random.default_rng(3)
    q, k = _qk(rng, np.float32, True, nq=700, nk=700)
    got = sa.select.topk(cp.asarray(q), cp.asarray(k), 300, causal=True, backend="cuda")
    _same(got, sa.select.topk(q, k, 300, causal=True, backend="cpu"))
    dev = device_layout(got)  # left in the cache by the selector: no copy
    np.testing.assert_array_equal(cp.asnumpy(dev["indices"]), got.indices)
    v = rng.standard_normal((HKV, 700, D)).astype(np.float32)
    out = sa.attention(cp.asarray(q), cp.asarray(k), cp.asarray(v), got, backend="cuda")
    ref = sa.attention(q, k, v, got, backend="cpu")
    np.testing.assert_allclose(cp.asnumpy(out), ref, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("causal", [False, True])
def test_lsh_float64_end_to_end(causal, path):
    cp = _cp()
    rng = np.random.default_rng(4)
    q, k = _qk(rng, np.float64, False)
    got = sa.select.lsh(cp.asarray(q), cp.asarray(k), n_hashes=4, bucket_size=64, seed=5,
                        causal=causal, backend="cuda")
    _same(got, sa.select.lsh(q, k, n_hashes=4, bucket_size=64, seed=5, causal=causal,
                             backend="cpu"))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("bucket_size", [32, 700])
def test_lsh_hooks_float32(causal, bucket_size, path):
    """Hashes agree but for near-ties; from the same buckets the layouts are identical (the rows
    of bucket_size 700 are sorted in global memory: longer than config.CUDA_SELECT_SORT_CAP)."""
    cp = _cp()
    from sparseattn.select._common import unit_rows
    from sparseattn.select.lsh import default_n_buckets, lsh_rotations

    cpu, gpu_be = sa.backends.get("cpu"), sa.backends.get("cuda")
    rng = np.random.default_rng(6)
    q, k = (unit_rows(np, x) for x in _qk(rng, np.float32, False))
    nb = default_n_buckets(N, bucket_size)
    rot = lsh_rotations(3, D, nb, seed=1, dtype=np.float32)
    qb = cp.asnumpy(gpu_be.lsh_hash(cp.asarray(q), cp.asarray(rot)))
    assert np.mean(qb != cpu.lsh_hash(q, rot)) < 1e-3
    kb = cpu.lsh_hash(k, rot)
    got = gpu_be.lsh_select(cp.asarray(cpu.lsh_hash(q, rot)), cp.asarray(kb), nb, bucket_size, causal)
    _same(got, cpu.lsh_select(cpu.lsh_hash(q, rot), kb, nb, bucket_size, causal))


@pytest.mark.parametrize("causal", [False, True])
def test_routing_float64_end_to_end(causal, path):
    cp = _cp()
    rng = np.random.default_rng(7)
    q, k = _qk(rng, np.float64, False)
    got, cg = sa.select.routing(cp.asarray(q), cp.asarray(k), 45, seed=2, causal=causal,
                                return_centroids=True, backend="cuda")
    want, cw = sa.select.routing(q, k, 45, seed=2, causal=causal, return_centroids=True,
                                 backend="cpu")
    np.testing.assert_allclose(cg, cw, rtol=1e-12, atol=1e-13)
    _same(got, want)


@pytest.mark.parametrize("causal", [False, True])
def test_routing_hooks_float32(causal, path):
    """Assignment agrees but for near-ties, the update to rounding; from the same labels and
    similarities (rounded: ties) the capped routing layouts are identical."""
    cp = _cp()
    from sparseattn.select._common import unit_rows

    cpu, gpu_be = sa.backends.get("cpu"), sa.backends.get("cuda")
    rng = np.random.default_rng(8)
    q, k = (unit_rows(np, x) for x in _qk(rng, np.float32, False))
    cent = unit_rows(np, rng.standard_normal((HQ, 40, D)).astype(np.float32))
    kl, ks = gpu_be.kmeans_assign(cp.asarray(k), cp.asarray(cent))
    rl, rs = cpu.kmeans_assign(k, cent)
    assert np.mean(cp.asnumpy(kl) != rl) < 1e-3
    np.testing.assert_allclose(cp.asnumpy(ks), rs, atol=1e-5)
    ql, _ = cpu.kmeans_assign(q, cent)
    new = gpu_be.kmeans_update(cp.asarray(q), cp.asarray(k), cp.asarray(ql), cp.asarray(rl),
                               cp.asarray(cent))
    np.testing.assert_allclose(cp.asnumpy(new), cpu.kmeans_update(q, k, ql, rl, cent), atol=1e-6)
    rs = np.round(rs * 8).astype(np.float32)
    cap = 2 * N // 40
    got = gpu_be.routing_select(cp.asarray(ql), cp.asarray(rl), cp.asarray(rs), 40, cap, causal)
    _same(got, cpu.routing_select(ql, rl, rs, 40, cap, causal))


def test_selection_follows_the_current_stream(path):
    cp = _cp()
    rng = np.random.default_rng(9)
    q, k = _qk(rng, np.float32, True, nq=300, nk=300)
    want = sa.select.topk(q, k, 16, backend="cpu")
    with cp.cuda.Stream(non_blocking=True):
        got = sa.select.topk(cp.asarray(q), cp.asarray(k), 16, backend="cuda")
    _same(got, want)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("nq, nk", [(600, 900), (900, 600), (777, 777)])
def test_topk_fast_tiles_and_global_rows(monkeypatch, dtype, nq, nk):
    """The fast top-k over many small score tiles (causal tiles end at their last key, Nq != Nk
    offsets the diagonal) and with rows read from global memory rather than shared: the same
    layout as the CPU's, ties included; GQA 4 / 2 heads."""
    cp = _cp()
    rng = np.random.default_rng(10)
    q, k = _qk(rng, dtype, True, nq=nq, nk=nk)
    for causal in (False, True):
        want = sa.select.topk(q, k, 40, causal=causal, backend="cpu")
        for score_bytes, smem in ((HQ * nk * 8 * 37, 96 * 1024), (2**28, 0)):
            monkeypatch.setattr(sa.config, "CUDA_TOPK_SCORE_BYTES", score_bytes)
            monkeypatch.setattr(sa.config, "CUDA_SELECT_SMEM_BYTES", smem)
            got = sa.select.topk(cp.asarray(q), cp.asarray(k), 40, causal=causal, backend="cuda")
            _same(got, want)


def test_group_sort_fast():
    """The CUB grouping: stable order, group starts and the inverse permutation."""
    cp = _cp()
    from sparseattn.backends.cuda._select_fast import group_sort

    rng = np.random.default_rng(11)
    labels = rng.integers(0, 7, (5, 1000)).astype(np.int32)
    order, start, inv = (cp.asnumpy(x) for x in group_sort(cp.asarray(labels), 7))
    for a in range(5):
        np.testing.assert_array_equal(order[a], np.argsort(labels[a], kind="stable"))
        np.testing.assert_array_equal(start[a], np.r_[0, np.cumsum(np.bincount(labels[a], minlength=7))])
        np.testing.assert_array_equal(order[a, inv[a]], np.arange(1000))
