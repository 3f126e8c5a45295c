"""Numba-CUDA kernels of the cuda backend under Numba's CUDA simulator, against the CPU backend.

Not collected by a plain ``pytest`` run (its name does not start with ``test_``):
``tests/test_cuda.py::test_kernels_under_cuda_simulator`` runs this file in a subprocess with
``NUMBA_ENABLE_CUDASIM=1`` set before Numba-CUDA is imported, so the rest of the suite (and any
real GPU) is unaffected. The simulator runs every thread as a Python thread: sizes are tiny, and
most cases use a small tile geometry that still splits query blocks, key blocks and the head
dimension into several tiles.
"""

import os

assert os.environ.get("NUMBA_ENABLE_CUDASIM") == "1", "run through tests/test_cuda.py"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from numba import cuda  # noqa: E402

import sparseattn as sa  # noqa: E402
from sparseattn.backends.cuda import backward as BW  # noqa: E402
from sparseattn.backends.cuda import forward as F  # noqa: E402

SMALL = F.Geometry(2, 4, 2, 2, 4)  # 8 threads, 4 x 8 score tiles, 4 head dims per chunk
TOL = {np.float32: dict(rtol=1e-5, atol=2e-6), np.float64: dict(rtol=1e-12, atol=1e-13)}


def _dev(x):
    return cuda.to_device(np.ascontiguousarray(x))


def _run(q, k, v, lay, scale, geometry=None, threads=4):
    B, Hq, Nq, _ = q.shape
    out = _dev(np.full((B, Hq, Nq, v.shape[3]), np.nan, q.dtype))
    lse = _dev(np.full((B, Hq, Nq), np.nan, q.dtype))
    if isinstance(lay, sa.BlockCSRLayout):
        masks = lay.masks.view(np.uint8) if lay.masks.shape[0] else np.zeros((1,) + lay.block_size, np.uint8)
        F.block_forward(_dev(q), _dev(k), _dev(v), _dev(lay.indptr), _dev(lay.indices),
                        _dev(lay.mask_index), _dev(masks), lay.heads, lay.block_size, scale, out, lse,
                        geometry=geometry or SMALL)
    else:
        F.csr_forward(_dev(q), _dev(k), _dev(v), _dev(lay.indptr), _dev(lay.indices), lay.heads,
                      scale, out, lse, threads=threads)
    return out.copy_to_host(), lse.copy_to_host()


def _check(q, k, v, lay, scale, **kw):
    out, lse = _run(q, k, v, lay, scale, **kw)
    ref_o, ref_l = sa.backends.get("cpu").forward(q, k, v, lay, scale)
    tol = TOL[q.dtype.type]
    assert not np.isnan(out).any() and not np.isnan(lse).any()
    np.testing.assert_allclose(out, ref_o, **tol)
    np.testing.assert_array_equal(np.isinf(lse), np.isinf(ref_l))
    fin = np.isfinite(ref_l)
    np.testing.assert_allclose(lse[fin], ref_l[fin], **tol)
    return out, lse


def _mask(rng, heads, nq, nk, density=0.35):
    m = rng.random((heads, nq, nk)) < density
    m[:, 1] = False  # an empty row
    m[:, 2] = True   # a full row
    return m


