"""The cuda backend.

* Everywhere: importing it needs no GPU, and asking for it without one says what to install.
* Everywhere numba-cuda installs (CI included): its Numba-CUDA kernels under the CUDA simulator,
  in a subprocess (``tests/_cuda_sim_cases.py``), against the CPU backend.
* On a GPU (``pytest -m gpu tests/test_cuda.py``): every kernel, the tensor-core float16 path and
  the array interchange against the CPU backend; skipped where ``cuda`` is not available.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import sparseattn as sa
from sparseattn.backends.cuda import CUDABackend

HERE = Path(__file__).resolve().parent


def test_import_needs_no_gpu_and_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # as if CuPy were not installed
    ok, reason = CUDABackend.availability()
    assert not ok
    assert "sparseattn[cuda12]" in reason and "sparseattn[cuda13]" in reason


def test_unavailable_backend_refuses_with_reason():
    if "cuda" in sa.backends.available():
        pytest.skip("a GPU is usable here")
    with pytest.raises(sa.backends.BackendUnavailable, match="cuda|GPU|CuPy"):
        sa.backends.get("cuda")


def test_grid_limits_are_refused_with_shapes():
    from sparseattn.backends.cuda import _check_grid

    q = np.empty((70000, 2, 3, 4), np.float32)  # batch is grid dimension z: at most 65535
    k = np.empty((1, 1, 3, 4), np.float32)
    with pytest.raises(ValueError, match=r"65535.*\(70000, 2, 3, 4\)"):
        _check_grid(q, k)
    _check_grid(q[:7], k)


@pytest.mark.skipif(importlib.util.find_spec("numba_cuda") is None, reason="numba-cuda not installed")
def test_kernels_under_cuda_simulator():
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", PYTHONPATH=str(HERE.parent))
    env.pop("PYTEST_XDIST_WORKER", None)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
         str(HERE / "_cuda_sim_cases.py")],
        cwd=HERE.parent, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout


# ----------------------------------------------------------------------------- on a GPU

gpu = pytest.mark.skipif("cuda" not in sa.backends.available(), reason="no usable CUDA GPU here")


def _mask(rng, heads, nq, nk, density=0.3):
    m = rng.random((heads, nq, nk)) < density
    i, j = np.arange(nq)[:, None], np.arange(nk)[None]
    m |= (i >= j) & (i - j < 40)  # a band, so full blocks exist too
    m[:, 3] = False  # an empty row
    return m


def _qkv(rng, dtype, B, Bk, Hq, Hkv, Nq, Nk, D, Dv):
    return (rng.standard_normal((B, Hq, Nq, D)).astype(dtype),
            rng.standard_normal((Bk, Hkv, Nk, D)).astype(dtype),
            rng.standard_normal((Bk, Hkv, Nk, Dv)).astype(dtype))


def _compare(q, k, v, lay, dtype, atol=None):
    import cupy as cp

    out, lse = sa.attention(cp.asarray(q), cp.asarray(k), cp.asarray(v), lay, backend="cuda",
                            return_lse=True)
    assert isinstance(out, cp.ndarray) and out.dtype == dtype
    rdt = np.float32 if dtype == np.float16 else dtype  # float16 operands, exact float32 oracle
    ref_o, ref_l = sa.attention(q.astype(rdt), k.astype(rdt), v.astype(rdt), lay, backend="cpu",
                                return_lse=True)
    out, lse = cp.asnumpy(out), cp.asnumpy(lse)
    tol = {np.float32: dict(rtol=1e-5, atol=2e-6), np.float64: dict(rtol=1e-12, atol=1e-13),
           np.float16: dict(rtol=0, atol=atol or 4e-3)}[np.dtype(dtype).type]
    np.testing.assert_allclose(out.astype(ref_o.dtype), ref_o, **tol)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(ref_l))
    fin = np.isfinite(ref_l)
    np.testing.assert_allclose(lse[fin], ref_l[fin], **(tol if dtype != np.float16 else dict(atol=2e-3)))
    return out, lse


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind", ["block64", "block_odd", "csr"])
def test_gpu_matches_cpu(dtype, kind):
    rng = np.random.default_rng(7)
    q, k, v = _qkv(rng, dtype, 2, 1, 4, 2, 301, 333, 72, 40)
    m = _mask(rng, 4, 301, 333)
    lay = {"block64": lambda: sa.BlockCSRLayout.from_dense(m, (64, 64)),
           "block_odd": lambda: sa.BlockCSRLayout.from_dense(m[:1], (48, 80)),
           "csr": lambda: sa.CSRLayout.from_dense(m)}[kind]()
    out, lse = _compare(q, k, v, lay, dtype)
    assert np.all(out[:, :, 3] == 0) and np.all(np.isneginf(lse[:, :, 3]))


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("block", [(64, 64), (128, 128), (128, 64), (32, 96)])
def test_gpu_float16_tensor_cores(d, block):
    rng = np.random.default_rng(8)
    q, k, v = _qkv(rng, np.float16, 1, 1, 4, 2, 517, 400, d, d)
    lay = sa.BlockCSRLayout.from_dense(_mask(rng, 4, 517, 400), block)
    _compare(q, k, v, lay, np.float16)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("block", [(64, 64), (128, 128), (48, 80), (200, 33)])
def test_gpu_float32_simt_kernel(d, block):
    """The CuPy float32 kernel (D == Dv in config.CUDA_SIMT_HEAD_DIMS): query blocks over several
    64-row tiles or clipped, key blocks over several 64-key tiles or one partial one."""
    rng = np.random.default_rng(11)
    q, k, v = _qkv(rng, np.float32, 2, 1, 4, 2, 333, 301, d, d)
    _compare(q, k, v, sa.BlockCSRLayout.from_dense(_mask(rng, 4, 333, 301), block), np.float32)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("minb", [2, 3])
def test_gpu_float16_q_in_shared_memory(d, minb):
    """The tensor-core kernel variant that keeps Q in shared memory (config.CUDA_TC_Q_IN_SMEM)."""
    import cupy as cp

    from sparseattn.backends.cuda import tensorcore
    from sparseattn.backends.cuda._device import device_layout

    rng = np.random.default_rng(13)
    q, k, v = _qkv(rng, np.float16, 1, 1, 2, 1, 300, 260, d, d)
    lay = sa.BlockCSRLayout.from_dense(_mask(rng, 2, 300, 260), (32, 96))
    out = cp.empty(q.shape, np.float16)
    lse = cp.empty(q.shape[:3], np.float32)
    tensorcore.block_forward_f16(cp.asarray(q), cp.asarray(k), cp.asarray(v), device_layout(lay), lay.heads,
                                 lay.block_size, 0.3, out, lse, warps=2, minb=minb, qsmem=True)
    ref, ref_l = sa.attention(q.astype(np.float32), k.astype(np.float32), v.astype(np.float32), lay,
                              scale=0.3, backend="cpu", return_lse=True)
    np.testing.assert_allclose(cp.asnumpy(out).astype(np.float32), ref, atol=4e-3)
    fin = np.isfinite(ref_l)
    np.testing.assert_array_equal(np.isneginf(cp.asnumpy(lse)), ~fin)
    np.testing.assert_allclose(cp.asnumpy(lse)[fin], ref_l[fin], atol=2e-3)


@gpu
@pytest.mark.gpu
def test_gpu_float16_fallbacks():
    """float16 outside the tensor-core kernel's shapes (CSR, D != Dv, D = 40) runs in float32."""
    rng = np.random.default_rng(9)
    m = _mask(rng, 1, 90, 90)
    for d, dv, lay in [(64, 64, sa.CSRLayout.from_dense(m)),
                       (64, 32, sa.BlockCSRLayout.from_dense(m, (64, 64))),
                       (40, 40, sa.BlockCSRLayout.from_dense(m, (64, 64)))]:
        q, k, v = _qkv(rng, np.float16, 1, 1, 2, 2, 90, 90, d, dv)
        _compare(q, k, v, lay, np.float16, atol=2e-3)


