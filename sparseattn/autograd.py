"""Sparse attention as a differentiable function, for training loops.

* NumPy (any framework, or none): :func:`attention_vjp` returns the output and a closure that maps
  the output's gradient to the inputs' gradients; :func:`attention_fwd` / :func:`attention_bwd`
  are the same pair with the saved state made explicit.
* PyTorch: :func:`torch_attention`, a ``torch.autograd.Function`` (tensors cross to NumPy/CuPy and
  back through DLPack, without copies where the memory allows).
* JAX: :func:`jax_attention`, a ``jax.custom_vjp`` whose forward and backward passes run through
  ``jax.pure_callback``, so it works under ``jax.jit`` and ``jax.grad``.

The frameworks are imported only when their adapter is called; none of them is a dependency.
The backward pass is :func:`sparseattn.attention_backward`: flash-style, it keeps only ``out`` and
the log-sum-exp, never a probability matrix.

Examples
--------
>>> import numpy as np, sparseattn as sa
>>> q = k = v = np.random.default_rng(0).standard_normal((2, 16, 8))
>>> mask = np.tril(np.ones((16, 16), bool))
>>> out, vjp = sa.autograd.attention_vjp(q, k, v, sa.CSRLayout.from_dense(mask))
>>> dq, dk, dv = vjp(np.ones_like(out))
>>> dq.shape
(2, 16, 8)
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._validation import check_qkv
from .api import attention, attention_backward

__all__ = ["Residuals", "attention_fwd", "attention_bwd", "attention_vjp", "torch_attention",
           "jax_attention"]


# ----------------------------------------------------------------------------- NumPy


@dataclass(frozen=True)
class Residuals:
    """What the backward pass needs from the forward pass: the inputs, ``out`` and ``lse``."""

    q: Any
    k: Any
    v: Any
    out: Any
    lse: Any
    pattern_or_layout: Any
    scale: float | None
    backend: Any


def attention_fwd(q, k, v, pattern_or_layout, scale=None, backend=None):
    """Forward pass that keeps what :func:`attention_bwd` needs.

    Parameters
    ----------
    q, k, v, pattern_or_layout, scale, backend
        As for :func:`sparseattn.attention`.

    Returns
    -------
    out : array, shape (batch..., Hq, Nq, Dv)
    residuals : Residuals
        Holds references to the inputs (not copies): do not modify them in place before the
        backward pass.
    """
    out, lse = attention(q, k, v, pattern_or_layout, scale=scale, backend=backend, return_lse=True)
    return out, Residuals(q, k, v, out, lse, pattern_or_layout, scale, backend)


def attention_bwd(residuals, dout):
    """Gradients ``(dq, dk, dv)`` from the residuals of :func:`attention_fwd` and ``dout``.

    Parameters
    ----------
    residuals : Residuals
    dout : array, shape of ``out``
        Gradient of the loss with respect to the output.

    Returns
    -------
    dq, dk, dv : arrays shaped like ``q``, ``k``, ``v`` (summed over broadcast batch dimensions and
        over the query heads of each GQA group).
    """
    if not isinstance(residuals, Residuals):
        raise TypeError(f"residuals must come from attention_fwd, got {type(residuals).__name__}")
    r = residuals
    return attention_backward(r.q, r.k, r.v, r.out, r.lse, dout, r.pattern_or_layout, scale=r.scale,
                              backend=r.backend)


def attention_vjp(q, k, v, pattern_or_layout, scale=None, backend=None):
    """Output and vector-Jacobian product of sparse attention (the ``jax.vjp`` convention).

    Parameters
    ----------
    q, k, v, pattern_or_layout, scale, backend
        As for :func:`sparseattn.attention`.

    Returns
    -------
    out : array
    vjp : callable
        ``vjp(dout) -> (dq, dk, dv)``; may be called several times.
    """
    out, res = attention_fwd(q, k, v, pattern_or_layout, scale, backend)

    def vjp(dout):
        return attention_bwd(res, dout)

    return out, vjp


# ----------------------------------------------------------------------------- PyTorch

_TORCH_FN = None
_TORCH_KEEP = ()  # torch dtypes NumPy has (set when torch is first used)


def _import(name):
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise ImportError(f"this adapter needs {name}, which is not installed ({exc})") from exc


def _torch_to_array(t):
    """A detached tensor as a NumPy array (CPU) or CuPy array (CUDA), through DLPack."""
    t = t.detach()
    if t.dtype not in _TORCH_KEEP:
        t = t.float()  # bfloat16 and the like: NumPy has no such dtype
    if t.is_cuda:
        return _import("cupy").from_dlpack(t)
    try:
        return np.from_dlpack(t)
    except (BufferError, RuntimeError, TypeError):
        return t.numpy()


def _array_to_torch(a, like):
    torch = _import("torch")
    try:
        t = torch.from_dlpack(a)
    except (BufferError, RuntimeError, TypeError):
        t = torch.as_tensor(np.ascontiguousarray(a))
    return t.to(dtype=like.dtype, device=like.device)


def _torch_function():
    global _TORCH_FN, _TORCH_KEEP
    if _TORCH_FN is not None:
        return _TORCH_FN
    torch = _import("torch")
    _TORCH_KEEP = (torch.float16, torch.float32, torch.float64)

    class SparseAttentionFunction(torch.autograd.Function):
        """``torch.autograd.Function`` running sparseattn's forward and backward kernels."""

        @staticmethod
        def forward(ctx, q, k, v, pattern_or_layout, scale, backend):
            arrays = [_torch_to_array(t) for t in (q, k, v)]
            out, res = attention_fwd(*arrays, pattern_or_layout, scale, backend)
            ctx.res = res
            ctx.like = (q, k, v)
            return _array_to_torch(out, q)

        @staticmethod
        def backward(ctx, dout):
            grads = attention_bwd(ctx.res, _torch_to_array(dout.contiguous()))
            wanted = ctx.needs_input_grad[:3]
            return tuple(_array_to_torch(g, x) if need else None
                         for g, x, need in zip(grads, ctx.like, wanted)) + (None, None, None)

    _TORCH_FN = SparseAttentionFunction
    return _TORCH_FN


