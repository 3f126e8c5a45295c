"""The CPU backend: Numba ``parallel=True`` kernels over CSR and block-CSR layouts."""

from __future__ import annotations

import numpy as np

from ... import config
from ...layout import BlockCSRLayout, CSRLayout
from ..base import Backend
from . import _safety
from . import decode as _dec
from . import forward as _fwd
from ._prefetch import scattered
from ._rows import one_head_at_a_time
from ._threads import balanced_chunks, blas_single_thread, num_threads, parallel_guard
from .select import CPUSelection


def _task_costs(row_work, lay_heads, batch, q_heads):
    """Cost of each (batch, head, row) task from the layout's per-row work ``(lay_heads, rows)``."""
    per_head = row_work if lay_heads == q_heads else np.broadcast_to(row_work, (q_heads, row_work.shape[1]))
    return np.broadcast_to(per_head, (batch,) + per_head.shape).reshape(-1)


def _weights_buffer(layout):
    """Entries of the two-pass kernel's weight buffer: one head's, capped by
    ``config.CSR_WEIGHTS_BUFFER`` but never below the longest row."""
    per_head = np.diff(layout.indptr[np.arange(layout.heads + 1) * layout.n_q])
    longest = int(layout.row_lengths.max(initial=0))
    return max(1, longest, min(int(per_head.max(initial=0)), config.CSR_WEIGHTS_BUFFER))


class CPUBackend(CPUSelection, Backend):
    """Numba CPU kernels (``parallel=True``, ``cache=True``)."""

    name = "cpu"
    block_size = config.CPU_BLOCK_SIZE

    def forward(self, q, k, v, layout, scale):
        B, Hq, Nq, _ = q.shape
        Dv = v.shape[3]
        out = np.empty((B, Hq, Nq, Dv), q.dtype)
        lse = np.empty((B, Hq, Nq), q.dtype)
        if out.size == 0 and lse.size == 0:
            return out, lse
        scale = q.dtype.type(scale)
        if isinstance(layout, BlockCSRLayout) and layout.fill < config.CPU_MIN_BLOCK_FILL:
            layout = layout.to_csr()  # exact either way; to_csr is cached on the layout
        if isinstance(layout, BlockCSRLayout):
            bq, bk = layout.block_size
            nbq = layout.grid[0]
            work = np.diff(layout.indptr).reshape(layout.heads, nbq) + 1
            chunks = balanced_chunks(_task_costs(work, layout.heads, B, Hq))
            with blas_single_thread():
                _fwd.block_forward(q, k, v, layout.indptr, layout.indices, layout.mask_index,
                                   layout.masks, layout.heads, bq, bk, scale, chunks, out, lse,
                                   max(1, config.CPU_MAX_KEY_TILE // bk))
        elif isinstance(layout, CSRLayout):
            ahead = config.CSR_PREFETCH_AHEAD if scattered(layout) else 0
            if ahead and one_head_at_a_time(k, v, Nq):
                w = np.empty(_weights_buffer(layout), q.dtype)
                _fwd.csr_forward_by_head(q, k, v, layout.indptr, layout.indices, layout.heads,
                                         scale, out, lse, ahead, w, num_threads())
            else:
                work = layout.row_lengths + 4
                chunks = balanced_chunks(_task_costs(work, layout.heads, B, Hq))
                _fwd.csr_forward(q, k, v, layout.indptr, layout.indices, layout.heads, scale,
                                 chunks, out, lse, ahead)
        else:  # the API only passes layouts
            raise TypeError(f"layout must be a CSRLayout or BlockCSRLayout, got {type(layout).__name__}")
        if _safety.suspect_rows(layout, lse) or not _safety.all_finite(out):  # see _safety
            return _safety.exact_forward(q, k, v, layout, scale, out, lse)
        return out, lse

    def backward(self, q, k, v, out, lse, dout, layout, scale):
        # imported here: its kernels load from Numba's cache only when gradients are asked for
        from .backward import backward, exact_backward

        grads = backward(q, k, v, out, lse, dout, layout, scale)
        if not _safety.all_finite(*grads):
            # NaN/inf in an input that a tile product multiplied by a zero weight (0 * NaN), or
            # overflow: the token-level float64 pass touches allowed pairs only, so a bad entry
            # reaches exactly the gradients that depend on it
            q, k, v, dout = (np.ascontiguousarray(x) for x in (q, k, v, dout))
            return exact_backward(q, k, v, dout, layout, scale, *(np.empty_like(g) for g in grads))
        return grads

    def decode(self, q, k, v, n, scale, workspace=None):
        # split-K Numba kernel, no BLAS (its thread cap costs more than a decode step)
        return _dec.decode(q, k, v, n, scale, workspace, num_threads())


# Every method that launches parallel kernels, serialised only under Numba's workqueue layer
# (see _threads.parallel_guard): threads sharing the backend must never abort the process.
for _name in ("forward", "backward", "decode", "topk", "lsh_hash", "lsh_select", "kmeans_assign",
              "kmeans_update", "routing_select"):
    if hasattr(CPUBackend, _name):
        setattr(CPUBackend, _name, parallel_guard(getattr(CPUBackend, _name)))