@gpu
@pytest.mark.gpu
def test_gpu_array_kinds_and_layout_cache():
    import cupy as cp

    from sparseattn.backends.cuda._device import device_layout

    rng = np.random.default_rng(10)
    q, k, v = _qkv(rng, np.float32, 1, 1, 2, 2, 130, 130, 16, 16)
    lay = sa.BlockCSRLayout.from_dense(_mask(rng, 1, 130, 130), (64, 64))
    ref = sa.attention(q, k, v, lay, backend="cpu")
    host = sa.attention(q, k, v, lay, backend="cuda")  # NumPy in, NumPy out
    assert isinstance(host, np.ndarray)
    np.testing.assert_allclose(host, ref, rtol=1e-5, atol=2e-6)
    assert device_layout(lay) is device_layout(lay)  # moved once, cached on the layout
    with cp.cuda.Stream(non_blocking=True) as s:  # work follows the current stream
        dev = sa.attention(cp.asarray(q), cp.asarray(k), cp.asarray(v), lay)  # device in -> cuda
        s.synchronize()
    np.testing.assert_allclose(cp.asnumpy(dev), ref, rtol=1e-5, atol=2e-6)
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        tq, tk, tv = (torch.as_tensor(x, device="cuda") for x in (q, k, v))
        out = sa.attention(tq, tk, tv, lay)
        assert isinstance(out, cp.ndarray)
        np.testing.assert_allclose(cp.asnumpy(out), ref, rtol=1e-5, atol=2e-6)


