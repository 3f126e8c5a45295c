"""Patterns defined on a grid of blocks: the shared machinery and ``block_sparse``.

A grid pattern says which key blocks each *position block* sees: row ``R`` covers positions
``[R * bsq, (R + 1) * bsq)`` and column ``C`` keys ``[C * bsk, (C + 1) * bsk)``. Token layouts are
expanded from the grid by a Numba kernel; a block layout asked at the grid's own block size (and
aligned queries) is the grid itself, full blocks only; at any other block size each layout block's
mask follows from the few grid cells it overlaps, de-duplicated before any mask is built.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ..layout import BlockCSRLayout, _check_block_size, _indptr_from_rows
from . import _build
from .base import Pattern, positions

__all__ = ["GridPattern", "BlockSparse", "block_sparse"]


class GridPattern(Pattern):
    """Base of patterns defined on a block grid over positions.

    Subclasses implement ``_grid(n_k) -> (block_size, indptr, indices)``: a block-level CSR with
    at least ``ceil(n_k / bsq)`` rows whose columns lie in ``[0, ceil(n_k / bsk))``, and set
    ``_token_causal`` when keys after the query must be dropped inside the diagonal blocks.
    """

    _token_causal = False

    def _grid(self, n_k):  # pragma: no cover - abstract
        raise NotImplementedError

    def _csr(self, n_q, n_k, causal=None):
        causal = self._token_causal if causal is None else causal
        bs, ip, ix = self._grid(n_k)
        return _build.expand_block_rows(positions(n_q, n_k), bs, ip, ix, n_k, causal)

    def _block(self, n_q, n_k, block_size, causal=None):
        causal = self._token_causal if causal is None else causal
        bs, ip, ix = self._grid(n_k)
        bq, bk = block_size
        off = n_k - n_q
        aligned = tuple(bs) == (bq, bk) and off >= 0 and off % bq == 0
        if not aligned or (causal and bq != bk):
            return _build.grid_to_block(ip, ix, bs, -(-n_k // bs[1]), n_q, n_k, block_size, causal)
        nbq = -(-n_q // bq)
        R = off // bq + np.arange(nbq, dtype=np.int64)
        nrows = ip.shape[0] - 1
        R = np.minimum(R, nrows)  # rows past the grid see nothing
        ipx = np.append(ip, ip[-1])
        cols, counts = _build.ranges(ipx[R], ipx[R + 1])
        cols = ix[cols]
        rows = np.repeat(np.arange(nbq, dtype=np.int64), counts)
        mask_index = np.full(rows.shape[0], -1, np.int64)
        masks = np.zeros((0, bq, bk), bool)
        if causal:
            # positions are aligned to square blocks: only diagonal blocks are cut (a triangle)
            keep = cols <= R[rows]
            rows, cols, mask_index = rows[keep], cols[keep], mask_index[keep]
            diag = np.nonzero(cols == R[rows])[0]
            rv = np.minimum(bq, n_q - rows[diag] * bq)  # rows (= columns) in range
            urv, inv = np.unique(rv, return_inverse=True)
            r = np.arange(bq)
            cut = urv > 1  # a 1x1 diagonal block is full
            masks = np.array([(r[:, None] >= r[None, :]) & (r[:, None] < v) & (r[None, :] < v)
                              for v in urv[cut]], bool).reshape(-1, bq, bk)
            slot = np.full(urv.shape[0], -1, np.int64)
            slot[cut] = np.arange(int(cut.sum()))
            mask_index[diag] = slot[inv.ravel()]
        return BlockCSRLayout(_indptr_from_rows(rows, nbq), cols, (n_q, n_k), (bq, bk), 1,
                              mask_index, masks, check=False)

    def _causal_csr(self, n_q, n_k):
        """Token layout of ``causal(self)`` straight from the grid."""
        return self._csr(n_q, n_k, True)

    def _causal_block(self, n_q, n_k, block_size):
        """Block layout of ``causal(self)`` straight from the grid."""
        return self._block(n_q, n_k, block_size, True)


def _to_bool_layout(block_layout):
    arr = np.asarray(block_layout)
    if arr.dtype != bool:
        if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
            raise TypeError(f"block_layout must be a boolean or 0/1 array, got dtype {arr.dtype}")
        arr = arr != 0
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or 0 in arr.shape:
        raise ValueError(
            f"block_layout must have shape (nbq, nbk) or (heads, nbq, nbk), non-empty; got {arr.shape}"
        )
    return np.ascontiguousarray(arr)


@dataclasses.dataclass(frozen=True, repr=False, eq=True)
class BlockSparse(GridPattern):
    """A given block mask: position block ``R`` sees key block ``C`` where ``block_layout[R, C]``.

    Query at position ``i`` sees key ``j`` iff ``block_layout[i // bq, j // bk]``. A layout larger
    than needed is cropped (one built for the longest sequence serves shorter ones, as DeepSpeed
    does); a smaller one is an error. A 3-D ``block_layout`` gives one mask per head.

    Stored as packed bits, so the pattern is hashable by content.

    Cost: the allowed blocks times their area; as a block layout at its own block size, nothing
    but the stored blocks.

    Mask of ``block_sparse([[1, 0, 0], [1, 1, 0], [0, 1, 1]], 4)`` at n = 12 (``.picture(12)``; rows are queries)::

        ####........
        ####........
        ####........
        ####........
        ########....
        ########....
        ########....
        ########....
        ....########
        ....########
        ....########
        ....########
    """

    bits: bytes
    grid_shape: tuple
    block_size: tuple
    _factory = "block_sparse"

    @classmethod
    def from_array(cls, block_layout, block_size):
        arr = _to_bool_layout(block_layout)
        bs = _check_block_size(block_size)
        return cls(np.packbits(arr, axis=None).tobytes(), tuple(int(s) for s in arr.shape), bs)

    @property
    def block_layout(self):
        """The boolean block mask, ``(heads, nbq, nbk)``."""
        n = int(np.prod(self.grid_shape))
        bits = np.unpackbits(np.frombuffer(self.bits, np.uint8), count=n)
        return bits.astype(bool).reshape(self.grid_shape)

    @property
    def heads(self):
        return self.grid_shape[0]

    def head(self, h):
        Pattern.head(self, h)
        if self.heads == 1:
            return self
        return BlockSparse.from_array(self.block_layout[h], self.block_size)

    def _grid(self, n_k):
        bsq, bsk = self.block_size
        _, nr, nc = self.grid_shape
        need_r, need_c = -(-n_k // bsq), -(-n_k // bsk)
        if need_r > nr or need_c > nc:
            raise ValueError(
                f"block_layout grid {(nr, nc)} with block_size {self.block_size} is too small for "
                f"{n_k} keys: needs at least {(need_r, need_c)} blocks"
            )
        grid = self.block_layout[0, :need_r, :need_c]
        rows, cols = np.nonzero(grid)
        return (bsq, bsk), _indptr_from_rows(rows, need_r), cols.astype(np.int64)

    def __repr__(self):
        h, r, c = self.grid_shape
        dens = np.unpackbits(np.frombuffer(self.bits, np.uint8)).sum() / max(h * r * c, 1)
        shape = f"{r}x{c}" if h == 1 else f"{h}x{r}x{c}"
        return f"block_sparse(<{shape} blocks, {dens:.3g} dense>, block_size={self.block_size})"


def block_sparse(block_layout, block_size):
    """Block-sparse attention from a boolean block mask.

    Parameters
    ----------
    block_layout : array_like of bool (or 0/1), shape (nbq, nbk) or (heads, nbq, nbk)
        ``block_layout[R, C]``: position block ``R`` sees key block ``C`` (e.g. a DeepSpeed
        ``make_layout`` result).
    block_size : int or tuple of int
        ``(bq, bk)`` tokens per block.

    Returns
    -------
    BlockSparse
    """
    return BlockSparse.from_array(block_layout, block_size)
