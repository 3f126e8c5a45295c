"""Backend registry: ``cpu`` (Numba), ``cuda`` (Numba-CUDA + CuPy) and ``reference`` (dense NumPy).

A backend is chosen, in this order, by the ``backend=`` argument of a call, by the innermost
``with sparseattn.use_backend(name):`` block, by the environment variable ``SPARSEATTN_BACKEND``,
and otherwise by the inputs: ``cuda`` when they live on a GPU, else ``cpu``.

TF32 tensor cores for float32 on ``cuda`` (opt-in, inexact) are chosen the same way: the innermost
``with sparseattn.use_tf32():`` block, else ``SPARSEATTN_TF32=1|0``, else ``config.CUDA_ALLOW_TF32``.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import os

import numpy as np

from .base import Backend, BackendUnavailable

__all__ = ["Backend", "BackendUnavailable", "available", "get", "use_backend", "resolve", "register",
           "why_unavailable", "use_tf32", "tf32_enabled"]

# name -> "module:Class"; imported lazily so that `import sparseattn` never needs a GPU stack.
_REGISTRY = {
    "cpu": "sparseattn.backends.cpu:CPUBackend",
    "cuda": "sparseattn.backends.cuda:CUDABackend",
    "reference": "sparseattn.backends.reference:ReferenceBackend",
}
_INSTANCES: dict[str, Backend] = {}
_CURRENT: contextvars.ContextVar[str | None] = contextvars.ContextVar("sparseattn_backend", default=None)
_TF32: contextvars.ContextVar[bool | None] = contextvars.ContextVar("sparseattn_tf32", default=None)


def register(name, target):
    """Register a backend class (or ``"module:Class"`` string) under ``name``."""
    _REGISTRY[name] = target
    _INSTANCES.pop(name, None)


def _backend_class(name):
    target = _REGISTRY[name]
    if isinstance(target, str):
        mod, _, cls = target.partition(":")
        try:
            target = getattr(importlib.import_module(mod), cls)
        except ImportError as exc:  # a missing optional dependency
            raise BackendUnavailable(f"backend {name!r} cannot be imported: {exc}") from exc
    return target


def why_unavailable(name):
    """Empty string when backend ``name`` is usable, else the reason and how to fix it."""
    if name not in _REGISTRY:
        return f"unknown backend {name!r}; known: {sorted(_REGISTRY)}"
    try:
        ok, reason = _backend_class(name).availability()
    except BackendUnavailable as exc:
        return str(exc)
    return "" if ok else reason


def available():
    """Names of the backends usable on this machine, e.g. ``["cpu", "reference"]``."""
    return [name for name in _REGISTRY if not why_unavailable(name)]


def get(name) -> Backend:
    """The backend instance called ``name``; raises a helpful error if it cannot run here."""
    if isinstance(name, Backend):
        return name
    if not isinstance(name, str):
        raise TypeError(f"backend must be a name (str) or a Backend, got {type(name).__name__}")
    inst = _INSTANCES.get(name)
    if inst is not None:
        return inst
    if name not in _REGISTRY:
        raise ValueError(f"unknown backend {name!r}; choose one of {sorted(_REGISTRY)}")
    reason = why_unavailable(name)
    if reason:
        raise BackendUnavailable(reason)
    inst = _INSTANCES[name] = _backend_class(name)()
    return inst


@contextlib.contextmanager
def use_backend(name):
    """Context manager: run the ``sparseattn`` calls inside on backend ``name``.

    Examples
    --------
    >>> import sparseattn as sa
    >>> with sa.use_backend("cpu"):
    ...     pass
    """
    get(name)  # fail early, at the `with`, if it cannot run here
    token = _CURRENT.set(name)
    try:
        yield get(name)
    finally:
        _CURRENT.reset(token)


def _on_device(array):
    return hasattr(array, "__cuda_array_interface__") or (
        hasattr(array, "__dlpack_device__") and _dlpack_is_cuda(array)
    )


def _dlpack_is_cuda(array):
    try:
        dev_type, _ = array.__dlpack_device__()
    except Exception:
        return False
    return int(dev_type) in (2, 3)  # kDLCUDA, kDLCUDAHost


def resolve(backend=None, *arrays) -> Backend:
    """Pick the backend for a call (argument > context > environment > inputs)."""
    if backend is not None:
        return get(backend)
    name = _CURRENT.get()
    if name is not None:
        return get(name)
    env = os.environ.get("SPARSEATTN_BACKEND", "").strip()
    if env:
        return get(env)
    if any(_on_device(a) for a in arrays):
        return get("cuda")
    return get("cpu")


@contextlib.contextmanager
def use_tf32(enabled=True):
    """Context manager: float32 block-CSR forward passes on ``cuda`` inside use TF32 tensor cores.

    TF32 keeps 10 mantissa bits of each operand (float32 keeps 23), so results are no longer exact
    float32: see docs/backends.rst for the measured error. Other backends and shapes the
    tensor-core kernel does not take (CSR layouts, ``D != Dv``, head dimensions outside
    ``config.CUDA_TC_HEAD_DIMS``) and the backward pass stay exact.

    Parameters
    ----------
    enabled : bool, default True
        ``False`` turns TF32 off inside the block (whatever the environment or config say).

    Examples
    --------
    >>> import sparseattn as sa
    >>> with sa.use_tf32():
    ...     sa.backends.tf32_enabled()
    True
    """
    if not isinstance(enabled, (bool, np.bool_)):  # "0" from an env file must not mean True
        raise TypeError(f"use_tf32(enabled) must be a bool, got {type(enabled).__name__} {enabled!r}")
    token = _TF32.set(bool(enabled))
    try:
        yield
    finally:
        _TF32.reset(token)


def tf32_enabled():
    """Whether float32 may run on TF32 tensor cores now (context > ``SPARSEATTN_TF32`` > config)."""
    flag = _TF32.get()
    if flag is not None:
        return flag
    env = os.environ.get("SPARSEATTN_TF32", "").strip().lower()
    if env:
        if env not in ("0", "1", "true", "false", "yes", "no", "on", "off"):
            raise ValueError(f"SPARSEATTN_TF32 must be 0 or 1 (or true/false, yes/no, on/off), got {env!r}")
        return env in ("1", "true", "yes", "on")
    from .. import config

    return bool(config.CUDA_ALLOW_TF32)