@gpu
@pytest.mark.gpu
def test_gpu_empty_layout():
    import cupy as cp

    q = cp.ones((1, 2, 5, 8), np.float32)
    lay = sa.CSRLayout(np.zeros(6, np.int64), np.zeros(0, np.int64), (5, 5))
    out, lse = sa.attention(q, q, q, lay, return_lse=True)
    assert cp.all(out == 0) and cp.all(cp.isneginf(lse))


@gpu
@pytest.mark.gpu
@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), nq=st.integers(1, 150), nk=st.integers(1, 150),
       bq=st.integers(1, 130), bk=st.integers(1, 130), d=st.integers(1, 70),
       dtype=st.sampled_from([np.float32, np.float64]), block=st.booleans())
def test_gpu_random_shapes(seed, nq, nk, bq, bk, d, dtype, block):
    rng = np.random.default_rng(seed)
    q, k, v = _qkv(rng, dtype, 1, 1, 2, 1, nq, nk, d, d)
    m = rng.random((nq, nk)) < 0.4
    lay = sa.BlockCSRLayout.from_dense(m, (bq, bk)) if block else sa.CSRLayout.from_dense(m)
    _compare(q, k, v, lay, dtype)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind", ["block", "csr"])
def test_gpu_backward_matches_reference(dtype, kind):
    """dq, dk, dv: GQA groups and a k/v broadcast over the batch are summed, without atomics."""
    import cupy as cp

    rng = np.random.default_rng(12)
    q, k, v = _qkv(rng, dtype, 2, 1, 4, 2, 150, 170, 24, 20)
    m = _mask(rng, 4, 150, 170)
    lay = sa.BlockCSRLayout.from_dense(m, (64, 64)) if kind == "block" else sa.CSRLayout.from_dense(m)
    out, lse = sa.attention(q, k, v, lay, backend="reference", return_lse=True)
    dout = rng.standard_normal(out.shape).astype(dtype)
    want = sa.attention_backward(q, k, v, out, lse, dout, lay, backend="reference")
    got = sa.attention_backward(*(cp.asarray(x) for x in (q, k, v, out, lse, dout)), lay, backend="cuda")
    tol = {np.float32: dict(rtol=1e-4, atol=1e-5), np.float64: dict(rtol=1e-10, atol=1e-12)}[dtype]
    for g, w in zip(got, want):
        assert isinstance(g, cp.ndarray) and g.shape == w.shape
        np.testing.assert_allclose(cp.asnumpy(g), w, **tol)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("d, dv", [(64, 64), (128, 128), (72, 40)])