def _qkv(rng, dtype, B, Bk, Hq, Hkv, Nq, Nk, D, Dv):
    return (rng.standard_normal((B, Hq, Nq, D)).astype(dtype),
            rng.standard_normal((Bk, Hkv, Nk, D)).astype(dtype),
            rng.standard_normal((Bk, Hkv, Nk, Dv)).astype(dtype))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_block_small_tiles(dtype):
    """Query blocks of 6 rows over 4-row tiles, key blocks of 10 over 8-key tiles, D=6 over 4-dim
    chunks, per-head partial masks, GQA, a batch-broadcast k/v, Nq != Nk, an empty row."""
    rng = np.random.default_rng(1)
    b = 2 if dtype == np.float32 else 1  # batch broadcast once is enough (the simulator is slow)
    q, k, v = _qkv(rng, dtype, b, 1, 2, 1, 9, 17, 6, 5)
    lay = sa.BlockCSRLayout.from_dense(_mask(rng, 2, 9, 17), (6, 10))
    out, lse = _check(q, k, v, lay, 0.7)
    assert np.all(out[:, :, 1] == 0) and np.all(np.isneginf(lse[:, :, 1]))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_block_production_geometry(dtype):
    """The geometry the GPU runs (config.CUDA_TILES): one tile, causal sliding window, shared layout."""
    rng = np.random.default_rng(2)
    n = 20
    q, k, v = _qkv(rng, dtype, 1, 1, 1, 1, n, n, 8, 8)
    i = np.arange(n)
    mask = (i[:, None] >= i[None]) & (i[:, None] - i[None] < 7)
    lay = sa.BlockCSRLayout.from_dense(mask, (64, 64))
    _check(q, k, v, lay, 0.5, geometry=F.block_geometry(dtype))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_csr(dtype):
    """Token CSR: chunks of 4 keys per step, Dv > threads, GQA, per-head layout, empty rows."""
    rng = np.random.default_rng(3)
    q, k, v = _qkv(rng, dtype, 1, 1, 2, 1, 9, 13, 5, 7)
    lay = sa.CSRLayout.from_dense(_mask(rng, 2, 9, 13, 0.6))
    _check(q, k, v, lay, 0.4, threads=4)



@pytest.mark.parametrize("block", [True, False])
def test_nan_in_a_query_makes_its_row_nan(block):
    """All scores of the row NaN: the row is NaN (out and lse), not a row without keys (0, -inf);
    the other rows are exact."""
    rng = np.random.default_rng(9)
    q, k, v = _qkv(rng, np.float64, 1, 1, 1, 1, 9, 9, 6, 6)
    q[0, 0, 4, 2] = np.nan
    m = np.tril(np.ones((9, 9), bool))
    lay = sa.BlockCSRLayout.from_dense(m, (4, 4)) if block else sa.CSRLayout.from_dense(m)
    out, lse = _run(q, k, v, lay, 0.5)
    assert np.isnan(out[0, 0, 4]).all() and np.isnan(lse[0, 0, 4])
    ref_o, ref_l = sa.backends.get("cpu").forward(q, k, v, lay, 0.5)
    rows = np.arange(9) != 4
    np.testing.assert_allclose(out[0, 0, rows], ref_o[0, 0, rows], **TOL[np.float64])
    np.testing.assert_allclose(lse[0, 0, rows], ref_l[0, 0, rows], **TOL[np.float64])

@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), nq=st.integers(1, 12), nk=st.integers(1, 12),
       bq=st.integers(1, 7), bk=st.integers(1, 9), d=st.integers(1, 6),
       dtype=st.sampled_from([np.float32, np.float64]), block=st.booleans())
def test_random_shapes(seed, nq, nk, bq, bk, d, dtype, block):
    rng = np.random.default_rng(seed)
    q, k, v = _qkv(rng, dtype, 1, 1, 1, 1, nq, nk, d, d)
    m = rng.random((nq, nk)) < 0.5
    lay = sa.BlockCSRLayout.from_dense(m, (bq, bk)) if block else sa.CSRLayout.from_dense(m)
    _check(q, k, v, lay, float(rng.uniform(0.1, 2.0)))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_backward(dtype):
    """dq query-major, dk/dv key-major over the transposed layout: GQA (summed over the group),
    k/v broadcast over a batch of 2 (summed over it), Dv != D, an empty row, a per-head layout."""
    rng = np.random.default_rng(4)
    q, k, v = _qkv(rng, dtype, 2, 1, 2, 1, 7, 9, 5, 3)
    lay = sa.CSRLayout.from_dense(_mask(rng, 2, 7, 9, 0.5))
    scale = 0.6
    ref = sa.backends.get("reference")
    out, lse = ref.forward(q, k, v, lay, scale)
    dout = rng.standard_normal(out.shape).astype(dtype)
    want = ref.backward(q, k, v, out, lse, dout, lay, scale)
    delta = (dout * out).sum(-1)
    t = lay.transpose()
    dq, dk, dv = _dev(np.zeros_like(q)), _dev(np.zeros_like(k)), _dev(np.zeros_like(v))
    args = [_dev(x) for x in (q, k, v, dout, lse, delta)]
    BW.dq_backward(*args, _dev(lay.indptr), _dev(lay.indices), lay.heads, scale, dq, threads=4)
    BW.dkdv_backward(*args, _dev(t.indptr), _dev(t.indices), lay.heads, scale, dk, dv, threads=4)
    tol = {np.float32: dict(rtol=2e-5, atol=2e-5), np.float64: dict(rtol=1e-11, atol=1e-12)}[dtype]
    for got, exp in zip((dq, dk, dv), want):
        np.testing.assert_allclose(got.copy_to_host(), exp, **tol)


