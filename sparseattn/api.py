"""Public entry points: validate, normalise shapes, dispatch to one backend.

The API never loops over tokens; backends never validate user input.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np

from . import _bfloat16
from . import backends as _backends
from ._validation import (array_info, check_layout_fits, check_memory, check_qkv, check_scale,
                          compute_dtype)
from .layout import BlockCSRLayout, CSRLayout

__all__ = ["attention", "attention_backward", "resolve_layout"]

_LAYOUT_CACHE: OrderedDict = OrderedDict()
_LAYOUT_CACHE_SIZE = 32
_LAYOUT_LOCK = threading.Lock()


def resolve_layout(pattern_or_layout, n_q, n_k, heads, block_size=None, name="pattern_or_layout"):
    """The layout a call uses: a given layout as is, or a pattern built for these sizes.

    Patterns are frozen descriptions, so the layouts built from them are cached (LRU, keyed by
    the pattern and the sizes) and reused across calls.

    Parameters
    ----------
    pattern_or_layout : CSRLayout, BlockCSRLayout or pattern
        A pattern is anything with a ``layout(n_q, n_k, *, heads, block_size)`` method.
    n_q, n_k, heads : int
        Query length, key length and query heads of the call.
    block_size : tuple of int or None
        Block size the backend prefers; ``None`` builds a token-level CSR layout.

    Returns
    -------
    CSRLayout or BlockCSRLayout
    """
    obj = pattern_or_layout
    if isinstance(obj, (CSRLayout, BlockCSRLayout)):
        lay = obj
    elif callable(getattr(obj, "layout", None)):
        key = None
        try:
            key = (obj, n_q, n_k, heads, block_size)
            hash(key)
        except TypeError:  # a pattern holding arrays: not hashable, build every time
            key = None
        lay = None
        if key is not None:
            with _LAYOUT_LOCK:
                lay = _LAYOUT_CACHE.get(key)
                if lay is not None:
                    _LAYOUT_CACHE.move_to_end(key)
        if lay is None:
            lay = obj.layout(n_q, n_k, heads=heads, block_size=block_size)
            if key is not None:
                with _LAYOUT_LOCK:
                    _LAYOUT_CACHE[key] = lay
                    while len(_LAYOUT_CACHE) > _LAYOUT_CACHE_SIZE:
                        _LAYOUT_CACHE.popitem(last=False)
    else:
        raise TypeError(
            f"{name} must be a CSRLayout, a BlockCSRLayout or a pattern (see sparseattn.patterns), "
            f"got {type(obj).__name__}"
        )
    check_layout_fits(lay, n_q, n_k, heads, name)
    return lay


def _on_host(x):
    return isinstance(x, np.ndarray) or not (
        hasattr(x, "__cuda_array_interface__") or hasattr(x, "__dlpack_device__")
    )


def _to_backend_4d(backend, x, batch, dtype, keep_batch_one):
    """Backend array of shape ``(B, H, N, D)``, C-contiguous, in ``dtype``.

    ``keep_batch_one``: a k/v without batch dims (or all ones) stays at B = 1 and is broadcast by
    the kernel instead of copied.
    """
    xp = backend.xp
    raw = _bfloat16.bits(x)  # bfloat16 travels as its bit patterns (no interchange carries it)
    arr = backend.asarray(x if raw is None else raw)
    if raw is not None:
        arr = _bfloat16.from_bits(arr, dtype)
    tail = arr.shape[-3:]
    own = arr.shape[:-3]
    if keep_batch_one and int(np.prod(own, dtype=np.int64)) == 1:
        arr = arr.reshape((1,) + tail)
    else:
        if own != batch:
            arr = xp.broadcast_to(arr, batch + tail)
        arr = arr.reshape((int(np.prod(batch, dtype=np.int64)),) + tail)
    return xp.ascontiguousarray(arr, dtype=dtype)


def _prepare(q, k, v, pattern_or_layout, scale, backend):
    info = check_qkv(q, k, v)
    scale = check_scale(scale, info["d"])
    be = _backends.resolve(backend, q, k, v)
    lay = resolve_layout(pattern_or_layout, info["nq"], info["nk"], info["hq"], be.block_size)
    b = int(np.prod(info["batch"], dtype=np.int64))
    itemsize = info["dtype"].itemsize
    check_memory(b * info["hq"] * info["nq"] * (info["dv"] + info["d"] + 1) * itemsize,
                 "attention output and query copy")
    dtype = info["dtype"]
    with np.errstate(over="ignore", under="ignore"):
        cast_scale = dtype.type(scale)
    if not 0 < cast_scale < np.inf:  # 1e300 is finite, but not in float32
        raise ValueError(f"scale={scale!r} is not a finite positive {dtype.name} (the compute dtype)")
    if hasattr(be, "compute_dtype"):  # a backend with native float16 kernels may keep float16
        dtype = be.compute_dtype(info, lay)
    qb = _to_backend_4d(be, q, info["batch"], dtype, keep_batch_one=False)
    kb = _to_backend_4d(be, k, info["batch"], dtype, keep_batch_one=True)
    vb = _to_backend_4d(be, v, info["batch"], dtype, keep_batch_one=True)
    return info, scale, be, lay, qb, kb, vb


def _finish(be, arr, shape, dtype, host, to_torch=False):
    """``arr`` in the caller's ``dtype`` and kind (``to_torch``: torch bfloat16 inputs)."""
    arr = arr.reshape(shape)
    if _bfloat16.is_bfloat16(dtype):
        return _bfloat16.finish(arr, host, to_torch)
    if arr.dtype != dtype:
        arr = arr.astype(dtype)
    if to_torch:
        return _bfloat16.to_torch(arr)
    return be.to_numpy(arr) if host else arr