@pytest.mark.parametrize("block", [(64, 64), (128, 128), (48, 80), (200, 33)])
@pytest.mark.parametrize("kernels", ["cupy", "numba"])
def test_gpu_tiled_block_backward_matches_cpu(dtype, d, dv, block, kernels, monkeypatch):
    """The tiled block backward: blocks over several tiles or clipped, partial masks, GQA and a
    k/v batch broadcast summed, an empty row; against the CPU backend. ``cupy``: the float32 CUDA
    C++ kernels where they apply (D == Dv in config.CUDA_SIMT_HEAD_DIMS); ``numba``: the Numba
    kernels everywhere."""
    rng = np.random.default_rng(13)
    q, k, v = _qkv(rng, dtype, 2, 1, 4, 2, 333, 301, d, dv)
    lay = sa.BlockCSRLayout.from_dense(_mask(rng, 4, 333, 301), block)
    _compare_tiled_backward(q, k, v, lay, kernels, monkeypatch)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kernels", ["cupy", "numba"])
def test_gpu_tiled_block_backward_batch_and_shared_layout(dtype, kernels, monkeypatch):
    """k/v with their own batch (no broadcast sum), a layout shared by all 4 query heads (GQA
    groups of 2), Nq != Nk."""
    rng = np.random.default_rng(14)
    q, k, v = _qkv(rng, dtype, 2, 2, 4, 2, 200, 260, 64, 64)
    lay = sa.BlockCSRLayout.from_dense(_mask(rng, 1, 200, 260), (48, 80))
    _compare_tiled_backward(q, k, v, lay, kernels, monkeypatch)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("where", ["q", "k", "v", "dout"])
def test_gpu_tiled_block_backward_nonfinite_input(where, monkeypatch):
    """A NaN in one input reaches exactly the gradients that depend on it, as on the CPU (the
    tiled kernels would spread it through 0 * NaN; such calls are redone token by token)."""
    rng = np.random.default_rng(15)
    q, k, v = _qkv(rng, np.float32, 1, 1, 2, 2, 150, 150, 64, 64)
    lay = sa.BlockCSRLayout.from_dense(_mask(rng, 2, 150, 150), (64, 64))
    arrs = dict(q=q, k=k, v=v, dout=rng.standard_normal(q.shape).astype(np.float32))
    arrs[where][0, 1, 100, 7] = np.nan
    # the forward of the same (bad) inputs, as in a training step
    out, lse = sa.attention(q, k, v, lay, backend="cpu", return_lse=True)
    want = sa.attention_backward(arrs["q"], arrs["k"], arrs["v"], out, lse, arrs["dout"], lay,
                                 backend="cpu")
    got = _compare_tiled_backward(arrs["q"], arrs["k"], arrs["v"], lay, "cupy", monkeypatch,
                                  out=out, lse=lse, dout=arrs["dout"], want=want)
    assert any(np.isnan(g).any() for g in got)



