"""The CUDA backend: Numba-CUDA kernels (float32, float64) and a CuPy tensor-core kernel (float16,
bfloat16, and float32 on TF32 tensor cores where :func:`sparseattn.use_tf32` asks for it).

Importing this module never needs a GPU: CuPy and Numba-CUDA are imported when the backend is
used, and :meth:`CUDABackend.availability` says what is missing. Arrays of the backend are CuPy
arrays; work is queued on CuPy's current stream (Numba kernels are launched on that same stream).
"""

from __future__ import annotations

import functools

import numpy as np

from ... import _bfloat16, config
from ...layout import BlockCSRLayout, CSRLayout
from ..base import Backend
from .select import CUDASelection

_INSTALL = ("the cuda backend needs CuPy and numba-cuda: install sparseattn[cuda12] or "
            "sparseattn[cuda13] (pip install 'sparseattn[cuda12]'), matching your CUDA driver")


@functools.lru_cache(maxsize=None)
def _sm_count(device):
    import cupy as cp

    return cp.cuda.Device(device).attributes["MultiProcessorCount"]


def _aligned(*arrays):
    """16-byte aligned data, as the ``cp.async`` copies of the CuPy kernels need."""
    return all(a.data.ptr % 16 == 0 for a in arrays)


def _redo_nonfinite(*arrays):
    """Whether a tiled kernel's results must be recomputed token by token: they hold NaN/inf,
    which a tile product can spread from a bad input entry through ``0 * NaN`` into results that
    do not depend on it; the token-level kernels touch allowed pairs only, so a bad entry then
    reaches exactly what depends on it, as on the CPU. The test costs a device synchronisation
    per call; ``config.CUDA_CHECK_NONFINITE = False`` skips it."""
    if not config.CUDA_CHECK_NONFINITE or not arrays[0].size:
        return False
    import cupy as cp

    def finite(a):
        if _bfloat16.is_bfloat16(a.dtype):  # by its bits: CuPy need not know bfloat16
            return ((a.view(np.uint16) & 0x7F80) != 0x7F80).all()
        return cp.isfinite(a).all()

    ok = finite(arrays[0])
    for a in arrays[1:]:
        ok &= finite(a)
    return not bool(ok)


def _check_grid(q, k):
    """Heads and batch are grid dimensions y and z of every kernel: CUDA allows 65535 of each."""
    for name, x in (("q", q), ("k", k)):
        if x.shape[0] > 65535 or x.shape[1] > 65535:
            raise ValueError(f"the cuda backend takes at most 65535 batch elements and 65535 heads: "
                             f"{name} has shape {tuple(x.shape)} (batch, heads, seq, dim); split the call")
    for name, x in (("q", q), ("k", k)):
        if x.shape[2] > 2**31 - 1:
            raise ValueError(f"{name} has {x.shape[2]} positions, more than the 2**31 - 1 a CUDA grid takes")