def _block_backward(q, k, v, lay, scale, rng, geometry):
    ref = sa.backends.get("reference")
    out, lse = ref.forward(q, k, v, lay, scale)
    dout = rng.standard_normal(out.shape).astype(q.dtype)
    want = sa.backends.get("cpu").backward(q, k, v, out, lse, dout, lay, scale)
    delta = (dout * out).sum(-1)

    def dev_layout(lay):
        masks = lay.masks.view(np.uint8) if lay.masks.shape[0] else np.zeros((1,) + lay.block_size, np.uint8)
        return {"indptr": _dev(lay.indptr), "indices": _dev(lay.indices),
                "mask_index": _dev(lay.mask_index), "masks": _dev(masks)}

    got = [_dev(np.full_like(x, np.nan)) for x in (q, k, v)]
    BW.block_backward(*(_dev(x) for x in (q, k, v, dout, lse, delta)), dev_layout(lay),
                      dev_layout(lay.transpose()), lay.heads, lay.block_size, scale, *got,
                      geometry=geometry)
    tol = {np.float32: dict(rtol=2e-5, atol=2e-5), np.float64: dict(rtol=1e-11, atol=1e-12)}[q.dtype.type]
    for g, w in zip(got, want):
        np.testing.assert_allclose(g.copy_to_host(), w, **tol)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_block_backward(dtype):
    """The tiled block backward: query blocks of 6 rows over 4-row tiles, key blocks of 10 over
    8-column tiles (and the transpose: 10-key blocks over 4-row tiles, 6-query blocks), D=6 and
    Dv=5 over 4-dim chunks, per-head partial masks, GQA and a k/v batch broadcast summed, Nq != Nk,
    an empty row."""
    rng = np.random.default_rng(5)
    b = 2 if dtype == np.float32 else 1
    q, k, v = _qkv(rng, dtype, b, 1, 2, 1, 9, 17, 6, 5)
    lay = sa.BlockCSRLayout.from_dense(_mask(rng, 2, 9, 17), (6, 10))
    _block_backward(q, k, v, lay, 0.7, rng, SMALL)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_block_backward_production_geometry(dtype):
    """config.CUDA_BWD_TILES on a causal window: one tile, full and partial blocks."""
    rng = np.random.default_rng(6)
    n = 20
    q, k, v = _qkv(rng, dtype, 1, 1, 1, 1, n, n, 8, 8)
    i = np.arange(n)
    lay = sa.BlockCSRLayout.from_dense((i[:, None] >= i[None]) & (i[:, None] - i[None] < 7), (8, 8))
    _block_backward(q, k, v, lay, 0.5, rng, None)

# ----------------------------------------------------------------------------- selection kernels
# The drivers of sparseattn.backends.cuda._select_kernels take Numba device arrays (the backend
# hands them CuPy views); here they run on simulator arrays against the CPU backend's hooks.
# Integer-valued q and k give exact scores in any summation order, hence many exact ties: the
# selections must then be identical, tie rule included.

from sparseattn.backends.cuda import _select_kernels as SK  # noqa: E402
from sparseattn.select._common import unit_rows  # noqa: E402
from sparseattn.select.lsh import lsh_rotations  # noqa: E402

CPU = sa.backends.get("cpu")
TINY_TOPK = F.Geometry(2, 4, 2, 2, 4)  # 8 threads own 4 queries; 8-key tiles; 4-dim chunks


def _alloc(shape, dtype):
    return cuda.device_array(shape, dtype)