def attention(q, k, v, pattern_or_layout, scale=None, backend=None, return_lse=False):
    """Sparse scaled dot-product attention: each query attends only to the keys its layout allows.

    ``out[..., h, i, :] = sum_j softmax_j(scale * q[h, i] . k[g(h), j]) v[g(h), j]`` over the allowed
    ``j``, with ``g(h) = h // (Hq // Hkv)`` (grouped-query attention).

    Parameters
    ----------
    q : array, shape (..., Hq, Nq, D)
    k : array, shape (..., Hkv, Nk, D)
        ``Hq`` must be a multiple of ``Hkv`` (GQA; ``Hkv = 1`` is MQA). Leading batch dimensions of
        ``q`` and ``k``/``v`` broadcast.
    v : array, shape (..., Hkv, Nk, Dv)
    pattern_or_layout : pattern, CSRLayout or BlockCSRLayout
        Which keys each query sees. A layout must have shape ``(Nq, Nk)`` and 1 or ``Hq`` heads.
    scale : float, optional
        Multiplies ``q . k``; defaults to ``1 / sqrt(D)``. Must be finite and positive.
    backend : str, optional
        ``"cpu"``, ``"cuda"`` or ``"reference"``; default from :func:`sparseattn.use_backend`,
        ``SPARSEATTN_BACKEND``, or the inputs' device.
    return_lse : bool, default False
        Also return the log-sum-exp of the scaled scores per query (natural log).

    Returns
    -------
    out : array, shape (broadcast batch..., Hq, Nq, Dv)
        Same array kind as the inputs; dtype of the inputs (float16 and bfloat16 compute in
        float32, or on tensor cores with float32 accumulation). bfloat16 inputs are NumPy arrays
        of ``ml_dtypes.bfloat16`` (NumPy out), torch tensors (torch tensors out, ``lse`` too) or
        CuPy arrays where CuPy holds bfloat16. A query with no allowed key gives 0.
    lse : array, shape (broadcast batch..., Hq, Nq)
        Only with ``return_lse``; ``-inf`` for a query with no allowed key. float32 or float64.

    Notes
    -----
    Non-contiguous inputs are copied to contiguous ones; read-only inputs are fine.
    """
    info, scale, be, lay, qb, kb, vb = _prepare(q, k, v, pattern_or_layout, scale, backend)
    out, lse = be.forward(qb, kb, vb, lay, scale)
    host = all(_on_host(x) for x in (q, k, v))
    tt = _bfloat16.wants_torch(q, k, v)
    batch = info["batch"]
    out = _finish(be, out, batch + (info["hq"], info["nq"], info["dv"]), info["in_dtype"], host, tt)
    if not return_lse:
        return out
    return out, _finish(be, lse, batch + (info["hq"], info["nq"]), info["dtype"], host, tt)


