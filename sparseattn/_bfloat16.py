"""bfloat16 operands: the dtype (from ``ml_dtypes``, optional) and moving its bits between kinds.

NumPy has no bfloat16 of its own: ``ml_dtypes`` provides one (NumPy arrays of it convert to and
from float32 like any float dtype). Neither ``__cuda_array_interface__`` nor every DLPack consumer
carries bfloat16, so torch tensors and NumPy arrays of it travel as their 16-bit patterns
(``int16``/``uint16`` views) and become bfloat16 again, or are widened exactly to float32, where
they land. Kernels compute in float32 (the tensor-core kernel multiplies bfloat16 operands and
accumulates in float32); results are rounded back to bfloat16 (round to nearest even).
"""

from __future__ import annotations

import functools

import numpy as np

try:  # optional: without it, bfloat16 inputs are refused with a message saying so
    import ml_dtypes as _ml_dtypes

    BFLOAT16 = np.dtype(_ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover - ml_dtypes is installed wherever torch or jax is
    BFLOAT16 = None

MISSING = "bfloat16 needs the ml_dtypes package (pip install ml_dtypes, or sparseattn[bf16])"


def is_bfloat16(dtype):
    """Whether ``dtype`` (a NumPy dtype, or anything whose name is ``bfloat16``) is bfloat16."""
    if BFLOAT16 is not None and dtype == BFLOAT16:
        return True
    return str(dtype).replace("torch.", "") == "bfloat16"


def _is_torch_bf16(x):
    return type(x).__module__.startswith("torch") and str(getattr(x, "dtype", "")) == "torch.bfloat16"


def wants_torch(*arrays):
    """A torch bfloat16 tensor among the inputs: results come back as torch tensors (CuPy and
    NumPy may have no bfloat16 to return them in)."""
    return any(_is_torch_bf16(x) for x in arrays)


def bits(x):
    """The 16-bit patterns of a bfloat16 torch tensor or NumPy array (a view, no copy); ``None``
    for anything else (CuPy arrays of bfloat16 pass as they are)."""
    if _is_torch_bf16(x):
        import torch

        return x.detach().view(torch.int16)
    if isinstance(x, np.ndarray) and is_bfloat16(x.dtype):
        return x.view(np.uint16)
    return None


@functools.lru_cache(maxsize=None)
def cupy_has_bfloat16():
    """Whether the installed CuPy holds arrays of ``ml_dtypes.bfloat16`` (CuPy >= 14)."""
    if BFLOAT16 is None:
        return False
    try:
        import cupy as cp

        return cp.zeros(2, BFLOAT16).view(cp.uint16).dtype == np.uint16
    except Exception:
        return False


def _xp(arr):
    return np if isinstance(arr, np.ndarray) else __import__("cupy")


def from_bits(arr, dtype):
    """Bit patterns ``arr`` (16-bit integers, NumPy or CuPy) as ``dtype``: bfloat16 (a view) or a
    wider float (exact: bfloat16 is the upper half of a float32)."""
    if BFLOAT16 is None:
        raise TypeError(MISSING)
    xp = _xp(arr)
    arr = arr.view(xp.uint16)
    if is_bfloat16(dtype) and (xp is np or cupy_has_bfloat16()):
        return arr.view(BFLOAT16)
    wide = (arr.astype(xp.uint32) << 16).view(xp.float32)
    return wide if dtype in (None, np.float32) or is_bfloat16(dtype) else wide.astype(dtype)


def widen(arr):
    """A bfloat16 array (NumPy or CuPy) as float32, exactly."""
    return from_bits(arr.view(_xp(arr).uint16), np.float32)


def round_bits(arr):
    """float32/float64 values rounded to bfloat16 (nearest, ties to even; NaN stays NaN), as uint16
    bit patterns in the array's own kind."""
    xp = _xp(arr)
    if is_bfloat16(arr.dtype):
        return arr.view(xp.uint16)
    if xp is np:
        return arr.astype(BFLOAT16).view(np.uint16)
    return _rne_bits(arr, xp)


def _rne_bits(arr, xp):
    """Round to nearest even on the float32 bit patterns (any array module; CuPy may have no
    bfloat16 cast): add 0x7FFF plus the lowest kept bit, drop the low 16 bits."""
    u = xp.ascontiguousarray(arr, dtype=xp.float32).view(xp.uint32)
    r = ((u + xp.uint32(0x7FFF) + ((u >> 16) & xp.uint32(1))) >> 16).astype(xp.uint16)
    return xp.where(xp.isnan(arr), xp.uint16(0x7FC0), r)


def finish(arr, host, to_torch):
    """A result in bfloat16: a torch tensor (``to_torch``), a NumPy array (``host``) or a CuPy array.

    ``arr``: NumPy or CuPy, bfloat16 or wider (rounded here).
    """
    if BFLOAT16 is None:
        raise TypeError(MISSING)
    b = round_bits(arr)
    if to_torch:
        import torch

        return torch.from_dlpack(b.view(_xp(b).int16)).view(torch.bfloat16)
    if _xp(b) is not np and host:
        b = __import__("cupy").asnumpy(b)
    if _xp(b) is np:
        return b.view(BFLOAT16)
    if not cupy_has_bfloat16():  # a CuPy bfloat16 input implies a CuPy that holds them
        raise TypeError("this CuPy has no bfloat16 arrays: pass torch tensors or NumPy arrays")
    return b.view(BFLOAT16)


def to_torch(arr):
    """A result that is not bfloat16 (lse, float32) as a torch tensor, for torch bfloat16 inputs."""
    import torch

    return torch.from_dlpack(arr) if _xp(arr) is not np else torch.from_numpy(np.ascontiguousarray(arr))
