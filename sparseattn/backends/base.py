"""The interface every backend implements.

The public API (:mod:`sparseattn.api`) validates the user's input and hands a backend arrays in
one normal form, so that kernels never validate and the API never loops over tokens:

* ``q``: ``(B, Hq, Nq, D)``, ``k``: ``(Bk, Hkv, Nk, D)``, ``v``: ``(Bk, Hkv, Nk, Dv)`` with
  ``Bk in (1, B)`` (batch broadcast) and ``Hq % Hkv == 0`` (query head ``h`` reads key/value head
  ``h // (Hq // Hkv)``: GQA/MQA); C-contiguous, float32 or float64 (float16 arrives as float32).
* ``layout``: a :class:`~sparseattn.layout.CSRLayout` or
  :class:`~sparseattn.layout.BlockCSRLayout` of shape ``(Nq, Nk)`` with ``heads`` 1 (shared) or
  ``Hq``.
* ``scale``: a finite positive Python float.

A backend returns arrays of its own kind (NumPy for ``cpu``, CuPy for ``cuda``); the API converts
back to the caller's kind.
"""

from __future__ import annotations

import abc


class BackendUnavailable(ImportError):
    """Raised when a backend is requested that cannot run here; the message says why and how to fix it."""


class Backend(abc.ABC):
    """Base class of the ``cpu``, ``cuda`` and ``reference`` backends."""

    #: registry name
    name: str = ""
    #: block size this backend prefers when it builds a layout from a pattern (None: token CSR)
    block_size: tuple[int, int] | None = (64, 64)

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        """``(usable, reason)``; reason explains an unusable backend and how to fix it."""
        return True, ""

    # -- array handling ----------------------------------------------------------------------
    @property
    def xp(self):
        """The array module of this backend (``numpy``; ``cupy`` for ``cuda``)."""
        import numpy

        return numpy

    def owns(self, array) -> bool:
        """Whether ``array`` already lives where this backend computes (no copy needed)."""
        import numpy as np

        return isinstance(array, np.ndarray)

    def asarray(self, array):
        """Move/convert an input array to this backend's array kind."""
        import numpy as np

        return np.asarray(array)

    def to_numpy(self, array):
        import numpy as np

        return np.asarray(array)

    # -- kernels -----------------------------------------------------------------------------
    @abc.abstractmethod
    def forward(self, q, k, v, layout, scale):
        """Return ``(out, lse)``: ``out`` ``(B, Hq, Nq, Dv)``, ``lse`` ``(B, Hq, Nq)`` natural log.

        Rows without keys give ``out = 0`` and ``lse = -inf``.
        """

    def backward(self, q, k, v, out, lse, dout, layout, scale):
        """Return ``(dq, dk, dv)`` shaped like ``q``, ``k``, ``v`` (``dk``/``dv`` summed over each GQA group
        and over the batch when ``k`` was broadcast)."""
        raise NotImplementedError(f"backend {self.name!r} has no backward pass yet")

    def decode(self, q, k, v, n, scale, workspace=None):
        """One query per head against the first ``n`` keys of a cache (autoregressive decoding).

        Parameters
        ----------
        q : array, shape (Hq, D)
        k, v : arrays, shapes (Hkv, C, D) and (Hkv, C, Dv), C-contiguous, ``C >= n``
            Cache buffers; only positions ``[0, n)`` are read, in any order (softmax is
            order-free), so a rolling buffer is passed as is.
        n : int
        scale : float
        workspace : dict, optional
            Scratch the backend may keep across calls (the caller holds it, e.g. a KVCache).

        Returns
        -------
        out : array, shape (Hq, Dv)
        lse : array, shape (Hq,)

        This default runs :meth:`forward` with a one-row layout; backends override it with a
        kernel that allocates nothing per token.
        """
        import numpy as np

        from ..layout import CSRLayout

        xp = self.xp
        lay = CSRLayout(np.array([0, n], np.int64), np.arange(n), (1, n), check=False)
        out, lse = self.forward(xp.ascontiguousarray(q[None, :, None, :]),
                                xp.ascontiguousarray(k[None, :, :n]),
                                xp.ascontiguousarray(v[None, :, :n]), lay, scale)
        return out[0, :, 0], lse[0, :, 0]

    # -- content-based selection (see sparseattn.select) --------------------------------------
    # Inputs arrive validated and normalised by sparseattn.select: q (Hq, Nq, D), k (Hkv, Nk, D),
    # C-contiguous, one float dtype, finite, Hq % Hkv == 0 (query head h reads key head
    # h // (Hq // Hkv)); ``causal`` keeps key j for query i only if j <= i + Nk - Nq. Each selector
    # returns a CSRLayout of shape (Nq, Nk) with heads = Hq (NumPy index arrays on every backend).
    def topk(self, q, k, top_k, within, causal):
        """Per (head, query) the ``min(top_k, allowed)`` keys of largest ``q . k`` (ties: lower key).

        ``within``: ``None`` (all keys) or a CSRLayout of shape ``(Nq, Nk)`` with 1 or ``Hq``
        heads restricting the candidates. ``top_k >= 1``.
        """
        raise NotImplementedError(f"backend {self.name!r} has no top-k selection kernel")

    def lsh_hash(self, x, rotations):
        """Angular LSH buckets of ``x`` ``(H, N, D)`` under ``rotations`` ``(R, D, nb2)`` (x's dtype):
        int32 ``(H, R, N)``, ``argmax([x R_r, -x R_r])`` (first maximum wins), in ``[0, 2 nb2)``."""
        raise NotImplementedError(f"backend {self.name!r} has no LSH hashing kernel")

    def lsh_select(self, q_buckets, k_buckets, n_buckets, bucket_size, causal):
        """Reformer chunking from buckets ``(Hq, R, Nq)`` and ``(Hkv, R, Nk)`` int32: per round the
        keys sorted by (bucket, position) are cut into ``bucket_size`` chunks; a query lands where
        it would sit among them (position ``i + Nk - Nq``) and sees that chunk and the previous one
        (chunk 0 wraps to the last); the row is the union over rounds."""
        raise NotImplementedError(f"backend {self.name!r} has no LSH selection kernel")

    def kmeans_assign(self, x, centroids):
        """Nearest centroid by dot product for unit rows ``x`` ``(Hx, N, D)``; ``centroids``
        ``(Hc, C, D)`` with ``Hc % Hx == 0`` (centroid head h reads x head ``h // (Hc // Hx)``).
        Returns ``labels`` int32 ``(Hc, N)`` (first maximum wins) and ``sims`` ``(Hc, N)``."""
        raise NotImplementedError(f"backend {self.name!r} has no k-means kernel")

    def kmeans_update(self, q, k, q_labels, k_labels, centroids):
        """One spherical k-means update over the union of the unit queries and keys: each
        centroid ``(Hq, C, D)`` becomes its points' normalised sum; one with none stays."""
        raise NotImplementedError(f"backend {self.name!r} has no k-means kernel")

    def routing_select(self, q_labels, k_labels, k_sims, n_clusters, capacity, causal):
        """Routing layout: query ``(h, i)`` sees the keys of cluster ``q_labels[h, i]``, each
        cluster keeping at most ``capacity`` keys, those of largest ``k_sims`` (ties: lower key).
        Labels are ``(Hq, Nq)`` and ``(Hq, Nk)`` int32."""
        raise NotImplementedError(f"backend {self.name!r} has no routing kernel")

    def __repr__(self):
        return f"<sparseattn backend {self.name!r}>"