@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("where", ["q", "k", "v"])
def test_gpu_block_forward_nan_input(dtype, where):
    """A NaN in q, k or v on the tiled kernels (CUDA C++ float32, Numba float64, tensor-core
    float16): the same rows non-finite as on the CPU backend, every other row equal: a bad entry
    never leaks into rows that do not attend it (such calls are redone token by token). (+-inf
    inputs: the GPU token kernel may give a row NaN or 0 where the CPU gives the other.)"""
    import cupy as cp

    rng = np.random.default_rng(16)
    q, k, v = _qkv(rng, dtype, 1, 1, 2, 2, 200, 200, 64, 64)
    lay = sa.BlockCSRLayout.from_dense(_mask(rng, 2, 200, 200), (64, 64))
    {"q": q, "k": k, "v": v}[where][0, 1, 120, 5] = np.nan
    rdt = np.float32 if dtype == np.float16 else dtype
    ref_o, ref_l = sa.attention(q.astype(rdt), k.astype(rdt), v.astype(rdt), lay, backend="cpu",
                                return_lse=True)
    out, lse = sa.attention(cp.asarray(q), cp.asarray(k), cp.asarray(v), lay, backend="cuda",
                            return_lse=True)
    out, lse = cp.asnumpy(out).astype(rdt), cp.asnumpy(lse)
    fin = np.isfinite(ref_o)
    assert not fin.all()
    np.testing.assert_array_equal(np.isfinite(out), fin)
    np.testing.assert_array_equal(np.isfinite(lse), np.isfinite(ref_l))
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(ref_l))
    tol = {np.float32: 1e-5, np.float64: 1e-12, np.float16: 4e-3}[dtype]
    np.testing.assert_allclose(out[fin], ref_o[fin], rtol=tol, atol=tol)
    lfin = np.isfinite(ref_l)
    np.testing.assert_allclose(lse[lfin], ref_l[lfin], rtol=tol, atol=tol)

def _compare_tiled_backward(q, k, v, lay, kernels, monkeypatch, out=None, lse=None, dout=None,
                            want=None):
    """GPU gradients against the CPU backend's; ``kernels``: ``cupy`` (the CUDA C++ kernels, which
    must take the call where they apply: float32, D == Dv) or ``numba`` (forced)."""
    import cupy as cp

    from sparseattn.backends.cuda import simt_backward

    calls = []
    if kernels == "numba":
        monkeypatch.setattr(sa.config, "CUDA_SIMT_HEAD_DIMS", ())
    elif q.dtype != np.float32 or q.shape[-1] != v.shape[-1]:
        pytest.skip("the CuPy kernels take float32 with D == Dv only")
    else:
        launch = simt_backward.block_backward_f32
        monkeypatch.setattr(simt_backward, "block_backward_f32",
                            lambda *a, **kw: calls.append(1) or launch(*a, **kw))
    if out is None:
        out, lse = sa.attention(q, k, v, lay, backend="cpu", return_lse=True)
        dout = np.random.default_rng(0).standard_normal(out.shape).astype(q.dtype)
        want = sa.attention_backward(q, k, v, out, lse, dout, lay, backend="cpu")
    got = sa.attention_backward(*(cp.asarray(x) for x in (q, k, v, out, lse, dout)), lay, backend="cuda")
    assert bool(calls) == (kernels == "cupy")
    tol = {np.float32: dict(rtol=1e-4, atol=2e-5), np.float64: dict(rtol=1e-10, atol=1e-12)}[q.dtype.type]
    got = [cp.asnumpy(g) for g in got]
    for g, w in zip(got, want):
        np.testing.assert_array_equal(np.isnan(g), np.isnan(w))
        fin = np.isfinite(w)
        np.testing.assert_allclose(g[fin], w[fin], **tol)
    return got

# ----------------------------------------------------------------------------- bfloat16, TF32

def _bf16():
    return np.dtype(pytest.importorskip("ml_dtypes").bfloat16)


