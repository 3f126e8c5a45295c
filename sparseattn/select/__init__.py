"""Content-based selection: layouts chosen from the data (``q`` and ``k``) rather than positions.

* :func:`topk`: each query keeps its ``top_k`` keys of largest ``q . k`` (exact), optionally
  inside a pattern.
* :func:`lsh`: Reformer's angular locality-sensitive hashing, chunked by bucket.
* :func:`routing`: Routing Transformer's spherical k-means clusters.

Each returns a :class:`~sparseattn.layout.CSRLayout` with one row per (head, query) that feeds
:func:`sparseattn.attention` directly and combines with static patterns' layouts by ``|``
(union) and ``&`` (intersection), e.g.
``sa.select.lsh(q, k, 4, 64) | sa.patterns.sinks(4).layout(n, heads=h)``. Their hot loops
(scoring and selecting, hashing and bucketing, k-means) are backend kernels.
"""

from .lsh import lsh
from .routing import routing
from .topk import topk

__all__ = ["topk", "lsh", "routing"]
