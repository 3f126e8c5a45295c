"""Static attention patterns: frozen descriptions that build exact layouts in O(nnz).

Every pattern has ``.layout(n_q, n_k=None, *, heads=None, block_size=None)`` returning a
:class:`~sparseattn.CSRLayout` (token level) or, with ``block_size``, an exact
:class:`~sparseattn.BlockCSRLayout`. Queries are the last ``n_q`` of ``n_k`` positions
(bottom-right alignment, as FlashAttention): query ``i`` sits at position ``i + n_k - n_q``.

Families: :func:`dense`, :func:`sliding_window`, :func:`sinks` (:mod:`.local`);
:func:`dilated`; :func:`strided`, :func:`fixed` (Sparse Transformer); :func:`longformer`;
:func:`bigbird`; :func:`block_sparse`. Composition: ``p | q``, ``p & q``, :func:`causal` (or
``p.as_causal()``), :func:`per_head`; :class:`LayerPlan` for per-layer hybrids.
"""

from .base import Causal, Intersection, Pattern, PerHead, Union, causal, per_head
from .bigbird import BigBird, bigbird
from .block import BlockSparse, GridPattern, block_sparse
from .dilated import Dilated, dilated
from .local import Dense, Sinks, SlidingWindow, dense, sinks, sliding_window
from .longformer import Longformer, longformer
from .plan import LayerPlan
from .sparse_transformer import Fixed, Strided, fixed, strided

__all__ = [
    "Pattern", "dense", "sliding_window", "sinks", "dilated", "strided", "fixed", "longformer",
    "bigbird", "block_sparse", "causal", "per_head", "LayerPlan",
    "Dense", "SlidingWindow", "Sinks", "Dilated", "Strided", "Fixed", "Longformer", "BigBird",
    "BlockSparse", "GridPattern", "Union", "Intersection", "Causal", "PerHead",
]