def _compare_bf16(out, lse, q, k, v, lay, scale=None):
    """bfloat16 against the CPU backend on the same bfloat16 operands (float32 there, rounded once):
    the tensor cores round P to bfloat16 (8 bits) before P V and the output is rounded once, so
    |diff| <= 1e-2 for outputs of size ~1 (bfloat16 spacing is 2**-7 on [1, 2)); lse to 2e-3."""
    ref, ref_l = sa.attention(q, k, v, lay, scale=scale, backend="cpu", return_lse=True)
    assert out.dtype == ref.dtype == _bf16() and out.shape == ref.shape
    np.testing.assert_allclose(out.astype(np.float32), ref.astype(np.float32), rtol=0, atol=1e-2)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(ref_l))
    fin = np.isfinite(ref_l)
    np.testing.assert_allclose(lse[fin], ref_l[fin], rtol=0, atol=2e-3)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("block", [(64, 64), (128, 128), (48, 80), (200, 33)])
def test_gpu_bfloat16_tensor_cores(d, block):
    """NumPy bfloat16 in, NumPy bfloat16 out: GQA, k/v broadcast over the batch, partial and
    clipped blocks, an empty row."""
    rng = np.random.default_rng(21)
    bf = _bf16()
    q, k, v = (x.astype(bf) for x in _qkv(rng, np.float32, 2, 1, 4, 2, 333, 301, d, d))
    lay = sa.BlockCSRLayout.from_dense(_mask(rng, 4, 333, 301), block)
    out, lse = sa.attention(q, k, v, lay, backend="cuda", return_lse=True)
    assert isinstance(out, np.ndarray)
    _compare_bf16(out, lse, q, k, v, lay)
    assert np.all(out[:, :, 3].astype(np.float32) == 0) and np.all(np.isneginf(lse[:, :, 3]))


@gpu
@pytest.mark.gpu
def test_gpu_bfloat16_array_kinds_and_fallbacks():
    """torch bfloat16 CUDA tensors in, torch bfloat16 out (viewed as int16 on the way); CuPy
    bfloat16 where CuPy has it; shapes the tensor cores do not take run exact float32."""
    import cupy as cp

    from sparseattn import _bfloat16

    rng = np.random.default_rng(22)
    bf = _bf16()
    q, k, v = (x.astype(bf) for x in _qkv(rng, np.float32, 1, 1, 4, 1, 200, 260, 64, 64))
    lay = sa.BlockCSRLayout.from_dense(_mask(rng, 1, 200, 260), (64, 64))
    want = sa.attention(q, k, v, lay, backend="cuda")
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        tq, tk, tv = (torch.from_numpy(x.view(np.int16)).cuda().view(torch.bfloat16) for x in (q, k, v))
        out, lse = sa.attention(tq, tk, tv, lay, return_lse=True)  # device tensors pick cuda
        assert out.dtype == torch.bfloat16 and out.is_cuda and lse.dtype == torch.float32
        np.testing.assert_array_equal(out.view(torch.int16).cpu().numpy(), want.view(np.int16))
    if _bfloat16.cupy_has_bfloat16():
        out = sa.attention(*(cp.asarray(x.view(np.uint16)).view(bf) for x in (q, k, v)), lay)
        assert isinstance(out, cp.ndarray) and out.dtype == bf
        np.testing.assert_array_equal(cp.asnumpy(out.view(cp.uint16)), want.view(np.uint16))
    m = _mask(rng, 1, 90, 90)
    for d, dv, lay in [(64, 64, sa.CSRLayout.from_dense(m)),
                       (64, 32, sa.BlockCSRLayout.from_dense(m, (64, 64))),
                       (40, 40, sa.BlockCSRLayout.from_dense(m, (64, 64)))]:
        q, k, v = (x.astype(bf) for x in _qkv(rng, np.float32, 1, 1, 2, 2, 90, 90, d, dv))
        out, lse = sa.attention(q, k, v, lay, backend="cuda", return_lse=True)
        ref = sa.attention(q, k, v, lay, backend="cpu")  # both exact float32, rounded once
        np.testing.assert_allclose(out.astype(np.float32), ref.astype(np.float32), rtol=2**-7, atol=1e-6)