def torch_attention(q, k, v, pattern_or_layout, scale=None, backend=None):
    """Differentiable sparse attention on PyTorch tensors.

    Parameters
    ----------
    q, k, v : torch.Tensor
        Shapes as for :func:`sparseattn.attention`; CPU tensors run on the ``cpu`` backend, CUDA
        tensors (through CuPy) on ``cuda``. bfloat16 computes in float32.
    pattern_or_layout, scale, backend
        As for :func:`sparseattn.attention`.

    Returns
    -------
    torch.Tensor
        The output, with ``q``'s dtype and device, attached to the autograd graph.
    """
    return _torch_function().apply(q, k, v, pattern_or_layout, scale, backend)


# ----------------------------------------------------------------------------- JAX


def _pure_callback(jax, fn, shapes, *args):
    try:
        return jax.pure_callback(fn, shapes, *args, vmap_method="sequential")
    except TypeError:  # JAX before vmap_method
        return jax.pure_callback(fn, shapes, *args)


def jax_attention(q, k, v, pattern_or_layout, scale=None, backend=None):
    """Differentiable sparse attention on JAX arrays (``jax.custom_vjp`` over host callbacks).

    Parameters
    ----------
    q, k, v : jax.Array
        Shapes as for :func:`sparseattn.attention`; float32 or float64 (float16 computes in
        float32). The kernels run on the host through ``jax.pure_callback``.
    pattern_or_layout, scale, backend
        As for :func:`sparseattn.attention`; fixed for the call (closed over, not traced).

    Returns
    -------
    jax.Array
        The output; ``jax.grad`` / ``jax.vjp`` through it run :func:`sparseattn.attention_backward`.
    """
    jax = _import("jax")
    info = check_qkv(q, k, v)
    out_dtype = info["in_dtype"]
    out_spec = jax.ShapeDtypeStruct(info["batch"] + (info["hq"], info["nq"], info["dv"]), out_dtype)
    lse_spec = jax.ShapeDtypeStruct(info["batch"] + (info["hq"], info["nq"]), info["dtype"])
    grad_specs = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v))

    def host_forward(qq, kk, vv):
        out, lse = attention(np.asarray(qq), np.asarray(kk), np.asarray(vv), pattern_or_layout,
                             scale=scale, backend=backend, return_lse=True)
        return out.astype(out_dtype, copy=False), lse.astype(info["dtype"], copy=False)

    def host_backward(qq, kk, vv, out, lse, dout):
        grads = attention_backward(*(np.asarray(x) for x in (qq, kk, vv, out, lse, dout)),
                                   pattern_or_layout, scale=scale, backend=backend)
        return tuple(g.astype(s.dtype, copy=False) for g, s in zip(grads, grad_specs))

    @jax.custom_vjp
    def fn(qq, kk, vv):
        return _pure_callback(jax, host_forward, (out_spec, lse_spec), qq, kk, vv)[0]

    def fwd(qq, kk, vv):
        out, lse = _pure_callback(jax, host_forward, (out_spec, lse_spec), qq, kk, vv)
        return out, (qq, kk, vv, out, lse)

    def bwd(res, dout):
        return _pure_callback(jax, host_backward, grad_specs, *res, dout)

    fn.defvjp(fwd, bwd)
    return fn(q, k, v)
