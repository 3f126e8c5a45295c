"""sparseattn.analysis: exact receptive field (vs brute-force boolean matrix powers), costs, tables."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import sparseattn as sa
from sparseattn import analysis
from sparseattn.layout import BlockCSRLayout, CSRLayout


def _window_mask(n, w):
    i = np.arange(n)[:, None]
    j = np.arange(n)[None, :]
    return (j <= i) & (i - j < w)


def _brute_reach(masks, residual=True):
    """Positions reaching each token after each layer, by dense boolean products (tests only)."""
    n = masks[0].shape[-1]
    p = np.eye(n, dtype=np.int64)
    out = []
    for m in masks:
        a = m.any(axis=0) if m.ndim == 3 else m
        if residual:
            a = a | np.eye(n, dtype=bool)
        p = ((a.astype(np.int64) @ p) > 0).astype(np.int64)
        out.append(p.sum(axis=1))
    return np.array(out)


def test_window_reach_grows_linearly():
    lay = CSRLayout.from_dense(_window_mask(300, 8))
    assert analysis.receptive_field(lay, 300, layers=4).tolist() == [8, 15, 22, 29]
    assert analysis.receptive_field([lay] * 2, 300, reduce="min").tolist() == [1, 1]


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 90), layers=st.integers(1, 4), heads=st.integers(1, 3),
       density=st.floats(0.0, 0.3), residual=st.booleans(), seed=st.integers(0, 2**31))
def test_receptive_field_matches_brute_force(n, layers, heads, density, residual, seed):
    rng = np.random.default_rng(seed)
    masks = [rng.random((heads, n, n)) < density for _ in range(layers)]
    lays = [CSRLayout.from_dense(m) if i % 2 == 0 else BlockCSRLayout.from_dense(m, (7, 5))
            for i, m in enumerate(masks)]
    want = _brute_reach(masks, residual)
    got = analysis.receptive_field(lays, n, residual=residual, reduce=None)
    assert got.shape == (layers, n)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(analysis.receptive_field(lays, n, residual=residual), want.max(axis=1))
    np.testing.assert_allclose(analysis.receptive_field(lays, n, residual=residual, reduce="mean"),
                               want.mean(axis=1))


def test_receptive_field_spans_column_chunks(monkeypatch):
    # force several column chunks of 64 sources to check they add up exactly
    monkeypatch.setattr(analysis, "_REACH_CHUNK_ENTRIES", 64 * 200)
    rng = np.random.default_rng(1)
    masks = [rng.random((200, 200)) < 0.02 for _ in range(3)]
    got = analysis.receptive_field([CSRLayout.from_dense(m) for m in masks], 200, reduce=None)
    np.testing.assert_array_equal(got, _brute_reach(masks))


def test_receptive_field_patterns_and_global_tokens():
    pat = sa.patterns.sliding_window(16)
    assert analysis.receptive_field(pat, 512, layers=3).tolist() == [16, 31, 46]
    # a global token carries everything to everyone after two layers (where L*w fails)
    lf = sa.patterns.longformer(16, 1)
    assert analysis.receptive_field(lf, 512, layers=2).tolist()[-1] == 512
    plan = sa.patterns.LayerPlan.hybrid(4, dense_every=2, sparse=pat)
    r = analysis.receptive_field(plan, 256)
    assert r.tolist() == [16, 256, 256, 256]


def test_receptive_field_bad_input():
    lay = CSRLayout.from_dense(_window_mask(10, 2))
    with pytest.raises(ValueError, match="layers must be given"):
        analysis.receptive_field(lay, 10)
    with pytest.raises(ValueError, match="reduce"):
        analysis.receptive_field([lay], 10, reduce="median")
    with pytest.raises(ValueError, match=r"shape \(10, 10\), expected \(12, 12\)"):
        analysis.receptive_field([lay], 12)
    with pytest.raises(TypeError, match="plan_or_patterns"):
        analysis.receptive_field(3, 10)
    with pytest.raises(TypeError, match="layer 0"):
        analysis.receptive_field([3], 10)
    with pytest.raises(ValueError, match="n must be >= 1"):
        analysis.receptive_field([lay], 0)
    with pytest.raises(ValueError, match="does not match"):
        analysis.receptive_field([lay, lay], 10, layers=3)
    with pytest.raises(ValueError, match="no layer"):
        analysis.receptive_field([], 10)


def test_cost_and_compare():
    n = 1000
    c = analysis.cost(sa.patterns.sliding_window(100), n, heads=4, head_dim=32)
    nnz1 = sum(min(i + 1, 100) for i in range(n))
    assert c["nnz"] == 4 * nnz1
    assert c["density"] == pytest.approx(nnz1 / n**2)
    assert c["flops"] == 4 * nnz1 * 2 * (32 + 32)
    assert c["keys_per_query"] == pytest.approx(nnz1 / n)
    assert c["block_flops"] >= c["flops"] and c["blocks"] > 0 and c["bytes"] > 0
    c2 = analysis.cost(sa.patterns.sliding_window(100), n, block_size=None)
    assert c2["nnz"] == nnz1 and "blocks" not in c2
    rows = analysis.compare({"w100": sa.patterns.sliding_window(100), "dense": sa.patterns.dense()}, n)
    assert [r["name"] for r in rows] == ["w100", "dense"]
    assert rows[1]["density"] == 1.0
    text = analysis.format_table(rows, ["name", "nnz", "density"])
    assert "w100" in text and "1,000,000" in text and len(text.splitlines()) == 4
    with pytest.raises(ValueError, match="heads"):
        analysis.cost(sa.patterns.dense(), 10, heads=0)


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 70), heads=st.integers(1, 3), seed=st.integers(0, 2**31),
       bs=st.tuples(st.integers(1, 9), st.integers(1, 9)))
def test_mask_rows_matches_dense(n, heads, seed, bs):
    rng = np.random.default_rng(seed)
    mask = rng.random((heads, n, n + 3)) < 0.3
    rows = rng.integers(0, n, size=5)
    for lay in (CSRLayout.from_dense(mask), BlockCSRLayout.from_dense(mask, bs)):
        for h in range(heads):
            np.testing.assert_array_equal(analysis.mask_rows(lay, rows, h), mask[h][rows])
    with pytest.raises(ValueError, match="rows must lie"):
        analysis.mask_rows(CSRLayout.from_dense(mask), [n])


def test_loglog_slope():
    x = np.array([1024, 2048, 4096])
    assert analysis.loglog_slope(x, 3e-9 * x**2) == pytest.approx(2.0)
    assert analysis.loglog_slope(x, 5e-6 * x) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="positive"):
        analysis.loglog_slope([1, 2], [0, 1])
    with pytest.raises(ValueError, match="length >= 2"):
        analysis.loglog_slope([1], [1])