def attention_backward(q, k, v, out, lse, dout, pattern_or_layout, scale=None, backend=None):
    """Gradients of :func:`attention` with respect to ``q``, ``k`` and ``v``.

    Parameters
    ----------
    q, k, v, pattern_or_layout, scale, backend
        As given to :func:`attention`.
    out, lse : array
        The forward pass's output and log-sum-exp (``attention(..., return_lse=True)``).
    dout : array, shape of ``out``
        Gradient of the loss with respect to ``out``.

    Returns
    -------
    dq, dk, dv : arrays shaped like ``q``, ``k``, ``v``
        ``dk`` and ``dv`` are summed over the query heads of each GQA group and over any batch
        dimension ``k``/``v`` were broadcast along.
    """
    info, scale, be, lay, qb, kb, vb = _prepare(q, k, v, pattern_or_layout, scale, backend)
    batch, hq, nq, dv = info["batch"], info["hq"], info["nq"], info["dv"]
    want_out = batch + (hq, nq, dv)
    for name, x, shape in (("out", out, want_out), ("dout", dout, want_out),
                           ("lse", lse, batch + (hq, nq))):
        got, got_dtype = array_info(x, name)
        if got != shape:
            raise ValueError(
                f"{name} must have shape {shape} for q {array_info(q, 'q')[0]} and "
                f"v {array_info(v, 'v')[0]}, got {got}"
            )
        compute_dtype((name, got_dtype))  # a complex or integer array: TypeError, not a cast
    dtype = info["dtype"]
    ob = _to_backend_4d(be, out, batch, dtype, False)
    dob = _to_backend_4d(be, dout, batch, dtype, False)
    nb = int(np.prod(batch, dtype=np.int64))  # (not -1: ambiguous when nq == 0)
    lb = be.xp.ascontiguousarray(be.asarray(lse), dtype=dtype).reshape(nb, hq, nq)
    dq, dk, dvv = be.backward(qb, kb, vb, ob, lb, dob, lay, scale)
    host = all(_on_host(x) for x in (q, k, v))
    tt = _bfloat16.wants_torch(q, k, v)
    grads = []
    for g, x, name in ((dq, q, "q"), (dk, k, "k"), (dvv, v, "v")):
        # a k/v kept at batch 1 is already summed over the batch; otherwise fold broadcast dims
        g = g.reshape((batch if g.shape[0] != 1 or not batch else (1,) * len(batch)) + g.shape[1:])
        x_shape, x_dtype = array_info(x, name)  # (array_info: lists and other array-likes too)
        grads.append(_finish(be, _reduce_to(g, x_shape), x_shape, x_dtype, host, tt))
    return tuple(grads)


def _reduce_to(g, shape):
    """Sum a gradient over the dimensions its operand was broadcast along."""
    if tuple(g.shape) == shape:
        return g
    extra = g.ndim - len(shape)
    if extra > 0:
        g = g.sum(axis=tuple(range(extra)))
    axes = tuple(i for i, (a, b) in enumerate(zip(g.shape, shape)) if b == 1 and a != 1)
    if axes:
        g = g.sum(axis=axes, keepdims=True)
    return g.reshape(shape)
