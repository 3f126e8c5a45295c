"""Input checks and normalisation shared by the selectors (top-k, LSH, routing)."""

from __future__ import annotations

import numpy as np

from .. import backends as _backends
from .._validation import check_qkv


def check_count(value, name, minimum=1):
    """A Python/NumPy integer ``>= minimum`` (bools refused); returned as ``int``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_flag(value, name):
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)


def prepare_qk(q, k, backend, who):
    """Validate ``q`` ``(..., Hq, Nq, D)`` and ``k`` ``(..., Hkv, Nk, D)``; return the backend and
    the two arrays as ``(Hq, Nq, D)`` / ``(Hkv, Nk, D)``, C-contiguous, in the compute dtype.

    A layout has no batch axis, so every leading (batch) dimension must be 1: select per batch
    element and pass each layout to its own attention call.
    """
    info = check_qkv(q, k, k)  # k stands in for v: same checks on q and k, v adds nothing
    for name, x in (("q", q), ("k", k)):
        lead = tuple(np.shape(x))[:-3]
        if int(np.prod(lead, dtype=np.int64)) != 1:
            raise ValueError(
                f"{who} selects one layout per head and a layout has no batch axis, so {name}'s "
                f"leading dimensions must all be 1; got {name} of shape {tuple(np.shape(x))}. "
                f"Call {who} once per batch element."
            )
    be = _backends.resolve(backend, q, k)
    dtype = info["dtype"]
    xp = be.xp
    qh, kh = (be.asarray(x) for x in (q, k))
    qh = xp.ascontiguousarray(qh.reshape(qh.shape[-3:]), dtype=dtype)
    kh = xp.ascontiguousarray(kh.reshape(kh.shape[-3:]), dtype=dtype)
    for name, x in (("q", qh), ("k", kh)):
        if x.size and not bool(xp.isfinite(x).all()):
            raise ValueError(f"{name} must be finite (no NaN or inf): {who} ranks keys by q . k")
    return be, qh, kh, info


def unit_rows(xp, x):
    """Rows scaled to unit length, C-contiguous, same dtype (a zero row stays zero).

    Each row is first divided by its largest magnitude, so no square overflows or underflows.
    """
    tiny = np.finfo(x.dtype).tiny
    y = x / xp.maximum(xp.abs(x).max(axis=-1, keepdims=True), tiny)
    norm = xp.sqrt((y * y).sum(axis=-1, keepdims=True))
    return xp.ascontiguousarray(y / xp.maximum(norm, tiny), dtype=x.dtype)
