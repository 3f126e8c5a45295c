"""sa.select.topk against a brute-force selection (dense scores, lexicographic sort)."""

import contextlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import sparseattn as sa
from sparseattn import config
from conftest import tolerance


def brute_topk(q, k, top_k, causal=False, allowed=None):
    """Dense oracle: per (head, query) the top_k allowed keys by float64 score, ties to lower key."""
    hq, nq, _ = q.shape
    hkv, nk, _ = k.shape
    g = hq // hkv
    scores = np.einsum("hqd,hkd->hqk", q.astype(np.float64), np.repeat(k.astype(np.float64), g, 0))
    ok = np.ones((hq, nq, nk), bool) if allowed is None else np.broadcast_to(allowed, (hq, nq, nk)).copy()
    if causal:
        ok &= np.arange(nk)[None, :] <= np.arange(nq)[:, None] + nk - nq
    key = np.where(ok, scores, -np.inf)
    # lexsort: last key is primary -> by score descending, then by index ascending
    idx = np.broadcast_to(np.arange(nk), key.shape)
    order = np.lexsort((idx, -key), axis=-1)
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(nk)[None, None, :].repeat(nq, 1).repeat(hq, 0), -1)
    return ok & (rank < top_k), scores, ok


@contextlib.contextmanager
def topk_tiles(bq, bk):
    old = config.TOPK_BLOCK_SIZE
    config.TOPK_BLOCK_SIZE = (bq, bk)
    try:
        yield
    finally:
        config.TOPK_BLOCK_SIZE = old


@st.composite
def problems(draw):
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    hkv = draw(st.integers(1, 2))
    hq = hkv * draw(st.integers(1, 3))
    nq = draw(st.integers(1, 60))
    nk = draw(st.integers(1, 90))
    d = draw(st.sampled_from([1, 3, 8]))
    top_k = draw(st.sampled_from([1, 2, 5, 17, 64, 100]))
    causal = draw(st.booleans())
    ints = draw(st.booleans())  # small integers: exact scores and many ties
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    if ints:
        q = rng.integers(-2, 3, (hq, nq, d)).astype(dtype)
        k = rng.integers(-2, 3, (hkv, nk, d)).astype(dtype)
    else:
        q = rng.standard_normal((hq, nq, d)).astype(dtype)
        k = rng.standard_normal((hkv, nk, d)).astype(dtype)
    tiles = draw(st.tuples(st.integers(1, 9), st.integers(1, 40)))
    return q, k, top_k, causal, ints, tiles, rng


def check_selection(lay, q, k, top_k, causal, allowed, exact):
    want, scores, ok = brute_topk(q, k, top_k, causal, allowed)
    got = lay.to_dense()
    assert lay.heads == q.shape[0] and lay.shape == (q.shape[1], k.shape[1])
    np.testing.assert_array_equal(got.sum(-1), want.sum(-1))  # min(top_k, candidates) per row
    assert not np.any(got & ~ok)  # only allowed keys
    if exact:
        np.testing.assert_array_equal(got, want)
    else:  # float32 rounding may swap keys whose scores are within rounding of each other
        tol = 1e-5 * (1 + np.abs(scores).max(initial=0))
        lo = np.where(got, scores, np.inf).min(-1)
        hi = np.where(ok & ~got, scores, -np.inf).max(-1)
        assert np.all(lo >= hi - tol)


@given(problems())
@settings(max_examples=30)
def test_topk_matches_brute_force(p):
    q, k, top_k, causal, ints, tiles, _ = p
    with topk_tiles(*tiles):
        lay = sa.select.topk(q, k, top_k, causal=causal)
    check_selection(lay, q, k, top_k, causal, None, exact=ints or q.dtype == np.float64)


@given(problems(), st.sampled_from(["shared", "per_head", "block"]), st.sampled_from([0.0, 0.2, 0.7]))
@settings(max_examples=30)
def test_topk_within_matches_brute_force(p, kind, density):
    q, k, top_k, causal, ints, _, rng = p
    hq, nq, nk = q.shape[0], q.shape[1], k.shape[1]
    mask = rng.random((1 if kind != "per_head" else hq, nq, nk)) < density
    within = sa.CSRLayout.from_dense(mask)
    if kind == "block":
        within = within.to_block((3, 4))
    lay = sa.select.topk(q, k, top_k, within=within, causal=causal)
    check_selection(lay, q, k, top_k, causal, mask, exact=ints or q.dtype == np.float64)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("causal", [False, True])
def test_topk_several_tiles(dtype, causal):
    """Default tiles: several query blocks and key blocks, buffer cut back many times."""
    rng = np.random.default_rng(7)
    q = rng.integers(-3, 4, (3, 300, 8)).astype(dtype)
    k = rng.integers(-3, 4, (1, 700, 8)).astype(dtype)
    for top_k in (1, 9, 64, 700):
        lay = sa.select.topk(q, k, top_k, causal=causal)
        check_selection(lay, q, k, top_k, causal, None, exact=True)


@pytest.mark.parametrize("causal", [False, True])
def test_ties_go_to_lower_keys(causal):
    q = np.ones((2, 10, 4), np.float32)
    k = np.ones((1, 30, 4), np.float32)  # every score equal
    lay = sa.select.topk(q, k, 3, causal=causal)
    for h in range(2):
        for i in range(10):
            np.testing.assert_array_equal(lay.indices[lay.indptr[h * 10 + i]: lay.indptr[h * 10 + i + 1]],
                                          [0, 1, 2])


