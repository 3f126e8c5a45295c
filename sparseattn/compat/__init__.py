"""Drop-in replacements for other libraries' sparse-attention configuration APIs.

* :mod:`sparseattn.compat.deepspeed`: DeepSpeed's ``*SparsityConfig`` classes (``make_layout``).
"""

from . import deepspeed

__all__ = ["deepspeed"]
