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
    def topk(self, q, k, top_k, within, causal, scale):
        """Return a CSRLayout with, per (head, query), the ``top_k`` keys of largest ``q . k``."""
        raise NotImplementedError(f"backend {self.name!r} has no top-k selection kernel")

    def __repr__(self):
        return f"<sparseattn backend {self.name!r}>"
