"""How the CPU kernels number their work.

A task is one (batch, query head, row) triple, where a row is a query (token-level kernels) or a
query block (tiled kernels). Tasks are numbered batch-major so that :func:`balanced_chunks
<._threads.balanced_chunks>` can cut them into contiguous chunks of equal work.
"""

from __future__ import annotations

from numba import njit


@njit(cache=True, inline="always")
def task_coords(t, rows, Hq, lay_heads, Bk, group):
    """Coordinates of task ``t`` among ``B * Hq * rows`` tasks.

    Returns ``(b, h, row, layout_head, kv_batch, kv_head)``: the layout head is 0 for a layout
    shared by all heads, the key/value batch is 0 when k/v are broadcast over the batch, and
    query head ``h`` reads key/value head ``h // group`` (GQA).
    """
    b = t // (Hq * rows)
    rem = t - b * (Hq * rows)
    h = rem // rows
    row = rem - h * rows
    return b, h, row, (h if lay_heads > 1 else 0), (b if Bk > 1 else 0), h // group
