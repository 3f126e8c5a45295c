"""sparseattn: exact sparse attention over long sequences for NumPy pipelines.

Each query attends to a chosen subset of keys, described by a pattern
(:mod:`sparseattn.patterns`), chosen from the data (:mod:`sparseattn.select`), or given as an index
structure (:class:`CSRLayout`, :class:`BlockCSRLayout`). Kernels run on the ``cpu`` (Numba) or
``cuda`` (Numba-CUDA + CuPy) backend.
"""

from __future__ import annotations

import importlib

from . import backends, config
from .api import attention, attention_backward
from .backends import use_backend, use_tf32
from .layout import BlockCSRLayout, CSRLayout

__version__ = "0.1.0"

# Subpackages loaded on first use, so `import sparseattn` stays light and never needs optional
# dependencies (matplotlib, dask, GPU stacks).
_LAZY_MODULES = {"patterns", "select", "analysis", "plot", "compat", "distributed", "autograd", "cache"}
_LAZY_NAMES = {"KVCache": ("cache", "KVCache")}

__all__ = ["CSRLayout", "BlockCSRLayout", "attention", "attention_backward", "use_backend", "use_tf32",
           "backends", "config", "__version__", *sorted(_LAZY_MODULES), *_LAZY_NAMES]


def __getattr__(name):
    if name in _LAZY_MODULES:
        return importlib.import_module(f".{name}", __name__)
    if name in _LAZY_NAMES:
        mod, attr = _LAZY_NAMES[name]
        return getattr(importlib.import_module(f".{mod}", __name__), attr)
    raise AttributeError(f"module 'sparseattn' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | _LAZY_MODULES | set(_LAZY_NAMES))
