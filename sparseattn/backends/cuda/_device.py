"""Moving arrays and layouts to the GPU, and handing CuPy arrays to Numba-CUDA kernels.

CuPy is the array type of the ``cuda`` backend. Inputs may be CuPy arrays, anything exposing
``__cuda_array_interface__`` (Numba device arrays, PyTorch CUDA tensors) or DLPack, or host
arrays, which are copied over. A layout's index arrays are copied to each device once and kept
in the layout's ``_cache``, so repeated calls with the same layout (patterns are LRU-cached by the
API) move no index data.
"""

from __future__ import annotations

import functools
import threading

import numpy as np

_LOCK = threading.Lock()


def cupy():
    import cupy as cp

    return cp


def as_cupy(x):
    """``x`` as a CuPy array on the current device, without a copy where the data is already there."""
    cp = cupy()
    if isinstance(x, cp.ndarray):
        return x
    if hasattr(x, "__cuda_array_interface__"):
        return cp.asarray(x)
    if hasattr(x, "__dlpack__") and hasattr(x, "__dlpack_device__"):
        dev_type, _ = x.__dlpack_device__()
        if int(dev_type) in (2, 3):  # kDLCUDA, kDLCUDAHost
            return cp.from_dlpack(x)
    return cp.asarray(np.asarray(x))


def numba_array(x):
    """A Numba device-array view of a CuPy array (no copy, no stream synchronisation)."""
    from numba import cuda

    return cuda.as_cuda_array(x, sync=False)


def numba_stream():
    """The current CuPy stream as a Numba stream, so kernels of both run in order."""
    from numba import cuda

    ptr = cupy().cuda.get_current_stream().ptr
    return cuda.external_stream(ptr) if ptr else cuda.default_stream()


def device_layout(layout):
    """Device copies of a layout's index arrays, cached on the layout per device.

    Returns
    -------
    dict
        ``indptr`` (int64), ``indices`` (int32/int64; int32 for block layouts) and, for block
        layouts, ``mask_index`` (int32) and ``masks`` (uint8 ``(max(n_masks, 1), bq, bk)``), all
        CuPy arrays.
    """
    cp = cupy()
    key = ("cuda", cp.cuda.runtime.getDevice())
    cached = layout._cache.get(key)
    if cached is not None:
        return cached
    with _LOCK:
        cached = layout._cache.get(key)
        if cached is not None:
            return cached
        arrays = {"indptr": cp.asarray(layout.indptr), "indices": cp.asarray(layout.indices)}
        if hasattr(layout, "mask_index"):
            # block columns always fit int32 (the host copy may be int64 past
            # config.INT32_NNZ_LIMIT entries): the CuPy kernels read int32
            arrays["indices"] = cp.asarray(layout.indices.astype(np.int32, copy=False))
            arrays["mask_index"] = cp.asarray(layout.mask_index)
            masks = layout.masks
            if masks.shape[0] == 0:  # kernels take a real array; no block points into it
                masks = np.zeros((1,) + layout.block_size, bool)
            arrays["masks"] = cp.asarray(masks.view(np.uint8))
        layout._cache[key] = arrays
        return arrays


@functools.lru_cache(maxsize=None)
def _limits_of(device):
    import cupy as cp

    rt = cp.cuda.runtime
    cc = int(cp.cuda.Device(device).compute_capability)  # "90" on an H200
    optin = getattr(rt, "cudaDevAttrMaxSharedMemoryPerBlockOptin", 97)  # 97 in every CUDA 11-13
    return cc, rt.deviceGetAttribute(optin, device)


def device_limits():
    """``(compute capability as 10 * major + minor, opt-in shared memory per block in bytes)`` of
    the current device, cached: the CuPy kernels need ``cp.async`` (8.0) and their shared memory."""
    import cupy as cp

    return _limits_of(cp.cuda.runtime.getDevice())