def test_query_longer_than_keys_causal_has_empty_rows():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 12, 4))
    k = rng.standard_normal((1, 5, 4))
    lay = sa.select.topk(q, k, 2, causal=True)
    # bottom-right alignment: query i sees keys j <= i - 7
    np.testing.assert_array_equal(lay.row_lengths[0], np.clip(np.arange(12) - 6, 0, 2))


def test_float16_and_batch_one_and_lists():
    rng = np.random.default_rng(1)
    q = rng.integers(-2, 3, (1, 2, 20, 4)).astype(np.float16)
    k = rng.integers(-2, 3, (1, 1, 25, 4)).astype(np.float16)
    lay = sa.select.topk(q, k, 4)
    check_selection(lay, q[0].astype(np.float32), k[0].astype(np.float32), 4, False, None, True)
    assert sa.select.topk(q[0].tolist(), k[0].tolist(), 4) == lay


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_feeds_attention_and_matches_reference(dtype):
    rng = np.random.default_rng(3)
    q = rng.standard_normal((4, 50, 8)).astype(dtype)
    k = rng.standard_normal((2, 70, 8)).astype(dtype)
    v = rng.standard_normal((2, 70, 5)).astype(dtype)
    lay = sa.select.topk(q, k, 6, causal=True)
    sinks = sa.CSRLayout.from_dense(np.broadcast_to(np.arange(70) < 2, (50, 70)))
    for layout in (lay, lay | sinks, lay & sinks):
        out = sa.attention(q, k, v, layout, backend="cpu")
        ref = sa.attention(q, k, v, layout, backend="reference")
        tol = tolerance(dtype) * 10
        np.testing.assert_allclose(out, ref, rtol=tol, atol=tol)
    assert (lay | sinks).nnz >= lay.nnz >= (lay & sinks).nnz


def test_within_accepts_a_pattern():
    patterns = pytest.importorskip("sparseattn.patterns")
    if not hasattr(patterns, "sliding_window"):
        pytest.skip("patterns.sliding_window not available yet")
    rng = np.random.default_rng(4)
    q = rng.standard_normal((2, 40, 8))
    k = rng.standard_normal((2, 40, 8))
    pat = patterns.sliding_window(8, causal=True)
    lay = sa.select.topk(q, k, 3, within=pat)
    allowed = pat.layout(40, 40, heads=2).to_csr().to_dense()
    check_selection(lay, q, k, 3, False, allowed, exact=True)


def test_deterministic():
    rng = np.random.default_rng(5)
    q = rng.standard_normal((2, 200, 16), dtype=np.float32)
    k = rng.standard_normal((2, 300, 16), dtype=np.float32)
    a, b = sa.select.topk(q, k, 10), sa.select.topk(q, k, 10)
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_array_equal(a.indptr, b.indptr)


def test_bad_input():
    q = np.zeros((2, 5, 4))
    k = np.zeros((1, 6, 4))
    with pytest.raises(ValueError, match="top_k"):
        sa.select.topk(q, k, 0)
    with pytest.raises(TypeError, match="top_k"):
        sa.select.topk(q, k, 2.5)
    with pytest.raises(TypeError, match="causal"):
        sa.select.topk(q, k, 2, causal="yes")
    with pytest.raises(ValueError, match="batch"):
        sa.select.topk(np.zeros((2, 2, 5, 4)), k, 2)
    with pytest.raises(ValueError, match="multiple"):
        sa.select.topk(np.zeros((3, 5, 4)), np.zeros((2, 6, 4)), 2)
    with pytest.raises(ValueError, match="last dimension"):
        sa.select.topk(q, np.zeros((1, 6, 3)), 2)
    bad = q.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="finite"):
        sa.select.topk(bad, k, 2)
    with pytest.raises(ValueError, match="within"):
        sa.select.topk(q, k, 2, within=sa.CSRLayout.from_dense(np.ones((5, 7), bool)))
    with pytest.raises(TypeError, match="within"):
        sa.select.topk(q, k, 2, within="window")
    with pytest.raises(TypeError, match="float"):
        sa.select.topk(q.astype(np.int64), k, 2)
    with pytest.raises(ValueError, match="overflow"):
        sa.select.topk(np.full((1, 3, 4), 1e20, np.float32), np.full((1, 3, 4), 1e20, np.float32), 2)


def test_empty_inputs():
    lay = sa.select.topk(np.zeros((2, 0, 4)), np.zeros((1, 5, 4)), 3)
    assert lay.shape == (0, 5) and lay.nnz == 0
    lay = sa.select.topk(np.zeros((2, 3, 4)), np.zeros((1, 0, 4)), 3)
    assert lay.shape == (3, 0) and lay.nnz == 0


def test_huge_top_k_is_clamped():
    rng = np.random.default_rng(9)
    q = rng.standard_normal((2, 7, 4))
    k = rng.standard_normal((1, 9, 4))
    assert sa.select.topk(q, k, 10**12) == sa.select.topk(q, k, 9)
    assert sa.select.topk(q, k, 10**12).nnz == 2 * 7 * 9
