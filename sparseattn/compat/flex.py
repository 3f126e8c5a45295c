"""Exact FlexAttention masks from sparseattn layouts, without an ``n x n`` array.

PyTorch's FlexAttention (``torch.nn.attention.flex_attention``) takes the sparsity pattern as a
``mask_mod(b, h, q_idx, kv_idx) -> bool`` function. The usual way to hand it an arbitrary
pattern, a dense boolean lookup table, costs ``n^2`` bytes (17 GB at n=131072). Here the mask is
read from the layout's block form instead: a ``(heads, n_q / bq, n_k / bk)`` table saying, per
block, "absent" (-2), "full" (-1) or which de-duplicated element mask holds it (>= 0). Memory is
that table plus the distinct partial-block masks (2 for a sliding window at any n).

Used by ``python -m sparseattn bench --vs flex`` and the benchmarks that compare with
FlexAttention; torch is imported only by the functions that need it.
"""

from __future__ import annotations

import numpy as np

from ..layout import BlockCSRLayout, CSRLayout

__all__ = ["block_table", "mask_mod", "block_mask"]

#: block-table entries: no key of the block is allowed / every key is
ABSENT, FULL = -2, -1


def block_table(layout, block_size=(64, 64)):
    """The layout's blocks as a dense table plus its element masks.

    Parameters
    ----------
    layout : CSRLayout or BlockCSRLayout
        A token layout is converted with ``layout.to_block(block_size)`` (exact).
    block_size : tuple of int
        Used only for a token layout.

    Returns
    -------
    table : ndarray of int8, int16 or int32, shape (heads, ceil(n_q / bq), ceil(n_k / bk))
        ``ABSENT``, ``FULL`` or an index into ``masks`` (the narrowest type that holds them).
    masks : ndarray of bool, shape (n_masks, bq, bk)
        At least one (all False) so that a gather into it is always in bounds.
    block_size : tuple of int
    """
    if isinstance(layout, CSRLayout):
        layout = layout.to_block(block_size)
    if not isinstance(layout, BlockCSRLayout):
        raise TypeError(f"layout must be a CSRLayout or BlockCSRLayout, got {type(layout).__name__}")
    nbq, nbk = layout.grid
    bq, bk = layout.block_size
    n_masks = len(layout.masks)
    # the smallest integer type that holds every mask index: the table is the bulk of the memory
    dtype = np.int8 if n_masks < 2**7 else np.int16 if n_masks < 2**15 else np.int32
    table = np.full((layout.heads, nbq, nbk), ABSENT, dtype)
    rows = np.repeat(np.arange(layout.heads * nbq), np.diff(layout.indptr))
    table.reshape(-1, nbk)[rows, layout.indices] = layout.mask_index
    masks = layout.masks if len(layout.masks) else np.zeros((1, bq, bk), bool)
    return table, np.ascontiguousarray(masks), (bq, bk)


def mask_mod(layout, block_size=(64, 64), device="cpu"):
    """A FlexAttention ``mask_mod`` that allows exactly the layout's pairs.

    Parameters
    ----------
    layout : CSRLayout or BlockCSRLayout
        Shared (``heads == 1``) or per-head.
    block_size : tuple of int
        Block size of the lookup table for a token layout.
    device : str
        Where the table lives (the device FlexAttention runs on).

    Returns
    -------
    callable
        ``mask_mod(b, h, q_idx, kv_idx)``, usable with ``create_block_mask`` and
        ``flex_attention``.
    """
    import torch

    table, masks, (bq, bk) = block_table(layout, block_size)
    per_head = table.shape[0] > 1
    t = torch.from_numpy(table if per_head else table[0]).to(device)
    m = torch.from_numpy(masks.copy()).to(device)  # layout masks are read-only

    def mod(b, h, q_idx, kv_idx):
        entry = t[h, q_idx // bq, kv_idx // bk] if per_head else t[q_idx // bq, kv_idx // bk]
        entry = entry.to(torch.int64)
        inside = m[entry.clamp(min=0), q_idx % bq, kv_idx % bk]
        return (entry == FULL) | ((entry >= 0) & inside)

    return mod


def block_mask(layout, heads=None, block_size=(64, 64), device="cpu"):
    """FlexAttention's ``BlockMask`` for ``layout`` (``create_block_mask`` over :func:`mask_mod`).

    Parameters
    ----------
    layout : CSRLayout or BlockCSRLayout
    heads : int, optional
        Query heads; default ``layout.heads`` (a shared layout then gives a mask that broadcasts).
    block_size : tuple of int
        Lookup-table block size for a token layout.
    device : str

    Returns
    -------
    torch.nn.attention.flex_attention.BlockMask
    """
    from torch.nn.attention.flex_attention import create_block_mask

    n_q, n_k = layout.shape
    if heads is not None and layout.heads > 1 and heads != layout.heads:
        raise ValueError(f"heads={heads} does not match the layout's {layout.heads} heads "
                         f"(layout shape {layout.shape})")
    h = None if (heads is None and layout.heads == 1) else (heads or layout.heads)
    # the default builder evaluates mask_mod on an n_q x n_k grid at once; the compiled one
    # works block by block, so large sizes need it
    big = n_q * n_k > 16384 * 16384
    return create_block_mask(mask_mod(layout, block_size, device), None, h, n_q, n_k,
                             device=device, _compile=big)