class CUDABackend(CUDASelection, Backend):
    """GPU kernels: Numba-CUDA (float32/float64, CSR and block-CSR) and CuPy ``mma.sync`` (float16,
    bfloat16; float32 as TF32 when opted in)."""

    name = "cuda"
    block_size = config.CUDA_BLOCK_SIZE

    @classmethod
    def availability(cls):
        try:
            import cupy
        except Exception as exc:  # ImportError, or a CuPy built for another CUDA
            return False, f"{_INSTALL} ({type(exc).__name__}: {exc})"
        try:
            n = cupy.cuda.runtime.getDeviceCount()
        except Exception as exc:
            return False, f"no GPU found: CuPy cannot reach a CUDA device ({exc})"
        if n < 1:
            return False, "no GPU found: CuPy sees no CUDA device"
        try:
            import numba
            from numba import cuda
        except Exception as exc:
            return False, f"{_INSTALL} ({type(exc).__name__}: {exc})"
        if getattr(numba.config, "ENABLE_CUDASIM", 0):
            return False, "NUMBA_ENABLE_CUDASIM=1 is set: Numba simulates the GPU, the cuda backend is off"
        if not cuda.is_available():
            return False, "no GPU found: numba-cuda cannot use the CUDA driver"
        return True, ""

    # -- arrays -----------------------------------------------------------------------------
    @property
    def xp(self):
        import cupy

        return cupy

    def owns(self, array):
        import cupy

        return isinstance(array, cupy.ndarray)

    def asarray(self, array):
        from ._device import as_cupy

        return as_cupy(array)

    def to_numpy(self, array):
        import cupy

        if _bfloat16.is_bfloat16(array.dtype):  # copied as bit patterns: any CuPy can do that
            return cupy.asnumpy(array.view(cupy.uint16)).view(array.dtype)
        return cupy.asnumpy(array)

    def compute_dtype(self, info, layout):
        """float16 and bfloat16 stay as they are where the tensor-core kernel takes the call
        (bfloat16 only where CuPy holds it; else it is widened exactly to float32); else as the
        API says."""
        if (isinstance(layout, BlockCSRLayout) and info["d"] == info["dv"]
                and info["d"] in config.CUDA_TC_HEAD_DIMS):
            if info["in_dtype"] == np.float16:
                return np.dtype(np.float16)
            if _bfloat16.is_bfloat16(info["in_dtype"]) and _bfloat16.cupy_has_bfloat16():
                return info["in_dtype"]
        return info["dtype"]

    # -- kernels ----------------------------------------------------------------------------
    def forward(self, q, k, v, layout, scale):
        """The forward pass; a block-layout result with NaN/inf in it is redone by the token-level
        kernel (see :func:`_redo_nonfinite`)."""
        out, lse = self._forward(q, k, v, layout, scale)
        if isinstance(layout, BlockCSRLayout) and _redo_nonfinite(out):
            out, lse = self._forward(q, k, v, layout.to_csr(), scale)
        return out, lse

    def _forward(self, q, k, v, layout, scale):
        import cupy as cp

        from .. import tf32_enabled
        from . import forward as _fwd
        from . import simt as _simt
        from . import tensorcore as _tc
        from ._device import device_layout, numba_array, numba_stream

        if not isinstance(layout, (BlockCSRLayout, CSRLayout)):  # the API only passes layouts
            raise TypeError(f"layout must be a CSRLayout or BlockCSRLayout, got {type(layout).__name__}")
        B, Hq, Nq, _ = q.shape
        Dv = v.shape[3]
        _check_grid(q, k)
        bf16 = _bfloat16.is_bfloat16(q.dtype)
        if q.dtype == np.float16 or bf16:
            if isinstance(layout, BlockCSRLayout) and _tc.supported(q, v, layout) and _aligned(q, k, v):
                out = cp.empty((B, Hq, Nq, Dv), q.dtype)
                lse = cp.empty((B, Hq, Nq), np.float32)
                if out.size:
                    _tc.block_forward(q, k, v, device_layout(layout), layout.heads,
                                      layout.block_size, scale, out, lse)
                return out, lse
            # other shapes: exact float32 on the kernels below (bfloat16 widened bit-exactly)
            wide = _bfloat16.widen if bf16 else (lambda x: x.astype(np.float32))
            out, lse = self._forward(wide(q), wide(k), wide(v), layout, scale)
            return (_bfloat16.round_bits(out).view(q.dtype) if bf16 else out.astype(np.float16)), lse
        out = cp.empty((B, Hq, Nq, Dv), q.dtype)
        lse = cp.empty((B, Hq, Nq), q.dtype)
        if out.size == 0 and lse.size == 0:
            return out, lse
        if k.shape[2] == 0 or layout.nnz == 0:  # nothing to attend to anywhere
            out.fill(0)
            lse.fill(-np.inf)
            return out, lse
        dev = device_layout(layout)
        if (q.dtype == np.float32 and isinstance(layout, BlockCSRLayout) and _tc.supported(q, v, layout)
                and _aligned(q, k, v) and tf32_enabled()):  # opted in: inexact, see use_tf32
            _tc.block_forward(q, k, v, dev, layout.heads, layout.block_size, scale, out, lse)
            return out, lse
        if isinstance(layout, BlockCSRLayout) and _simt.supported(q, v, layout) and _aligned(q, k, v):
            _simt.block_forward_f32(q, k, v, dev, layout.heads, layout.block_size, scale, out, lse)
            return out, lse
        stream = numba_stream()
        nq, nk, nv = numba_array(q), numba_array(k), numba_array(v)
        no, nl = numba_array(out), numba_array(lse)
        if isinstance(layout, BlockCSRLayout):
            _fwd.block_forward(nq, nk, nv, numba_array(dev["indptr"]), numba_array(dev["indices"]),
                               numba_array(dev["mask_index"]), numba_array(dev["masks"]),
                               layout.heads, layout.block_size, scale, no, nl, stream=stream)
        else:
            _fwd.csr_forward(nq, nk, nv, numba_array(dev["indptr"]), numba_array(dev["indices"]),
                             layout.heads, scale, no, nl, stream=stream)
        return out, lse

    def decode(self, q, k, v, n, scale, workspace=None):
        """One query per head against a cache's first ``n`` keys: the split-K kernels of
        :mod:`.decode` on the buffers as they are (float32/float64; those of :mod:`.simt_decode`
        where it applies; other dtypes take the generic path through :meth:`forward`)."""
        import cupy as cp

        from . import decode as _dec
        from . import simt_decode as _simt_dec
        from ._device import numba_array, numba_stream

        if q.dtype not in (np.float32, np.float64):
            return super().decode(q, k, v, n, scale, workspace)
        sms = _sm_count(cp.cuda.runtime.getDevice())
        workspace = {} if workspace is None else workspace
        if _simt_dec.supported(q, k, v):
            return _simt_dec.decode(q, k, v, int(n), scale, workspace, sms)
        out, lse = _dec.decode(numba_array(q), numba_array(k), numba_array(v), int(n), scale,
                               workspace, sms, numba_stream(),
                               stream_key=cp.cuda.get_current_stream().ptr)
        return cp.asarray(out), cp.asarray(lse)

    def backward(self, q, k, v, out, lse, dout, layout, scale):
        """Gradients (query-major dq, key-major dk/dv over ``layout.transpose()``, no atomics) in
        the dtype of ``dout``: block layouts take tiled kernels (:mod:`.simt_backward` for
        float32 at the head dimensions it was written for, else :mod:`.backward`'s), token
        layouts :mod:`.backward`'s token-level ones, which also redo a tiled call whose
        gradients came out NaN/inf."""
        import cupy as cp

        from . import backward as _bwd
        from . import simt_backward as _simt_bwd
        from ._device import device_layout, numba_array, numba_stream

        _check_grid(q, k)
        dtype = dout.dtype  # the API's compute dtype (float16 operands arrive here as float32)
        q, k, v = (_bfloat16.widen(x) if _bfloat16.is_bfloat16(x.dtype) else x.astype(dtype, copy=False)
                   for x in (q, k, v))
        dq, dk, dv = cp.zeros_like(q), cp.zeros_like(k), cp.zeros_like(v)
        if q.size == 0 or k.size == 0 or layout.nnz == 0:
            return dq, dk, dv
        delta = (dout * out).sum(axis=-1)
        lse = cp.ascontiguousarray(lse, dtype=dtype)
        if isinstance(layout, BlockCSRLayout):  # tiled; the transpose is cached on the layout
            dev, tdev = device_layout(layout), device_layout(layout.transpose())
            fast = _simt_bwd.supported(q, v)
            if fast:
                q, k, v, dout = (cp.ascontiguousarray(x) for x in (q, k, v, dout))
                fast = _aligned(q, k, v, dout)
            if fast:
                _simt_bwd.block_backward_f32(q, k, v, dout, lse, delta, dev, tdev, layout.heads,
                                             layout.block_size, scale, dq, dk, dv)
            else:
                _bwd.block_backward(*(numba_array(x) for x in (q, k, v, dout, lse, delta)),
                                    {n: numba_array(a) for n, a in dev.items()},
                                    {n: numba_array(a) for n, a in tdev.items()}, layout.heads,
                                    layout.block_size, scale, numba_array(dq), numba_array(dk),
                                    numba_array(dv), stream=numba_stream())
            if not _redo_nonfinite(dq, dk, dv):
                return dq, dk, dv
            layout = layout.to_csr()
            dq, dk, dv = cp.zeros_like(q), cp.zeros_like(k), cp.zeros_like(v)
        dev, tdev = device_layout(layout), device_layout(layout.transpose())
        args = [numba_array(x) for x in (q, k, v, dout, lse, delta)]
        stream = numba_stream()
        _bwd.dq_backward(*args, numba_array(dev["indptr"]), numba_array(dev["indices"]),
                         layout.heads, scale, numba_array(dq), stream=stream)
        _bwd.dkdv_backward(*args, numba_array(tdev["indptr"]), numba_array(tdev["indices"]),
                           layout.heads, scale, numba_array(dk), numba_array(dv), stream=stream)
        return dq, dk, dv