def _same_layout(res, ref):
    indptr, indices, d_indptr, d_indices = res
    np.testing.assert_array_equal(indptr, ref.indptr)
    np.testing.assert_array_equal(indices, ref.indices)
    assert indices.dtype == ref.indices.dtype
    np.testing.assert_array_equal(d_indptr.copy_to_host(), ref.indptr)
    np.testing.assert_array_equal(d_indices.copy_to_host()[: indices.shape[0]], ref.indices)


def _int_qk(rng, dtype, hq, hkv, nq, nk, d):
    return (rng.integers(-2, 3, (hq, nq, d)).astype(dtype),
            rng.integers(-2, 3, (hkv, nk, d)).astype(dtype))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_select_topk_dense(dtype):
    """Thread-per-query heaps over 8-key tiles: GQA, Nq < Nk (causal offset), exact ties, a top_k
    above some rows' causal key count, and top_k = 1."""
    rng = np.random.default_rng(20)
    q, k = _int_qk(rng, dtype, 2, 1, 6, 11, 5)
    for causal, top_k in ([True, 7], [False, 3], [True, 1]) if dtype == np.float32 else ([True, 3],):
        res = SK.topk(_dev(q), _dev(k), top_k, causal, 0, _alloc, geometry=TINY_TOPK)
        _same_layout(res, CPU.topk(q, k, top_k, None, causal))


def test_select_topk_within():
    """One block per row: rows longer than the 4 threads, a per-head layout, empty rows, causal."""
    rng = np.random.default_rng(21)
    q, k = _int_qk(rng, np.float32, 2, 1, 5, 9, 3)
    w = sa.CSRLayout.from_dense(_mask(rng, 2, 5, 9, 0.7))
    for causal in (False, True):
        res = SK.topk(_dev(q), _dev(k), 3, causal, 0, _alloc, within=w,
                      w_dev=(_dev(w.indptr), _dev(w.indices)), threads=4)
        _same_layout(res, CPU.topk(q, k, 3, w, causal))


def test_select_lsh(monkeypatch):
    """Hashing (tile product + argmax over [xR, -xR]), the bucket sort, and rows: the union over
    two rounds, causal, sorted in shared memory and (cap lowered) in place."""
    rng = np.random.default_rng(22)
    qn = unit_rows(np, rng.standard_normal((2, 7, 5)))
    kn = unit_rows(np, rng.standard_normal((1, 9, 5)))
    rot = lsh_rotations(2, 5, 6, seed=3)
    qb = SK.lsh_hash(_dev(qn), _dev(rot), 0, _alloc, geometry=SMALL).copy_to_host()
    kb = SK.lsh_hash(_dev(kn), _dev(rot), 0, _alloc, geometry=SMALL).copy_to_host()
    np.testing.assert_array_equal(qb, CPU.lsh_hash(qn, rot))  # float64: no near-ties here
    np.testing.assert_array_equal(kb, CPU.lsh_hash(kn, rot))
    for causal, cap in ((False, 2048), (True, 4)):
        monkeypatch.setattr(sa.config, "CUDA_SELECT_SORT_CAP", cap)
        res = SK.lsh_select(_dev(qb), _dev(kb), 6, 2, causal, 0, _alloc, threads=4)
        _same_layout(res, CPU.lsh_select(qb, kb, 6, 2, causal))


def test_select_routing():
    """k-means assignment (first maximum), the update (float64 sums in the CPU's order: the same
    bits), and the routing rows with clusters over and under the capacity, causal or not."""
    rng = np.random.default_rng(23)
    qn = unit_rows(np, rng.standard_normal((2, 6, 5)).astype(np.float32))
    kn = unit_rows(np, rng.standard_normal((1, 8, 5)).astype(np.float32))
    cent = unit_rows(np, rng.standard_normal((2, 3, 5)).astype(np.float32))
    labels, sims = SK.kmeans_assign(_dev(kn), _dev(cent), 0, _alloc, geometry=SMALL)
    ref_l, ref_s = CPU.kmeans_assign(kn, cent)
    np.testing.assert_array_equal(labels.copy_to_host(), ref_l)
    np.testing.assert_allclose(sims.copy_to_host(), ref_s, rtol=1e-6, atol=1e-6)
    q_l, _ = CPU.kmeans_assign(qn, cent)
    new = SK.kmeans_update(_dev(qn), _dev(kn), _dev(q_l), _dev(ref_l), _dev(cent), 0, _alloc,
                           threads=4).copy_to_host()
    np.testing.assert_allclose(new, CPU.kmeans_update(qn, kn, q_l, ref_l, cent), rtol=2e-7, atol=0)
    ref_s = np.round(ref_s * 4).astype(np.float32)  # ties among the similarities
    for causal, cap in ((False, 2), (True, 8)):
        res = SK.routing_select(_dev(q_l), _dev(ref_l), _dev(ref_s), 3, cap, causal, 0, _alloc,
                                threads=4)
        _same_layout(res, CPU.routing_select(q_l, ref_l, ref_s, 3, cap, causal))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("hq, hkv, n, cap, d, dv",
                         [(6, 2, 37, 40, 8, 5), (2, 2, 1, 3, 8, 4), (9, 1, 70, 70, 40, 3)])
