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