@gpu
@pytest.mark.gpu
def test_gpu_bfloat16_backward():
    """Gradients of bfloat16 operands: float32 kernels on the widened operands, rounded once (the
    CPU and GPU sum in different orders, so a gradient may land one bfloat16 step apart)."""
    rng = np.random.default_rng(24)
    bf = _bf16()
    q, k, v = (x.astype(bf) for x in _qkv(rng, np.float32, 2, 1, 4, 2, 150, 170, 64, 64))
    lay = sa.BlockCSRLayout.from_dense(_mask(rng, 4, 150, 170), (64, 64))
    out, lse = sa.attention(q, k, v, lay, backend="cpu", return_lse=True)
    dout = rng.standard_normal(out.shape).astype(bf)
    want = sa.attention_backward(q, k, v, out, lse, dout, lay, backend="cpu")
    got = sa.attention_backward(q, k, v, out, lse, dout, lay, backend="cuda")
    for g, w in zip(got, want):
        assert isinstance(g, np.ndarray) and g.dtype == bf and g.shape == w.shape
        np.testing.assert_allclose(g.astype(np.float32), w.astype(np.float32), rtol=2**-7, atol=1e-5)


#: TF32 keeps 10 mantissa bits (operands rounded to nearest, relative error <= 2**-11): scores of
#: unit-variance q, k at scale 1/sqrt(D) are off by ~1e-3, outputs of size ~1 by a few 1e-4.
TF32_TOL = dict(rtol=0, atol=4e-3)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("block", [(64, 64), (128, 128), (48, 80), (200, 33)])
def test_gpu_tf32_opt_in(d, block, monkeypatch):
    """float32 on TF32 tensor cores only when asked for, within TF32's precision of the exact CPU
    result; off by default (the exact kernel then gives float32 accuracy)."""
    import cupy as cp

    monkeypatch.delenv("SPARSEATTN_TF32", raising=False)
    rng = np.random.default_rng(23)
    q, k, v = _qkv(rng, np.float32, 2, 1, 4, 2, 333, 301, d, d)
    lay = sa.BlockCSRLayout.from_dense(_mask(rng, 4, 333, 301), block)
    ref, ref_l = sa.attention(q, k, v, lay, backend="cpu", return_lse=True)
    dq, dk, dv = (cp.asarray(x) for x in (q, k, v))
    exact = cp.asnumpy(sa.attention(dq, dk, dv, lay))
    np.testing.assert_allclose(exact, ref, rtol=1e-5, atol=2e-6)
    with sa.use_tf32():
        out, lse = (cp.asnumpy(x) for x in sa.attention(dq, dk, dv, lay, return_lse=True))
    assert out.dtype == np.float32 and not np.array_equal(out, exact)  # the TF32 kernel ran
    np.testing.assert_allclose(out, ref, **TF32_TOL)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(ref_l))
    fin = np.isfinite(ref_l)
    np.testing.assert_allclose(lse[fin], ref_l[fin], **TF32_TOL)
    assert np.all(out[:, :, 3] == 0)
    monkeypatch.setenv("SPARSEATTN_TF32", "1")  # the environment variable, as for backends
    np.testing.assert_array_equal(cp.asnumpy(sa.attention(dq, dk, dv, lay)), out)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("hq, hkv, n", [(32, 8, 5000), (16, 1, 70000), (4, 4, 1), (6, 2, 37),
                                      (12, 1, 3000)])
