"""Malformed layouts and odd inputs: every case is a correct result or a ValueError/TypeError
that names the argument, never a crash, an out-of-bounds read or a silently wrong answer."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from robust_helpers import assert_clean_error, reference, run_python

import sparseattn as sa

INT_DTYPES = [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64]


def _valid_csr(rng, heads, n_q, n_k, density=0.4):
    mask = rng.random((heads, n_q, n_k)) < density
    lay = sa.CSRLayout.from_dense(mask)
    return np.array(lay.indptr), np.array(lay.indices, np.int64), mask


def _mutate(rng, indptr, indices, n_k, how):
    """One kind of corruption of valid CSR arrays (those that cannot apply return None)."""
    indptr, indices = indptr.copy(), indices.copy()
    nnz = indices.shape[0]
    if how == "indptr_not_monotone" and indptr.shape[0] > 2 and nnz:
        i = int(rng.integers(1, indptr.shape[0] - 1))
        indptr[i] = indptr[-1] + 1 if rng.random() < 0.5 else -1
    elif how == "negative_index" and nnz:
        indices[rng.integers(nnz)] = -int(rng.integers(1, 2**31))
    elif how == "index_out_of_range" and nnz:
        indices[rng.integers(nnz)] = n_k + int(rng.integers(0, 3))
    elif how == "unsorted" and nnz > 1:
        rows = np.flatnonzero(np.diff(indptr) > 1)
        if not rows.size:
            return None
        r = rows[0]
        a = indptr[r]
        indices[a], indices[a + 1] = indices[a + 1], indices[a]
    elif how == "duplicate" and nnz > 1:
        rows = np.flatnonzero(np.diff(indptr) > 1)
        if not rows.size:
            return None
        a = indptr[rows[0]]
        indices[a + 1] = indices[a]
    elif how == "indptr_too_short":
        indptr = indptr[:-1]
    elif how == "indptr_too_long":
        indptr = np.append(indptr, indptr[-1])
    elif how == "indices_too_long":
        indices = np.append(indices, 0)
    elif how == "indptr_first_nonzero" and nnz:
        indptr = indptr + 1
    elif how == "huge_values":
        indptr = indptr.copy()
        indptr[-1] = 2**62
    else:
        return None
    return indptr, indices


MUTATIONS = ["indptr_not_monotone", "negative_index", "index_out_of_range", "unsorted", "duplicate",
             "indptr_too_short", "indptr_too_long", "indices_too_long", "indptr_first_nonzero",
             "huge_values"]


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), heads=st.integers(1, 3), n_q=st.integers(1, 12),
       n_k=st.integers(1, 12), how=st.sampled_from(MUTATIONS), block=st.booleans())
def test_corrupted_csr_is_refused(seed, heads, n_q, n_k, how, block):
    rng = np.random.default_rng(seed)
    if block:  # the same corruptions of a block-CSR index structure (blocks of 2x3)
        bq, bk = 2, 3
        nbq, nbk = -(-n_q // bq), -(-n_k // bk)
        indptr, indices, _ = _valid_csr(rng, heads, nbq, nbk, 0.6)
        bad = _mutate(rng, indptr, indices, nbk, how)
        if bad is None:
            return
        with pytest.raises((ValueError, TypeError)) as err:
            sa.BlockCSRLayout(*bad, (n_q, n_k), (bq, bk), heads)
    else:
        indptr, indices, _ = _valid_csr(rng, heads, n_q, n_k)
        bad = _mutate(rng, indptr, indices, n_k, how)
        if bad is None:
            return
        with pytest.raises((ValueError, TypeError)) as err:
            sa.CSRLayout(*bad, (n_q, n_k), heads)
    assert_clean_error(err.value)
    assert any(w in str(err.value) for w in ("indptr", "indices"))


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), heads=st.integers(1, 3), n_q=st.integers(0, 12),
       n_k=st.integers(0, 12), dtype=st.sampled_from(INT_DTYPES + [np.float64, bool, object]),
       ptr_dtype=st.sampled_from(INT_DTYPES))
def test_any_integer_dtype_builds_the_same_layout(seed, heads, n_q, n_k, dtype, ptr_dtype):
    """Valid arrays in any integer dtype give the same layout (int64 indptr, int32 indices) and
    own copies; non-integer dtypes are a TypeError."""
    rng = np.random.default_rng(seed)
    indptr, indices, mask = _valid_csr(rng, heads, n_q, n_k)
    if np.iinfo(ptr_dtype).max < indptr[-1]:
        return
    try:
        idx = indices.astype(dtype)
    except (OverflowError, ValueError):
        return
    if dtype in (np.float64, bool, object):
        with pytest.raises(TypeError, match="indices must be an integer array"):
            sa.CSRLayout(indptr.astype(ptr_dtype), idx, (n_q, n_k), heads)
        return
    if np.issubdtype(dtype, np.integer) and n_k - 1 > np.iinfo(dtype).max:
        return
    src_ptr = indptr.astype(ptr_dtype)
    lay = sa.CSRLayout(src_ptr, idx, (n_q, n_k), heads)
    np.testing.assert_array_equal(lay.to_dense(), mask)
    assert lay.indptr.dtype == np.int64 and lay.indices.dtype == np.int32
    assert not np.shares_memory(lay.indptr, src_ptr) and not np.shares_memory(lay.indices, idx)
    assert src_ptr.flags.writeable  # the caller's arrays are left alone


def test_layout_does_not_alias_caller_arrays(rng):
    """Arrays validated once must not change later: a layout keeps private, read-only copies
    (before the fix, an int64 indices array was kept as is and could be corrupted afterwards)."""
    indptr, indices, mask = _valid_csr(rng, 1, 8, 8)
    lay = sa.CSRLayout(indptr, indices, (8, 8))
    indices[:] = 10**9  # the caller scribbles on its own array
    indptr[1:] = 0
    np.testing.assert_array_equal(lay.to_dense()[0], mask[0])
    with pytest.raises(ValueError):
        lay.indices[0] = 5
    blk = sa.BlockCSRLayout(np.array([0, 1]), np.array([0]), (4, 4), 4, mask_index=np.array([0]),
                            masks=np.ones((1, 4, 4), bool))
    assert not blk.masks.flags.writeable and not blk.mask_index.flags.writeable


@pytest.mark.parametrize("case, words", [
    (lambda: sa.CSRLayout(np.array([0, 5, 3, 5] + [5] * 5, np.uint64), np.arange(5) % 8, (8, 8)),
     ["indptr", "non-decreasing"]),  # uint64 differences never look negative
    (lambda: sa.CSRLayout(np.array([0, 2**64 - 1] + [0] * 7, np.uint64), [], (8, 8)),
     ["indptr", "int64"]),
    (lambda: sa.CSRLayout(np.zeros(9, int), [], (8.5, 8)), ["shape"]),
    (lambda: sa.CSRLayout(np.zeros(9, int), [], ("8", 8)), ["shape"]),
    (lambda: sa.CSRLayout(np.zeros(9, int), [], (8, 2**64)), ["shape", "int64"]),
    (lambda: sa.CSRLayout(np.zeros(9, int), [], (8, 8), heads=0), ["heads"]),
    (lambda: sa.CSRLayout(np.zeros(9, int), np.zeros((0, 1), int), (8, 8)), ["indices"]),
    (lambda: sa.BlockCSRLayout([0, 1], [0], (4, 4), 4, mask_index=[3], masks=np.ones((1, 4, 4), bool)),
     ["mask_index"]),
    (lambda: sa.BlockCSRLayout([0, 1], [0], (4, 4), 4, mask_index=[0], masks=np.ones((1, 4, 4), np.uint8)),
     ["masks"]),
    (lambda: sa.BlockCSRLayout([0, 1], [0], (4, 4), 4, mask_index=[0], masks=np.ones((1, 2, 4), bool)),
     ["masks"]),
    (lambda: sa.BlockCSRLayout([0, 1], [0], (4, 4), (0, 4)), ["block_size"]),
    (lambda: sa.BlockCSRLayout([0, 1], [0], (4, 4), 2.5), ["block_size"]),
])
def test_bad_layout_arguments_named(case, words):
    with pytest.raises((ValueError, TypeError)) as err:
        case()
    assert_clean_error(err.value, *words)


def test_empty_list_indices_accepted():
    lay = sa.CSRLayout([0] * 9, [], (8, 8))
    assert lay.nnz == 0 and lay.indices.dtype == np.int32


# ----------------------------------------------------------------------------- attention inputs

Q = np.random.default_rng(5).standard_normal((2, 8, 4)).astype(np.float32)
LAY = sa.CSRLayout.from_dense(np.tril(np.ones((8, 8), bool)))


@pytest.mark.parametrize("args, words", [
    (dict(q=Q.astype(np.int64)), ["q", "float"]),
    (dict(q=Q.astype(complex)), ["q", "float"]),
    (dict(q=Q.astype(object)), ["q", "float"]),
    (dict(q=Q[0]), ["q", "rank"]),
    (dict(k=Q[:, :, :3]), ["q", "k"]),
    (dict(v=Q[:, :5]), ["v"]),
    (dict(q=np.zeros((0, 8, 4), np.float32)), ["head"]),
    (dict(q=np.zeros((3, 8, 4), np.float32)), ["heads"]),
    (dict(scale=np.nan), ["scale"]),
    (dict(scale=-1.0), ["scale"]),
    (dict(scale="1"), ["scale"]),
    (dict(scale=True), ["scale"]),
    (dict(scale=1e300), ["scale", "float32"]),  # finite, but not in the compute dtype
    (dict(scale=1e-300), ["scale", "float32"]),  # rounds to 0 in float32
    (dict(layout="window"), ["pattern_or_layout"]),
    (dict(layout=LAY.expand_heads(3)), ["pattern_or_layout", "heads"]),
    (dict(layout=sa.CSRLayout.from_dense(np.ones((8, 9), bool))), ["pattern_or_layout", "shape"]),
    (dict(backend="gpu"), ["backend"]),
    (dict(backend=3), ["backend"]),
])
def test_bad_attention_arguments_named(args, words):
    a = dict(q=Q, k=Q, v=Q, layout=LAY, scale=None, backend=None)
    a.update(args)
    with pytest.raises((ValueError, TypeError)) as err:
        sa.attention(a["q"], a["k"], a["v"], a["layout"], scale=a["scale"], backend=a["backend"])
    assert_clean_error(err.value, *words)


@pytest.mark.parametrize("args, words", [
    (dict(out=Q.astype(complex)), ["out", "float"]),  # was: a ComplexWarning and a silent cast
    (dict(out=Q.astype(np.int64)), ["out", "float"]),
    (dict(dout=Q[:, :4]), ["dout", "shape"]),
    (dict(lse=np.zeros((2, 8), np.int64)), ["lse", "float"]),
    (dict(lse=np.zeros((2, 7))), ["lse", "shape"]),
    (dict(out="abc"), ["out", "shape"]),
])
def test_bad_backward_arguments_named(args, words):
    out, lse = sa.attention(Q, Q, Q, LAY, return_lse=True)
    a = dict(out=out, lse=lse, dout=np.ones_like(out))
    a.update(args)
    with pytest.raises((ValueError, TypeError)) as err:
        sa.attention_backward(Q, Q, Q, a["out"], a["lse"], a["dout"], LAY)
    assert_clean_error(err.value, *words)


def test_backward_accepts_lists():
    """Array-likes work in both directions (was an AttributeError on ``q.shape``)."""
    out, lse = sa.attention(Q, Q, Q, LAY, return_lse=True)
    grads = sa.attention_backward(Q.tolist(), Q, Q, out, lse.tolist(), np.ones_like(out), LAY)
    ref = sa.attention_backward(Q, Q, Q, out, lse, np.ones_like(out), LAY)
    np.testing.assert_allclose(grads[0], ref[0], rtol=1e-5, atol=1e-6)


SHAPES = [  # (B, Hq, Hkv, Nq, Nk, D, Dv)
    (1, 1, 1, 0, 0, 4, 4), (1, 2, 1, 0, 5, 4, 4), (1, 2, 2, 5, 0, 4, 3), (0, 2, 2, 5, 5, 4, 4),
    (1, 1, 1, 7, 7, 1, 1), (1, 2, 1, 5, 9, 512, 3), (2, 4, 2, 3, 70, 2, 512), (1, 1, 1, 1, 1, 1, 1),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("kind", ["csr", "block", "pattern"])
def test_odd_shapes(rng, shape, backend, kind):
    """Zero-length sequences, empty batches, D = 1 and D = 512, GQA: results match the reference,
    gradients too; empty rows give 0 and lse -inf."""
    B, Hq, Hkv, Nq, Nk, D, Dv = shape
    q = rng.standard_normal((B, Hq, Nq, D)).astype(np.float32)
    k = rng.standard_normal((B, Hkv, Nk, D)).astype(np.float32)
    v = rng.standard_normal((B, Hkv, Nk, Dv)).astype(np.float32)
    mask = rng.random((Hq, Nq, Nk)) < 0.5
    lay = sa.CSRLayout.from_dense(mask)
    lay = {"csr": lay, "block": lay.to_block((4, 8)), "pattern": sa.patterns.sliding_window(3)}[kind]
    out, lse = sa.attention(q, k, v, lay, backend=backend, return_lse=True)
    assert out.shape == (B, Hq, Nq, Dv) and lse.shape == (B, Hq, Nq)
    if B:
        ref_out, ref_lse = (x for x in zip(*(reference(q[b], k[b], v[b], lay) for b in range(B))))
        np.testing.assert_allclose(out, np.stack(ref_out), atol=1e-5)
        np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(np.stack(ref_lse)))
    grads = sa.attention_backward(q, k, v, out, lse, np.ones_like(out), lay, backend=backend)
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]
    assert all(np.isfinite(g).all() for g in grads)


def test_noncontiguous_and_readonly_inputs(rng):
    """Strided, transposed, negative-stride and read-only views give the contiguous answer and
    are not written to."""
    base = rng.standard_normal((2, 3, 16, 12)).astype(np.float32)
    q = base[:, :, ::2, ::3]  # (2, 3, 8, 4), strided
    k = np.ascontiguousarray(base[:, :, :8, :4].transpose(0, 1, 3, 2)).transpose(0, 1, 3, 2)
    v = base[:, :, 15:7:-1, 4:8]  # negative stride
    for x in (q, k, v):
        x.flags.writeable = False
    before = base.copy()
    for lay in (LAY, LAY.to_block((4, 4)), sa.patterns.sliding_window(3)):
        out, lse = sa.attention(q, k, v, lay, return_lse=True)
        want = sa.attention(*(np.ascontiguousarray(x) for x in (q, k, v)), lay)
        np.testing.assert_array_equal(out, want)
        grads = sa.attention_backward(q, k, v, out, lse, np.ones_like(out), lay)
        want_g = sa.attention_backward(*(np.ascontiguousarray(x) for x in (q, k, v)), out, lse,
                                       np.ones_like(out), lay)
        for g, w in zip(grads, want_g):
            np.testing.assert_array_equal(g, w)
    np.testing.assert_array_equal(base, before)


def test_risky_cases_in_a_subprocess():
    """The cases most likely to take the interpreter down, run where a segfault cannot kill
    pytest: giant indices (int32 wrap-around), corrupt arrays patched in after validation,
    empty/odd shapes straight into the kernels, concurrent launches."""
    code = r'''
import numpy as np, sparseattn as sa
rng = np.random.default_rng(0)
q = rng.standard_normal((1, 2, 8, 4)).astype(np.float32)
for ind in ([2**31 + 1], [2**32 - 1], [-1], [2**63 - 1]):
    for make in (lambda: sa.CSRLayout([0, 1] + [1] * 7, np.array(ind, np.int64), (8, 8)),
                 lambda: sa.BlockCSRLayout([0, 1, 1], np.array(ind, np.int64), (8, 8), 4)):
        try:
            lay = make()
        except (ValueError, TypeError):
            continue
        raise SystemExit("accepted bad index %r" % ind)
# a block index beyond int32 in a (legal) huge key range stays int64, never wraps negative
blk = sa.BlockCSRLayout([0, 1], np.array([2**31 + 5]), (4, 4 * 2**32), 4)
assert blk.indices.dtype == np.int64 and blk.indices[0] == 2**31 + 5, blk.indices
for lay in (sa.CSRLayout([0] * 9, [], (8, 8)), sa.BlockCSRLayout([0] * 3, [], (8, 8), 4)):
    out, lse = sa.attention(q, q, q, lay, return_lse=True)
    assert (out == 0).all() and np.isneginf(lse).all()
    g = sa.attention_backward(q, q, q, out, lse, np.ones_like(out), lay)
    assert all((x == 0).all() for x in g)
print("survived")
'''
    res = run_python(code)
    assert res.returncode == 0 and "survived" in res.stdout, res.stderr[-3000:]
