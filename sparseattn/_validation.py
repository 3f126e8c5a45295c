"""Input checks and normalisation shared by every public entry point.

Each check raises ``TypeError`` (wrong kind of thing) or ``ValueError`` (right kind, wrong value)
with the argument's name and the shapes involved, before any kernel runs.
"""

from __future__ import annotations

import math
import os

import numpy as np

from . import _bfloat16, config

_FLOAT_KINDS = {np.dtype(np.float16): np.dtype(np.float32),
                np.dtype(np.float32): np.dtype(np.float32),
                np.dtype(np.float64): np.dtype(np.float64)}
if _bfloat16.BFLOAT16 is not None:  # bfloat16 (ml_dtypes) computes in float32, like float16
    _FLOAT_KINDS[_bfloat16.BFLOAT16] = np.dtype(np.float32)


def array_info(x, name):
    """Shape and dtype of an array-like (NumPy, CuPy, torch, anything with shape and dtype)."""
    if x is None:
        raise TypeError(f"{name} must be an array, got None")
    shape = getattr(x, "shape", None)
    dtype = getattr(x, "dtype", None)
    if shape is None or dtype is None:
        x = np.asarray(x)
        shape, dtype = x.shape, x.dtype
    try:
        dtype = np.dtype(dtype)
    except TypeError:
        if _bfloat16.is_bfloat16(dtype) and _bfloat16.BFLOAT16 is None:
            raise TypeError(f"{name} is bfloat16: {_bfloat16.MISSING}") from None
        dtype = np.dtype(str(dtype).replace("torch.", ""))
    return tuple(int(s) for s in shape), dtype


def compute_dtype(*named):
    """The dtype kernels compute in: float32 for float16/bfloat16/float32, float64 if any input is float64."""
    out = None
    for name, dtype in named:
        if dtype not in _FLOAT_KINDS:
            raise TypeError(
                f"{name} must be float16, float32 or float64 (or bfloat16), got dtype {dtype}"
            )
        c = _FLOAT_KINDS[dtype]
        out = c if out is None else np.promote_types(out, c)
    return out


def check_qkv(q, k, v):
    """Validate the attention operands; return a dict of their dimensions.

    q: (..., Hq, Nq, D), k: (..., Hkv, Nk, D), v: (..., Hkv, Nk, Dv); batch dims of q and k/v broadcast.
    """
    (qs, qd), (ks, kd), (vs, vd) = array_info(q, "q"), array_info(k, "k"), array_info(v, "v")
    for name, s in (("q", qs), ("k", ks), ("v", vs)):
        if len(s) < 3:
            raise ValueError(f"{name} must have shape (..., heads, seq, dim) (rank >= 3), got {s}")
    dtype = compute_dtype(("q", qd), ("k", kd), ("v", vd))
    hq, nq, d = qs[-3:]
    hkv, nk, dk = ks[-3:]
    if dk != d:
        raise ValueError(f"q and k must share the last dimension: q {qs}, k {ks}")
    if vs[-3:-1] != (hkv, nk):
        raise ValueError(f"v must have k's heads and length (..., {hkv}, {nk}, Dv): k {ks}, v {vs}")
    if ks[:-3] != vs[:-3]:
        raise ValueError(f"k and v must have the same batch dimensions: k {ks}, v {vs}")
    if d < 1 or vs[-1] < 1:
        raise ValueError(f"head dimensions must be >= 1: q {qs}, v {vs}")
    if hkv < 1 or hq < 1:
        raise ValueError(f"q and k need at least one head: q {qs}, k {ks}")
    if hq % hkv:
        raise ValueError(
            f"query heads ({hq}) must be a multiple of key/value heads ({hkv}) for GQA/MQA: "
            f"q {qs}, k {ks}"
        )
    try:
        batch = tuple(np.broadcast_shapes(qs[:-3], ks[:-3]))
    except ValueError:
        raise ValueError(f"batch dimensions of q {qs[:-3]} and k {ks[:-3]} do not broadcast") from None
    return {
        "batch": batch, "q_batch": qs[:-3], "kv_batch": ks[:-3], "hq": hq, "hkv": hkv, "nq": nq,
        "nk": nk, "d": d, "dv": vs[-1], "dtype": dtype, "in_dtype": _result_dtype(dtype, qd, kd, vd),
    }


def _result_dtype(compute, *dtypes):
    """The dtype of the output: the inputs' common dtype; the compute dtype where they have none
    (bfloat16 with float16)."""
    try:
        return np.result_type(*dtypes)
    except TypeError:  # numpy's DTypePromotionError
        return compute


def check_scale(scale, d):
    """``None`` gives ``1/sqrt(D)``; otherwise a finite positive real number."""
    if scale is None:
        return 1.0 / math.sqrt(d)
    if isinstance(scale, (bool, np.bool_, str, bytes)):  # float("2") would accept a string
        raise TypeError(f"scale must be a real number, got {scale!r}")
    try:
        value = float(scale)
    except (TypeError, ValueError):
        raise TypeError(f"scale must be a real number, got {type(scale).__name__}") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"scale must be finite and positive, got {scale!r}")
    return value


def check_layout_fits(layout, nq, nk, hq, name="pattern_or_layout"):
    if layout.shape != (nq, nk):
        raise ValueError(
            f"{name} has shape {layout.shape} but q and k give (n_q, n_k) = {(nq, nk)}"
        )
    if layout.heads not in (1, hq):
        raise ValueError(
            f"{name} has {layout.heads} heads; it must have 1 (shared) or q's {hq} heads"
        )


def physical_memory():
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return None


def check_memory(nbytes, what):
    """Refuse, before allocating, a request larger than the machine can hold."""
    total = physical_memory()
    if total and nbytes > config.MAX_MEMORY_FRACTION * total:
        raise MemoryError(
            f"{what} needs {_human(nbytes)}, more than {config.MAX_MEMORY_FRACTION:.0%} "
            f"of this machine's {_human(total)}"
        )


def _human(nbytes):
    """Bytes in the largest binary unit that keeps a leading digit (``0.0 GiB`` says nothing)."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= size:
            return f"{nbytes / size:.1f} {unit}"
    return f"{int(nbytes)} bytes"