@pytest.mark.parametrize("d, dv", [(128, 96), (128, 128), (64, 64)])
def test_gpu_decode_kernel_matches_cpu(dtype, hq, hkv, n, d, dv):
    """The split-K decode kernels (many splits at n=70000, a 16-head group over two blocks; the
    CUDA C++ partial pass for float32 at D == Dv) against the CPU decode kernel; cache positions
    past n hold NaN and must not be read."""
    import cupy as cp

    rng = np.random.default_rng(n)
    cap = n + 7
    q = rng.standard_normal((hq, d)).astype(dtype)
    k = rng.standard_normal((hkv, cap, d)).astype(dtype)
    v = rng.standard_normal((hkv, cap, dv)).astype(dtype)
    k[:, n:] = np.nan
    v[:, n:] = np.nan
    be = sa.backends.get("cuda")
    ws = {}
    out, lse = be.decode(cp.asarray(q), cp.asarray(k), cp.asarray(v), n, 0.1, ws)
    ref_o, ref_l = sa.backends.get("cpu").decode(q, k, v, n, 0.1)
    tol = dict(rtol=1e-5, atol=2e-6) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(cp.asnumpy(out), ref_o, **tol)
    np.testing.assert_allclose(cp.asnumpy(lse), ref_l, **tol)
    fast = dtype == np.float32 and d == dv
    assert ("cuda_fast_decode" if fast else "cuda_decode") in ws  # partials kept for the next token


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("d", [64, 128])
def test_gpu_fast_decode_nan_key_and_strided_cache(d):
    """The CUDA C++ decode pass: a NaN key makes its group's rows NaN (as on the CPU), other rows
    stay exact; a cache that is a strided view (every other row of a buffer) reads the right rows."""
    import cupy as cp

    from sparseattn.backends.cuda import simt_decode

    rng = np.random.default_rng(d)
    q = rng.standard_normal((8, d)).astype(np.float32)
    big_k = rng.standard_normal((2, 2 * 3000, d)).astype(np.float32)
    big_v = rng.standard_normal((2, 2 * 3000, d)).astype(np.float32)
    k, v = big_k[:, ::2], big_v[:, ::2]
    k_dev, v_dev = cp.asarray(big_k)[:, ::2], cp.asarray(big_v)[:, ::2]
    assert simt_decode.supported(cp.asarray(q), k_dev, v_dev)
    be = sa.backends.get("cuda")
    out, lse = be.decode(cp.asarray(q), k_dev, v_dev, 2999, 0.1)
    ref_o, ref_l = sa.backends.get("cpu").decode(q, np.ascontiguousarray(k), np.ascontiguousarray(v), 2999, 0.1)
    np.testing.assert_allclose(cp.asnumpy(out), ref_o, rtol=1e-5, atol=2e-6)
    np.testing.assert_allclose(cp.asnumpy(lse), ref_l, rtol=1e-5, atol=2e-6)
    k_dev[1, 1234, 5] = np.nan  # kv head 1 serves query heads 4..7
    out, lse = (cp.asnumpy(x) for x in be.decode(cp.asarray(q), k_dev, v_dev, 2999, 0.1))
    assert np.isnan(out[4:]).all() and np.isfinite(out[:4]).all()
    assert np.isnan(lse[4:]).all() and np.isfinite(lse[:4]).all()
    np.testing.assert_allclose(out[:4], ref_o[:4], rtol=1e-5, atol=2e-6)


@pytest.mark.gpu
@gpu
def test_gpu_kvcache_decodes_like_cpu():
    """A rolling sinks + window cache on the GPU, token by token, against the same cache on the CPU."""
    import cupy as cp

    pat = sa.patterns.sinks(4) | sa.patterns.sliding_window(64)
    caches = {b: sa.KVCache(pat, 2, 32, dtype=np.float32, backend=b) for b in ("cpu", "cuda")}
    rng = np.random.default_rng(0)
    for step in range(150):
        k, v = (rng.standard_normal((2, 1, 32)).astype(np.float32) for _ in range(2))
        q = rng.standard_normal((6, 1, 32)).astype(np.float32)
        outs = {}
        for b, c in caches.items():
            c.append(k, v)
            outs[b] = c.attend(q)
        np.testing.assert_allclose(cp.asnumpy(outs["cuda"]), outs["cpu"], rtol=1e-5, atol=2e-6)
