"""Drop-in replacements for other libraries' sparse-attention configuration APIs.

* :mod:`sparseattn.compat.deepspeed`: DeepSpeed's ``*SparsityConfig`` classes (``make_layout``).
* :mod:`sparseattn.compat.flex`: exact FlexAttention ``mask_mod`` / ``BlockMask`` from a layout
  (imports torch only when called).
"""

from . import deepspeed, flex

__all__ = ["deepspeed", "flex"]