def test_decode_split_k(dtype, hq, hkv, n, cap, d, dv, monkeypatch):
    """The split-K decode kernels (several splits, a partial last tile, GQA groups larger than a
    block's share of heads) against the CPU decode kernel; positions past n are poison."""
    from sparseattn import config
    from sparseattn.backends.cuda import decode as DEC

    monkeypatch.setattr(config, "CUDA_DECODE_MIN_SPLIT_KEYS", 8)  # several splits at these sizes
    assert n < 9 or DEC.splits(hkv, n, 4) > 1

    rng = np.random.default_rng(hq * 100 + n)
    q = rng.standard_normal((hq, d)).astype(dtype)  # d=40: K staged in several chunks
    k = rng.standard_normal((hkv, cap, d)).astype(dtype)
    v = rng.standard_normal((hkv, cap, dv)).astype(dtype)
    k[:, n:] = np.nan
    v[:, n:] = np.nan
    ws = {}
    out, lse = DEC.decode(_dev(q), _dev(k), _dev(v), n, 0.3, ws, sms=4, threads=8)
    ref_o, ref_l = sa.backends.get("cpu").decode(q, k, v, n, 0.3)
    tol = TOL[dtype]
    np.testing.assert_allclose(out.copy_to_host(), ref_o, **tol)
    np.testing.assert_allclose(lse.copy_to_host(), ref_l, **tol)
    again, _ = DEC.decode(_dev(q), _dev(k), _dev(v), n, 0.3, ws, sms=4, threads=8)  # workspace reused
    np.testing.assert_array_equal(again.copy_to_host(), out.copy_to_host())


def test_decode_empty_cache():
    from sparseattn.backends.cuda import decode as DEC

    q = np.ones((2, 4), np.float32)
    kv = np.ones((1, 3, 4), np.float32)
    out, lse = DEC.decode(_dev(q), _dev(kv), _dev(kv), 0, 1.0, {}, sms=2, threads=8)
    assert (out.copy_to_host() == 0).all() and np.isneginf(lse.copy_to_host()).all()


@pytest.mark.parametrize("pos", [0, 5, 7])
def test_decode_nan_key_makes_its_rows_nan(pos):
    """A NaN key inside [0, n) gives NaN for the query heads that read it (as the reference),
    wherever it falls in the reduction tree; the other key/value head's rows stay exact."""
    from sparseattn.backends.cuda import decode as DEC

    rng = np.random.default_rng(pos)
    q = rng.standard_normal((4, 8)).astype(np.float32)
    k = rng.standard_normal((2, 8, 8)).astype(np.float32)
    v = rng.standard_normal((2, 8, 3)).astype(np.float32)
    k[0, pos, 0] = np.nan
    out, lse = DEC.decode(_dev(q), _dev(k), _dev(v), 8, 0.5, {}, sms=1, threads=8)
    out, lse = out.copy_to_host(), lse.copy_to_host()
    assert np.isnan(lse[:2]).all() and np.isnan(out[:2]).all()
    ref_o, ref_l = sa.backends.get("cpu").decode(q, k, v, 8, 0.5)
    assert np.isnan(ref_l[:2]).all()
    np.testing.assert_allclose(out[2:], ref_o[2:], **TOL[np.float32])
