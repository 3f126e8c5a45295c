"""Static patterns against independent brute-force definitions.

Each definition below is the pattern's formula evaluated on a tiny dense grid of positions
(``i`` = query position, bottom-right aligned; ``j`` = key), written without the library's
component machinery, so the builders are checked against the documented semantics.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import sparseattn as sa
from sparseattn.patterns import _build

P = sa.patterns


def grid(n_q, n_k):
    """Query positions (column vector) and keys (row vector), bottom-right aligned."""
    return np.arange(n_q)[:, None] + (n_k - n_q), np.arange(n_k)[None, :]


def brute(fn, n_q, n_k):
    i, j = grid(n_q, n_k)
    return np.broadcast_to(fn(i, j), (n_q, n_k)).astype(bool)


def window_def(w, causal):
    if causal:
        return lambda i, j: (i - w < j) & (j <= i)
    return lambda i, j: np.abs(i - j) <= w // 2


def isin(x, values):
    return np.isin(x, np.asarray(values, dtype=np.int64))


# (strategy of parameters, factory, brute-force definition)
FAMILIES = {
    "dense": (st.tuples(st.booleans()), lambda c: P.dense(c),
              lambda c: (lambda i, j: (j <= i) if c else np.ones(np.broadcast(i, j).shape, bool))),
    "sliding_window": (st.tuples(st.integers(1, 12), st.booleans()), lambda w, c: P.sliding_window(w, c),
                       window_def),
    "sinks": (st.tuples(st.integers(0, 6), st.booleans()), lambda n, c: P.sinks(n, c),
              lambda n, c: (lambda i, j: (j < n) & ((j <= i) if c else True))),
    "dilated": (st.tuples(st.integers(1, 5), st.none() | st.integers(1, 14), st.booleans()),
                lambda d, w, c: P.dilated(d, w, c),
                lambda d, w, c: (lambda i, j: ((i - j) % d == 0)
                                 & (((j <= i) if c else True) if w is None else window_def(w, c)(i, j)))),
    "strided": (st.tuples(st.integers(1, 7), st.booleans()), lambda s, c: P.strided(s, c),
                lambda s, c: (lambda i, j: ((0 <= i - j) & ((i - j < s) | ((i - j) % s == 0))) if c
                              else ((np.abs(i - j) < s) | ((i - j) % s == 0)))),
    "fixed": (st.tuples(st.integers(1, 7), st.integers(1, 7), st.booleans()).filter(lambda t: t[1] <= t[0]),
              lambda s, c, ca: P.fixed(s, c, ca),
              lambda s, c, ca: (lambda i, j: (((i // s) == (j // s)) | (j % s >= s - c))
                                & ((j <= i) if ca else True))),
    "longformer": (st.tuples(st.integers(1, 9), st.integers(0, 3) | st.lists(st.integers(0, 40), max_size=4)),
                   lambda w, g: P.longformer(w, g),
                   lambda w, g: (lambda i, j: (np.abs(i - j) <= w // 2)
                                 | isin(j, range(g) if isinstance(g, int) else g)
                                 | isin(i, range(g) if isinstance(g, int) else g))),
    "sinks_or_window": (st.tuples(st.integers(0, 4), st.integers(1, 9)),
                        lambda n, w: P.sinks(n) | P.sliding_window(w),
                        lambda n, w: (lambda i, j: ((j < n) & (j <= i)) | ((i - w < j) & (j <= i)))),
    "window_and_dilated": (st.tuples(st.integers(1, 12), st.integers(1, 4)),
                           lambda w, d: P.sliding_window(w) & P.dilated(d),
                           lambda w, d: (lambda i, j: (i - w < j) & (j <= i) & ((i - j) % d == 0))),
    "dilated_and_strided": (st.tuples(st.integers(1, 5), st.booleans()),
                            lambda d, c: P.dilated(d, causal=c) & P.strided(d, causal=False),
                            lambda d, c: (lambda i, j: ((i - j) % d == 0) & ((j <= i) if c else True))),
    "dilated_and_dilated": (st.tuples(st.integers(2, 4), st.integers(2, 4), st.integers(1, 15)),
                            lambda d1, d2, w: P.dilated(d1, w) & P.dilated(d2),  # layout-level
                            lambda d1, d2, w: (lambda i, j: ((i - j) % d1 == 0) & ((i - j) % d2 == 0)
                                               & (np.abs(i - j) <= w // 2))),
    "causal_longformer": (st.tuples(st.integers(1, 9), st.integers(0, 3)),
                          lambda w, g: P.causal(P.longformer(w, g)),
                          lambda w, g: (lambda i, j: ((np.abs(i - j) <= w // 2) | (j < g) | isin(i, range(g)))
                                        & (j <= i))),
    "causal_of_strided": (st.tuples(st.integers(1, 6)),
                          lambda s: P.strided(s, causal=False).as_causal(),
                          lambda s: (lambda i, j: (j <= i) & ((i - j < s) | ((i - j) % s == 0)))),
}

sizes = st.tuples(st.integers(0, 40), st.integers(0, 40))
block_sizes = st.tuples(st.integers(1, 9), st.integers(1, 9))


def check_layouts(pattern, want, n_q, n_k, bs):
    lay = pattern.layout(n_q, n_k)
    assert isinstance(lay, sa.CSRLayout) and lay.heads == 1 and lay.shape == (n_q, n_k)
    np.testing.assert_array_equal(lay.to_dense()[0], want)
    # stored CSR is valid (re-validated by the checking constructor)
    sa.CSRLayout(lay.indptr, lay.indices, lay.shape, lay.heads)
    blk = pattern.layout(n_q, n_k, block_size=bs)
    assert isinstance(blk, sa.BlockCSRLayout) and blk.block_size == bs
    np.testing.assert_array_equal(blk.to_dense()[0], want)
    # the same blocks, full/partial split and nnz as the exact conversion of the dense mask
    ref = sa.BlockCSRLayout.from_dense(want, bs)
    assert (blk.n_blocks, blk.n_full, blk.nnz) == (ref.n_blocks, ref.n_full, ref.nnz)
    # masks are de-duplicated
    if blk.masks.shape[0] > 1:
        flat = blk.masks.reshape(blk.masks.shape[0], -1)
        assert np.unique(flat, axis=0).shape[0] == flat.shape[0]
    sa.BlockCSRLayout(blk.indptr, blk.indices, blk.shape, blk.block_size, 1, blk.mask_index, blk.masks)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@settings(max_examples=25, deadline=None)
@given(data=st.data(), nqk=sizes, bs=block_sizes)
def test_family_matches_definition(family, data, nqk, bs):
    params_st, make, definition = FAMILIES[family]
    params = data.draw(params_st)
    n_q, n_k = nqk
    pattern = make(*params)
    want = brute(definition(*params), n_q, n_k)
    check_layouts(pattern, want, n_q, n_k, bs)


def bigbird_grid_def(p, n_k):
    """BigBird's block grid from its definition, given the drawn random blocks."""
    nb = -(-n_k // p.block_size)
    w, g = p.window_blocks // 2, p.global_blocks
    R, C = np.arange(nb)[:, None], np.arange(nb)[None, :]
    base = (np.abs(R - C) <= w) | (R < g) | (C < g)
    if p.causal:
        base &= C <= R
    return base


@settings(max_examples=25, deadline=None)
@given(bs_=st.integers(1, 6), wb=st.integers(0, 5), gb=st.integers(0, 3), rb=st.integers(0, 4),
       seed=st.integers(0, 2**40), causal=st.booleans(), nqk=sizes, bs=block_sizes)
def test_bigbird_matches_definition(bs_, wb, gb, rb, seed, causal, nqk, bs):
    n_q, n_k = nqk
    p = P.bigbird(bs_, wb, gb, rb, seed, causal)
    nb = -(-n_k // bs_)
    gm = p.block_mask(n_k) if n_k else np.zeros((0, 0), bool)
    base = bigbird_grid_def(p, n_k)
    # the grid holds the deterministic part and random blocks never duplicate it
    assert np.all(gm[base])
    extra = gm & ~base
    w = wb // 2
    for R in range(nb):
        if R < gb:
            continue
        eligible = [C for C in range(nb) if abs(R - C) > w and C >= gb and (not causal or C < R)]
        assert set(np.nonzero(extra[R])[0]) <= set(eligible)
        assert extra[R].sum() == min(rb, len(eligible))
    # token level: i sees j iff grid[i // b, j // b] (and j <= i when causal)
    i, j = grid(n_q, n_k)
    want = np.zeros((n_q, n_k), bool)
    ok = (i >= 0)[:, 0]
    if n_k:
        want[ok] = gm[(i[ok] // bs_)[:, :1], j // bs_]
    if causal:
        want &= j <= i
    check_layouts(p, want, n_q, n_k, bs)


def test_bigbird_reproducible_and_seeded():
    a = P.bigbird(4, 3, 1, 3, seed=7).block_mask(200)
    b = P.bigbird(4, 3, 1, 3, seed=7).block_mask(200)
    c = P.bigbird(4, 3, 1, 3, seed=8).block_mask(200)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    # causal rows do not depend on the length: decoding sees what the full pass saw
    long = P.bigbird(4, 3, 1, 3, seed=7, causal=True).block_mask(400)
    short = P.bigbird(4, 3, 1, 3, seed=7, causal=True).block_mask(200)
    assert np.array_equal(long[:50, :50], short)


@settings(max_examples=25, deadline=None)
@given(heads=st.integers(1, 3), nbq=st.integers(1, 6), nbk=st.integers(1, 6), bsq=st.integers(1, 5),
       bsk=st.integers(1, 5), nqk=sizes, bs=block_sizes, seed=st.integers(0, 1000))
def test_block_sparse_matches_definition(heads, nbq, nbk, bsq, bsk, nqk, bs, seed):
    rng = np.random.default_rng(seed)
    n_q, n_k = nqk
    # a grid large enough for n_k keys (extra rows/cols are cropped)
    nbq = max(nbq, -(-n_k // bsq))
    nbk = max(nbk, -(-n_k // bsk))
    bl = rng.random((heads, nbq, nbk)) < 0.4
    p = P.block_sparse(bl, (bsq, bsk))
    lay = p.layout(n_q, n_k, heads=heads, block_size=bs)
    csr = p.layout(n_q, n_k, heads=heads)
    i, j = grid(n_q, n_k)
    for h in range(lay.heads):
        want = np.zeros((n_q, n_k), bool)
        ok = (i >= 0)[:, 0]
        want[ok] = bl[h][(i[ok] // bsq)[:, :1], j // bsk]
        np.testing.assert_array_equal(csr.to_dense()[h], want)
        np.testing.assert_array_equal(lay.to_dense()[h], want)


def test_block_sparse_hashable_by_content_and_too_small_grid():
    bl = np.eye(4, dtype=bool)
    a, b = P.block_sparse(bl, 16), P.block_sparse(bl.copy(), (16, 16))
    assert a == b and hash(a) == hash(b)
    assert a != P.block_sparse(~bl, 16)
    assert P.block_sparse(bl.astype(np.int64), 16) == a  # DeepSpeed-style 0/1 ints
    with pytest.raises(ValueError, match="too small"):
        a.layout(65)
    assert a.layout(30).shape == (30, 30)  # cropped


def test_sliding_window_block_layout_at_scale_is_compact():
    n, w = 1 << 16, 4096
    lay = P.sliding_window(w).layout(n, block_size=(64, 64))
    nb = n // 64
    # each block row touches at most w/64 + 1 blocks; only the 2 edge blocks are partial
    assert lay.masks.shape[0] <= 4
    assert lay.n_blocks == sum(min(r, w // 64) + 1 for r in range(nb))
    assert lay.nnz == n * w - w * (w - 1) // 2
    # and the token CSR matches the row lengths of the definition
    csr = P.sliding_window(64).layout(4096)
    np.testing.assert_array_equal(np.diff(csr.indptr), np.minimum(np.arange(4096) + 1, 64))


def test_decoding_alignment_bottom_right():
    # one new query after 10 cached keys sits at position 10 - 1 = 9: sees keys 9-3..9
    lay = P.sliding_window(4).layout(1, 10)
    np.testing.assert_array_equal(lay.indices, [6, 7, 8, 9])
    assert P.dense(causal=True).layout(2, 5).to_dense()[0].sum(axis=1).tolist() == [4, 5]
    # more queries than keys: the leading queries sit before position 0 and see nothing causal
    assert P.dense(causal=True).layout(5, 3).to_dense()[0].sum(axis=1).tolist() == [0, 0, 1, 2, 3]


# ----------------------------------------------------------------------------- heads


def test_shared_patterns_give_one_head_whatever_heads_asked():
    for p in (P.sliding_window(4), P.dilated(2), P.bigbird(4), P.dilated([2, 2, 2, 2])):
        assert p.layout(16, heads=4).heads == 1
        assert p.layout(16, heads=4, block_size=4).heads == 1
    # identical per-head entries are shared too, but the head count must still match
    assert P.per_head([P.dense(), P.dense()]).layout(5, heads=2).heads == 1
    with pytest.raises(ValueError, match="2 heads"):
        P.per_head([P.dense(), P.dense()]).layout(5, heads=8)


def test_per_head_patterns():
    pats = [P.sliding_window(3), P.dilated(2, causal=True), P.sinks(2) | P.sliding_window(2)]
    ph = P.per_head(pats)
    assert ph.heads == 3
    for bs in (None, (4, 3)):
        lay = ph.layout(11, 13, heads=3, block_size=bs)
        assert lay.heads == 3
        for h, p in enumerate(pats):
            np.testing.assert_array_equal(lay.to_dense()[h], p.layout(11, 13).to_dense()[0])
    with pytest.raises(ValueError, match="3 heads"):
        ph.layout(11, heads=4)
    # a per-head dilation list, and union of per-head with shared broadcasts the shared one
    dl = P.dilated([1, 2, 3], window=9)
    lay = dl.layout(20, heads=3, block_size=8)
    for h, d in enumerate([1, 2, 3]):
        np.testing.assert_array_equal(lay.to_dense()[h], P.dilated(d, window=9).layout(20).to_dense()[0])
    u = dl | P.sinks(1)
    assert u.heads == 3
    np.testing.assert_array_equal(u.layout(20).to_dense()[2],
                                  (P.dilated(3, window=9) | P.sinks(1)).layout(20).to_dense()[0])
    with pytest.raises(ValueError, match="different head counts"):
        _ = dl | P.per_head([P.dense(), P.dense()])
    with pytest.raises(ValueError, match="nest no per_head"):
        P.per_head([dl])


def test_stack_heads_dedupes_masks():
    lay = P.per_head([P.sliding_window(5), P.sliding_window(5) | P.sinks(0)]).layout(30, block_size=4)
    assert lay.heads == 1 or lay.masks.shape[0] == np.unique(lay.masks.reshape(len(lay.masks), -1), axis=0).shape[0]
    lay = _build.stack_heads([P.sliding_window(5).layout(30, block_size=4)] * 3)
    assert lay.heads == 3 and lay.masks.shape[0] == P.sliding_window(5).layout(30, block_size=4).masks.shape[0]


# ----------------------------------------------------------------------------- objects


def test_patterns_are_frozen_hashable_and_print():
    p = P.sliding_window(4096)
    assert p == P.sliding_window(4096, causal=True) and hash(p) == hash(P.sliding_window(4096))
    assert p != P.sliding_window(4096, causal=False)
    with pytest.raises(Exception):
        p.window = 3
    assert repr(p) == "sliding_window(window=4096, causal=True)"
    u = P.sinks(4) | p
    assert repr(u) == "(sinks(n_sink=4, causal=True) | sliding_window(window=4096, causal=True))"
    assert repr(P.causal(P.longformer(8, [0, 5]))) == "causal(longformer(window=8, global_tokens=(0, 5)))"
    assert hash(u) == hash(P.sinks(4) | P.sliding_window(4096))
    assert (P.sinks(1) | P.dense()) | P.sinks(2) == P.sinks(1) | (P.dense() | P.sinks(2))  # flattened
    assert P.causal(P.causal(p)) == P.causal(p)
    for p in (P.dense(), P.dilated([1, 2]), P.strided(4), P.fixed(4), P.bigbird(8), P.longformer(4)):
        assert p.__doc__ and "Cost" in type(p).__doc__
        hash(p)
    assert "density" in P.sliding_window(4).describe(32)


@pytest.mark.parametrize("call, err", [
    (lambda: P.sliding_window(0), ValueError),
    (lambda: P.sliding_window(2.5), TypeError),
    (lambda: P.sliding_window(True), TypeError),
    (lambda: P.sliding_window(4, causal="yes"), TypeError),
    (lambda: P.dilated(0), ValueError),
    (lambda: P.dilated([]), ValueError),
    (lambda: P.dilated("ab"), TypeError),
    (lambda: P.fixed(4, 5), ValueError),
    (lambda: P.strided(0), ValueError),
    (lambda: P.sinks(-1), ValueError),
    (lambda: P.longformer(4, -1), ValueError),
    (lambda: P.longformer(4, [1, -2]), ValueError),
    (lambda: P.bigbird(0), ValueError),
    (lambda: P.block_sparse(np.ones((2, 2, 2, 2), bool), 4), ValueError),
    (lambda: P.block_sparse(np.array([["a"]]), 4), TypeError),
    (lambda: P.block_sparse(np.ones((2, 2), bool), 0), ValueError),
    (lambda: P.per_head([]), ValueError),
    (lambda: P.per_head([1]), TypeError),
    (lambda: P.sliding_window(4).layout(-1), ValueError),
    (lambda: P.sliding_window(4).layout(4, 2.0), TypeError),
    (lambda: P.sliding_window(4).layout(4, heads=0), ValueError),
    (lambda: P.sliding_window(4).layout(4, block_size=0), ValueError),
    (lambda: P.sliding_window(4) | 3, TypeError),
])
def test_bad_arguments(call, err):
    with pytest.raises(err):
        call()


def test_layer_plan():
    sw = P.sliding_window(4096)
    plan = P.LayerPlan.hybrid(8, dense_every=4, sparse=sw)
    assert len(plan) == 8 and list(plan) == list(plan.patterns)
    assert [l for l, p in enumerate(plan) if p == P.dense(causal=True)] == [3, 7]
    assert plan[0] == sw and isinstance(plan[1:3], P.LayerPlan) and len(plan[1:3]) == 2
    assert len(plan + P.LayerPlan.repeat(sw, 2)) == 10
    assert P.LayerPlan.hybrid(6, dense_every=3, first_dense=0)[3] == P.dense(causal=True)
    assert "x3" in repr(plan) and hash(plan) == hash(P.LayerPlan.hybrid(8, 4, sparse=sw))
    lays = P.LayerPlan.hybrid(4, 2, sparse=P.sliding_window(3)).layouts(8)
    assert lays[0] is lays[2] and lays[1].nnz == 36
    with pytest.raises(ValueError):
        P.LayerPlan.hybrid(4, dense_every=2, first_dense=2)
    with pytest.raises(TypeError):
        P.LayerPlan([sw, "dense"])


# ----------------------------------------------------------------------------- through attention

ATTN_PATTERNS = [
    P.dense(), P.dense(causal=True), P.sliding_window(9), P.sliding_window(10, causal=False),
    P.sinks(3) | P.sliding_window(12), P.dilated([1, 2, 3, 4], window=20), P.dilated(3, causal=True),
    P.strided(6), P.fixed(8, 2), P.longformer(8, [0, 30]), P.bigbird(16, seed=3),
    P.bigbird(64, causal=True), P.block_sparse(np.tril(np.ones((2, 2), bool)), 64),
    P.per_head([P.sliding_window(5), P.dense(), P.sinks(2), P.strided(4)]),
    P.causal(P.bigbird(8)), P.sliding_window(20) & P.dilated(2),
]


@pytest.mark.parametrize("pattern", ATTN_PATTERNS, ids=repr)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_attention_cpu_matches_reference(pattern, dtype):
    rng = np.random.default_rng(0)
    for n_q, n_k in ((70, 70), (5, 77)):
        q = rng.standard_normal((4, n_q, 16)).astype(dtype)
        k = rng.standard_normal((2, n_k, 16)).astype(dtype)
        v = rng.standard_normal((2, n_k, 8)).astype(dtype)
        a, la = sa.attention(q, k, v, pattern, backend="cpu", return_lse=True)
        b, lb = sa.attention(q, k, v, pattern, backend="reference", return_lse=True)
        tol = 1e-5 if dtype == np.float32 else 1e-12
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol)
        np.testing.assert_array_equal(np.isinf(la), np.isinf(lb))
        assert np.all(np.isfinite(a))


@settings(max_examples=25, deadline=None)
@given(nqk=sizes, bs=block_sizes, n_sink=st.integers(0, 5), b=st.integers(1, 6), seed=st.integers(0, 99))
def test_causal_of_layout_level_patterns(nqk, bs, n_sink, b, seed):
    # a union with a grid pattern is built layout by layout, then cut by the causal modifier
    n_q, n_k = nqk
    inner = P.bigbird(b, 3, 1, 2, seed) | P.sinks(n_sink, causal=False)
    p = P.causal(inner)
    i, j = grid(n_q, n_k)
    want = inner.layout(n_q, n_k).to_dense()[0] & (j <= i)
    check_layouts(p, want, n_q, n_k, bs)


def test_int64_indices_past_the_int32_limit(monkeypatch):
    monkeypatch.setattr(sa.config, "INT32_NNZ_LIMIT", 50)
    lay = P.sliding_window(8).layout(20)
    assert lay.indices.dtype == np.int64
    np.testing.assert_array_equal(lay.to_dense()[0], brute(window_def(8, True), 20, 20))


def test_picture():
    assert P.sliding_window(2).picture(3) == "#..\n##.\n.##"
    assert P.per_head([P.dense(), P.sinks(1)]).picture(2, head=1) == "#.\n#."


@settings(max_examples=30, deadline=None)
@given(nqk=st.tuples(st.integers(1, 30), st.integers(1, 30)), bs=block_sizes, seed=st.integers(0, 10**6),
       pa=st.floats(0, 1), pb=st.floats(0, 1))
def test_block_merges_and_causal_cut_match_dense(nqk, bs, seed, pa, pb):
    rng = np.random.default_rng(seed)
    n_q, n_k = nqk
    # random masks, with some all-true and all-false regions so full and absent blocks occur
    a = rng.random((n_q, n_k)) < pa
    b = rng.random((n_q, n_k)) < pb
    a[: n_q // 2] |= rng.random() < 0.5
    la, lb = sa.BlockCSRLayout.from_dense(a, bs), sa.BlockCSRLayout.from_dense(b, bs)
    for op, want in (("or", a | b), ("and", a & b)):
        got = _build.merge_blocks(la, lb, op)
        ref = sa.BlockCSRLayout.from_dense(want, bs)
        np.testing.assert_array_equal(got.to_dense()[0], want)
        assert (got.n_blocks, got.n_full) == (ref.n_blocks, ref.n_full)
    i, j = grid(n_q, n_k)
    cut = _build.causal_block(la)
    ref = sa.BlockCSRLayout.from_dense(a & (j <= i), bs)
    np.testing.assert_array_equal(cut.to_dense()[0], a & (j <= i))
    assert (cut.n_blocks, cut.n_full) == (ref.n_blocks, ref.n_full)
    np.testing.assert_array_equal(_build.causal_csr(la.to_csr()).to_dense()[0], a & (j <= i))


def test_patterns_pickle():
    # distributed attention ships patterns to workers
    import pickle

    for p in (P.sinks(2) | P.sliding_window(8), P.dilated([1, 2]), P.longformer(4, np.array([0, 5])),
              P.block_sparse(np.eye(3, dtype=bool), 4), P.causal(P.bigbird(4)),
              P.sliding_window(8) & P.dilated(2), P.LayerPlan.hybrid(4)):
        q = pickle.loads(pickle.dumps(p))
        assert q == p and hash(q) == hash(p)
