"""Index structures: which keys each query may attend to.

Two exact representations of a boolean attention mask of shape ``(heads, n_q, n_k)``, each built
and converted in time and memory proportional to the number of allowed pairs (nnz), never through
an ``n_q x n_k`` array (``to_dense`` excepted, which exists to build one on purpose):

* :class:`CSRLayout`: token level. Row ``h * n_q + i`` lists, sorted and without repeats, the keys
  query ``i`` of head ``h`` attends to.
* :class:`BlockCSRLayout`: block level, for tiled kernels. Row ``h * nbq + bi`` lists the key blocks
  query block ``bi`` touches. A block whose every in-range element is allowed is *full* and carries
  no mask; a *partial* block points (``mask_index``) into a compact, de-duplicated stack of
  ``(bq, bk)`` boolean element masks. Blocks at the end of a sequence that ``bq`` / ``bk`` does not
  divide are clipped: their out-of-range elements never count.

``heads = 1`` means the layout is shared by every attention head.
"""

from __future__ import annotations

import operator

import numpy as np

from . import config
from ._validation import check_memory

__all__ = ["CSRLayout", "BlockCSRLayout", "as_layout_pair"]

_INT64_MAX = np.iinfo(np.int64).max


# ----------------------------------------------------------------------------- helpers


def _as_int_array(x, name, ndim):
    arr = np.asarray(x)
    if arr.size == 0 and arr.dtype == np.float64 and not isinstance(x, np.ndarray):
        arr = arr.astype(np.int64)  # an empty list: NumPy calls it float64
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name} must be an integer array, got dtype {arr.dtype}")
    if arr.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-dimensional, got shape {arr.shape}")
    return arr


def _check_shape(shape):
    try:
        # operator.index: a float (8.5) or a string ("8") is refused, not silently truncated
        n_q, n_k = (operator.index(s) for s in shape)
    except (TypeError, ValueError):
        raise TypeError(f"shape must be a pair of ints (n_q, n_k), got {shape!r}") from None
    if n_q < 0 or n_k < 0:
        raise ValueError(f"shape must be non-negative, got {(n_q, n_k)}")
    if max(n_q, n_k) > _INT64_MAX:
        raise ValueError(f"shape must fit int64 (< 2**63), got {(n_q, n_k)}")
    return n_q, n_k


def _owned_int64(arr, name):
    """A private int64 copy of a validated-to-be-integer array; unsigned values beyond int64 are
    refused instead of wrapping to negatives (a uint64 indptr would otherwise pass the
    monotonicity check, where differences of unsigned values are never negative)."""
    if arr.dtype.kind == "u" and arr.size and int(arr.max()) > _INT64_MAX:
        raise ValueError(f"{name} has values up to {int(arr.max())}, beyond the int64 range")
    # a copy, never a view: the arrays are validated once, so nobody else may hold a writable
    # alias to them (a kernel trusts every index)
    return np.array(arr, dtype=np.int64, order="C", copy=True)


def _check_heads(heads):
    if isinstance(heads, (bool, np.bool_)) or not isinstance(heads, (int, np.integer)):
        raise TypeError(f"heads must be an int, got {type(heads).__name__}")
    if heads < 1:
        raise ValueError(f"heads must be >= 1, got {heads}")
    return int(heads)


def _check_block_size(block_size):
    if isinstance(block_size, (int, np.integer)):
        block_size = (block_size, block_size)
    try:
        bq, bk = (int(b) for b in block_size)
    except (TypeError, ValueError):
        raise TypeError(f"block_size must be an int or a pair of ints, got {block_size!r}") from None
    if bq < 1 or bk < 1:
        raise ValueError(f"block_size must be positive, got {(bq, bk)}")
    return bq, bk


def _index_dtype(n_cols, nnz):
    """int32 while both the column range and the entry count fit, int64 beyond."""
    limit = config.INT32_NNZ_LIMIT
    return np.int32 if (n_cols <= limit and nnz <= limit) else np.int64


def _check_csr_arrays(indptr, indices, n_rows, n_cols, what):
    """Validate CSR index arrays without a Python loop over rows; raise ValueError naming them."""
    if indptr.shape != (n_rows + 1,):
        raise ValueError(
            f"{what}: indptr must have shape ({n_rows + 1},) for {n_rows} rows, got {indptr.shape}"
        )
    if indptr[0] != 0:
        raise ValueError(f"{what}: indptr[0] must be 0, got {indptr[0]}")
    if indptr[-1] != indices.shape[0]:
        raise ValueError(
            f"{what}: indptr[-1] = {indptr[-1]} must equal len(indices) = {indices.shape[0]}"
        )
    if n_rows and np.any(np.diff(indptr) < 0):
        raise ValueError(f"{what}: indptr must be non-decreasing")
    nnz = indices.shape[0]
    if nnz == 0:
        return
    lo, hi = indices.min(), indices.max()
    if lo < 0 or hi >= n_cols:
        raise ValueError(
            f"{what}: indices must lie in [0, {n_cols}), got values in [{lo}, {hi}]"
        )
    if nnz > 1:
        step = np.diff(indices.astype(np.int64, copy=False))
        new_row = np.zeros(nnz, dtype=bool)
        starts = indptr[:-1]
        new_row[starts[starts < nnz]] = True
        bad = (step <= 0) & ~new_row[1:]
        if np.any(bad):
            pos = int(np.argmax(bad)) + 1
            row = int(np.searchsorted(indptr, pos, side="right")) - 1
            raise ValueError(
                f"{what}: indices must be strictly increasing within each row "
                f"(sorted, no duplicates); row {row} breaks this at entry {pos}"
            )


def _rows_of(indptr):
    """Row number of every stored entry."""
    n_rows = indptr.shape[0] - 1
    return np.repeat(np.arange(n_rows, dtype=np.int64), np.diff(indptr))


def _indptr_from_rows(rows, n_rows):
    """indptr for sorted row numbers."""
    counts = np.bincount(rows, minlength=n_rows) if rows.size else np.zeros(n_rows, np.int64)
    indptr = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    return indptr


def _broadcast_heads(a, b):
    if a.heads == b.heads:
        return a, b
    if a.heads == 1:
        return a.expand_heads(b.heads), b
    if b.heads == 1:
        return a, b.expand_heads(a.heads)
    raise ValueError(f"cannot combine layouts with heads {a.heads} and {b.heads}")


def as_layout_pair(a, b):
    """Bring two layouts to a common form (CSR, same heads) for set operations."""
    if not isinstance(a, (CSRLayout, BlockCSRLayout)) or not isinstance(
        b, (CSRLayout, BlockCSRLayout)
    ):
        raise TypeError(
            f"expected two layouts, got {type(a).__name__} and {type(b).__name__}"
        )
    if a.shape != b.shape:
        raise ValueError(f"layout shapes differ: {a.shape} and {b.shape}")
    return _broadcast_heads(a.to_csr(), b.to_csr())


# ----------------------------------------------------------------------------- CSR


class CSRLayout:
    """Token-level sparse attention layout in compressed sparse row form.

    Parameters
    ----------
    indptr : array_like of int, shape (heads * n_q + 1,)
        Row pointers; row ``h * n_q + i`` holds the keys of query ``i`` in head ``h``.
    indices : array_like of int, shape (nnz,)
        Key positions, strictly increasing within each row.
    shape : tuple of int
        ``(n_q, n_k)``.
    heads : int, default 1
        Number of heads the layout describes; 1 means shared by all heads.
    check : bool, default True
        Validate the arrays (sortedness, range, lengths). Only internal constructors that build
        correct arrays by construction turn this off.

    Attributes
    ----------
    indptr : ndarray of int64
    indices : ndarray of int32 (int64 beyond 2**31 entries or columns)
    shape, heads, nnz, density
    """

    __slots__ = ("indptr", "indices", "shape", "heads", "_cache", "__weakref__")

    def __init__(self, indptr, indices, shape, heads=1, *, check=True):
        n_q, n_k = _check_shape(shape)
        heads = _check_heads(heads)
        indptr = _as_int_array(indptr, "indptr", 1)
        indices = _as_int_array(indices, "indices", 1)
        if check:
            indptr = _owned_int64(indptr, "indptr")
            indices = _owned_int64(indices, "indices")
            _check_csr_arrays(indptr, indices, heads * n_q, n_k, "CSRLayout")
        self.indptr = np.ascontiguousarray(indptr, dtype=np.int64)
        self.indices = np.ascontiguousarray(indices, dtype=_index_dtype(n_k, indices.shape[0]))
        self.indptr.flags.writeable = False
        self.indices.flags.writeable = False
        self.shape = (n_q, n_k)
        self.heads = heads
        self._cache = {}

    # -- basic figures
    @property
    def n_q(self):
        return self.shape[0]

    @property
    def n_k(self):
        return self.shape[1]

    @property
    def nnz(self):
        """Allowed (query, key) pairs, summed over the layout's heads."""
        return int(self.indices.shape[0])

    @property
    def density(self):
        """nnz / (heads * n_q * n_k); 0 for an empty shape."""
        total = self.heads * self.n_q * self.n_k
        return self.nnz / total if total else 0.0

    @property
    def row_lengths(self):
        """Keys per row, shape ``(heads, n_q)``."""
        return np.diff(self.indptr).reshape(self.heads, self.n_q)

    def __repr__(self):
        return (
            f"CSRLayout(shape={self.shape}, heads={self.heads}, nnz={self.nnz}, "
            f"density={self.density:.4g})"
        )

    def __eq__(self, other):
        if not isinstance(other, (CSRLayout, BlockCSRLayout)):
            return NotImplemented
        if self.shape != other.shape:
            return False
        a, b = _broadcast_heads(self.to_csr(), other.to_csr())
        return np.array_equal(a.indptr, b.indptr) and np.array_equal(a.indices, b.indices)

    __hash__ = None

    # -- cost figures
    def flops(self, head_dim, value_dim=None, *, q_heads=None, batch=1):
        """Useful floating-point operations of one forward pass: ``2*nnz*D + 2*nnz*Dv`` per head.

        Parameters
        ----------
        head_dim, value_dim : int
            D of q/k and Dv of v (Dv defaults to D).
        q_heads : int, optional
            Query heads the layout is applied to (a shared layout counts once per head).
        batch : int
            Batch size.
        """
        value_dim = head_dim if value_dim is None else value_dim
        reps = batch * ((q_heads // self.heads) if q_heads else 1)
        return 2 * self.nnz * (head_dim + value_dim) * reps

    @property
    def nbytes(self):
        """Bytes held by the index arrays."""
        return int(self.indptr.nbytes + self.indices.nbytes)

    def cost(self, head_dim=64, value_dim=None, *, q_heads=None):
        """A dict of nnz, density, FLOPs and index bytes."""
        return {
            "nnz": self.nnz,
            "density": self.density,
            "flops": self.flops(head_dim, value_dim, q_heads=q_heads),
            "bytes": self.nbytes,
        }

    # -- conversions
    @classmethod
    def from_dense(cls, mask):
        """Build from a boolean mask of shape ``(n_q, n_k)`` or ``(heads, n_q, n_k)``."""
        mask = np.asarray(mask)
        if mask.dtype != bool:
            raise TypeError(f"mask must be boolean, got dtype {mask.dtype}")
        if mask.ndim == 2:
            mask = mask[None]
        if mask.ndim != 3:
            raise ValueError(f"mask must have shape (n_q, n_k) or (heads, n_q, n_k), got {mask.shape}")
        heads, n_q, n_k = mask.shape
        if heads == 0:
            raise ValueError("mask must have at least one head")
        flat = mask.reshape(heads * n_q, n_k)
        rows, cols = np.nonzero(flat)
        return cls(_indptr_from_rows(rows, heads * n_q), cols, (n_q, n_k), heads, check=False)

    def to_dense(self):
        """Boolean mask of shape ``(heads, n_q, n_k)`` (the one place a dense array is built)."""
        n_q, n_k = self.shape
        check_memory(self.heads * n_q * n_k, f"a dense ({self.heads}, {n_q}, {n_k}) mask")
        mask = np.zeros((self.heads * n_q, n_k), dtype=bool)
        mask[_rows_of(self.indptr), self.indices] = True
        return mask.reshape(self.heads, n_q, n_k)

    def to_scipy(self, head=None):
        """``scipy.sparse.csr_array`` of booleans.

        With ``head=None`` the heads are stacked along the rows: shape ``(heads * n_q, n_k)``.
        """
        import scipy.sparse as sp

        n_q, n_k = self.shape
        if head is None:
            indptr, indices, n_rows = self.indptr, self.indices, self.heads * n_q
        else:
            if not 0 <= head < self.heads:
                raise ValueError(f"head must lie in [0, {self.heads}), got {head}")
            lo, hi = self.indptr[head * n_q], self.indptr[(head + 1) * n_q]
            indptr = self.indptr[head * n_q : (head + 1) * n_q + 1] - lo
            indices, n_rows = self.indices[lo:hi], n_q
        data = np.ones(indices.shape[0], dtype=bool)
        return sp.csr_array((data, indices.copy(), indptr.copy()), shape=(n_rows, n_k))

    @classmethod
    def from_scipy(cls, matrix, heads=1):
        """Build from a scipy sparse matrix/array (stored non-zeros are the allowed pairs).

        A matrix of shape ``(heads * n_q, n_k)`` holds ``heads`` stacked heads.
        """
        import scipy.sparse as sp

        if not sp.issparse(matrix):
            raise TypeError(f"matrix must be a scipy.sparse matrix, got {type(matrix).__name__}")
        heads = _check_heads(heads)
        csr = sp.csr_array(matrix)
        csr.eliminate_zeros()
        csr.sum_duplicates()
        csr.sort_indices()
        n_rows, n_k = csr.shape
        if n_rows % heads:
            raise ValueError(f"matrix has {n_rows} rows, not a multiple of heads={heads}")
        return cls(csr.indptr, csr.indices, (n_rows // heads, n_k), heads, check=False)

    def to_csr(self):
        return self

    def expand_heads(self, heads):
        """The same layout repeated for ``heads`` heads (only from a shared layout)."""
        heads = _check_heads(heads)
        if heads == self.heads:
            return self
        if self.heads != 1:
            raise ValueError(f"only a shared layout (heads=1) can be expanded, this has {self.heads}")
        counts = np.tile(np.diff(self.indptr), heads)
        indptr = np.zeros(counts.shape[0] + 1, np.int64)
        np.cumsum(counts, out=indptr[1:])
        return CSRLayout(indptr, np.tile(self.indices, heads), self.shape, heads, check=False)

    def head(self, h):
        """The layout of head ``h`` alone (heads = 1)."""
        n_q = self.n_q
        if not 0 <= h < self.heads:
            raise ValueError(f"head must lie in [0, {self.heads}), got {h}")
        lo, hi = self.indptr[h * n_q], self.indptr[(h + 1) * n_q]
        return CSRLayout(
            self.indptr[h * n_q : (h + 1) * n_q + 1] - lo, self.indices[lo:hi], self.shape, 1, check=False
        )

    def transpose(self):
        """Key-major layout of shape ``(n_k, n_q)``: row ``h * n_k + j`` lists the queries that see
        key ``j``. The backward pass accumulates dK and dV over these rows without races."""
        cached = self._cache.get("transpose")
        if cached is not None:
            return cached
        n_q, n_k = self.shape
        rows = _rows_of(self.indptr)
        head = rows // max(n_q, 1)
        query = rows - head * n_q
        new_rows = head * n_k + self.indices.astype(np.int64)
        order = np.argsort(new_rows, kind="stable")  # stable: queries stay ascending
        out = CSRLayout(
            _indptr_from_rows(new_rows[order], self.heads * n_k),
            query[order],
            (n_k, n_q),
            self.heads,
            check=False,
        )
        self._cache["transpose"] = out
        return out

    @property
    def T(self):
        return self.transpose()

    def union(self, other):
        """Pairs allowed by either layout (a linear merge per row)."""
        return self._combine(other, union=True)

    def intersection(self, other):
        """Pairs allowed by both layouts (a linear merge per row)."""
        return self._combine(other, union=False)

    def _combine(self, other, union):
        from ._setops import combine_rows  # Numba kernels: compiled or loaded on first use

        a, b = as_layout_pair(self, other)
        indptr, indices = combine_rows(a.indptr, a.indices, b.indptr, b.indices, union)
        return CSRLayout(indptr, indices, a.shape, a.heads, check=False)

    __or__ = union
    __and__ = intersection

    def to_block(self, block_size):
        """Exact block-CSR form: full blocks carry no mask, partial blocks a compact one."""
        return BlockCSRLayout.from_csr(self, block_size)


# ----------------------------------------------------------------------------- block CSR


def _dedupe_masks(masks):
    """Unique masks and, for each input mask, its index among them (packed bits as keys)."""
    if masks.shape[0] == 0:
        return masks, np.zeros(0, np.int32)
    packed = np.packbits(masks.reshape(masks.shape[0], -1), axis=1)
    keys = np.ascontiguousarray(packed).view(np.dtype((np.void, packed.shape[1]))).ravel()
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    return np.ascontiguousarray(masks[first]), inverse.astype(np.int32).ravel()


class BlockCSRLayout:
    """Block-level sparse attention layout, exact at element level.

    Parameters
    ----------
    indptr : array_like of int, shape (heads * nbq + 1,)
        Row pointers over query blocks, ``nbq = ceil(n_q / bq)``.
    indices : array_like of int, shape (nblocks,)
        Key-block numbers, strictly increasing within each block row, in ``[0, ceil(n_k / bk))``.
    shape : tuple of int
        ``(n_q, n_k)`` in tokens.
    block_size : int or tuple of int
        ``(bq, bk)``.
    heads : int, default 1
    mask_index : array_like of int, shape (nblocks,), optional
        ``-1`` for a full block, else the row of ``masks`` holding the block's element mask.
        Several blocks may share one mask. Omitted: every block is full.
    masks : array_like of bool, shape (n_masks, bq, bk), optional
        Element masks of partial blocks. Elements beyond ``n_q`` / ``n_k`` are ignored (cleared).
    check : bool, default True
    """

    __slots__ = (
        "indptr", "indices", "mask_index", "masks", "shape", "block_size", "heads", "_cache",
        "__weakref__",
    )

    def __init__(self, indptr, indices, shape, block_size, heads=1, mask_index=None, masks=None,
                 *, check=True):
        n_q, n_k = _check_shape(shape)
        bq, bk = _check_block_size(block_size)
        heads = _check_heads(heads)
        indptr = _as_int_array(indptr, "indptr", 1)
        indices = _as_int_array(indices, "indices", 1)
        nbq, nbk = -(-n_q // bq), -(-n_k // bk)
        nblocks = indices.shape[0]
        if mask_index is None:
            mask_index = np.full(nblocks, -1, np.int32)
        mask_index = _as_int_array(mask_index, "mask_index", 1)
        if masks is None:
            masks = np.zeros((0, bq, bk), bool)
        masks = np.asarray(masks)
        if check:
            indptr = _owned_int64(indptr, "indptr")
            indices = _owned_int64(indices, "indices")
            mask_index = _owned_int64(mask_index, "mask_index")
            masks = np.array(masks, order="C", copy=True)
            _check_csr_arrays(indptr, indices, heads * nbq, nbk, "BlockCSRLayout")
            if mask_index.shape != (nblocks,):
                raise ValueError(
                    f"mask_index must have shape ({nblocks},) (one per block), got {mask_index.shape}"
                )
            if masks.dtype != bool:
                raise TypeError(f"masks must be boolean, got dtype {masks.dtype}")
            if masks.ndim != 3 or masks.shape[1:] != (bq, bk):
                raise ValueError(f"masks must have shape (n_masks, {bq}, {bk}), got {masks.shape}")
            if nblocks and (mask_index.min() < -1 or mask_index.max() >= masks.shape[0]):
                raise ValueError(
                    f"mask_index must lie in [-1, {masks.shape[0]}), got values in "
                    f"[{mask_index.min()}, {mask_index.max()}]"
                )
        self.indptr = np.ascontiguousarray(indptr, dtype=np.int64)
        self.indices = np.ascontiguousarray(indices, dtype=_index_dtype(nbk, nblocks))
        self.mask_index = np.ascontiguousarray(mask_index, dtype=np.int32)
        self.masks = np.ascontiguousarray(masks, dtype=bool)
        for arr in (self.indptr, self.indices, self.mask_index, self.masks):
            arr.flags.writeable = False
        self.shape = (n_q, n_k)
        self.block_size = (bq, bk)
        self.heads = heads
        self._cache = {}

    @property
    def n_q(self):
        return self.shape[0]

    @property
    def n_k(self):
        return self.shape[1]

    @property
    def n_blocks(self):
        """Stored blocks (full and partial), summed over heads."""
        return int(self.indices.shape[0])

    @property
    def grid(self):
        """``(nbq, nbk)``: query and key blocks."""
        return -(-self.n_q // self.block_size[0]), -(-self.n_k // self.block_size[1])

    def _block_coords(self):
        """Head, block row and block column of every stored block."""
        nbq, _ = self.grid
        rows = _rows_of(self.indptr)
        head = rows // max(nbq, 1)
        return head, rows - head * nbq, self.indices.astype(np.int64)

    def _valid_extent(self, brow, bcol):
        """In-range rows and columns of each block (edge blocks are clipped)."""
        bq, bk = self.block_size
        return (np.minimum(bq, self.n_q - brow * bq), np.minimum(bk, self.n_k - bcol * bk))

    @property
    def nnz(self):
        """Allowed (query, key) element pairs, summed over heads."""
        if "nnz" not in self._cache:
            _, brow, bcol = self._block_coords()
            rq, rk = self._valid_extent(brow, bcol)
            area = rq * rk
            partial = self.mask_index >= 0
            per_mask = self.masks.sum(axis=(1, 2))
            area[partial] = per_mask[self.mask_index[partial]]
            bq, bk = self.block_size
            edge = np.flatnonzero(partial & ((rq < bq) | (rk < bk)))
            if edge.size:
                # a clipped edge block counts its mask inside its extent only: a user's mask may
                # set elements beyond n_q / n_k, which no kernel and no conversion sees
                inside = (np.arange(bq)[None, :, None] < rq[edge, None, None]) & (
                    np.arange(bk)[None, None, :] < rk[edge, None, None])
                area[edge] = (self.masks[self.mask_index[edge]] & inside).sum(axis=(1, 2))
            self._cache["nnz"] = int(area.sum())
        return self._cache["nnz"]

    @property
    def density(self):
        total = self.heads * self.n_q * self.n_k
        return self.nnz / total if total else 0.0

    @property
    def n_full(self):
        return int(np.count_nonzero(self.mask_index < 0))

    def __repr__(self):
        return (
            f"BlockCSRLayout(shape={self.shape}, block_size={self.block_size}, heads={self.heads}, "
            f"blocks={self.n_blocks} ({self.n_full} full), masks={self.masks.shape[0]}, "
            f"nnz={self.nnz}, density={self.density:.4g})"
        )

    __eq__ = CSRLayout.__eq__
    __hash__ = None

    flops = CSRLayout.flops

    @property
    def fill(self):
        """Allowed pairs over the (clipped) area of the stored blocks: 1.0 when every block is full.

        A tiled kernel does ``1 / fill`` times the useful work, so a low fill (strided or dilated
        patterns at coarse blocks) is better served at token level.
        """
        if "fill" not in self._cache:
            _, brow, bcol = self._block_coords()
            rq, rk = self._valid_extent(brow, bcol)
            area = int((rq * rk).sum())
            self._cache["fill"] = self.nnz / area if area else 1.0
        return self._cache["fill"]

    def block_flops(self, head_dim, value_dim=None, *, q_heads=None, batch=1):
        """FLOPs a tiled kernel performs: every stored block costs its whole (clipped) area."""
        value_dim = head_dim if value_dim is None else value_dim
        _, brow, bcol = self._block_coords()
        rq, rk = self._valid_extent(brow, bcol)
        reps = batch * ((q_heads // self.heads) if q_heads else 1)
        return 2 * int((rq * rk).sum()) * (head_dim + value_dim) * reps

    @property
    def nbytes(self):
        return int(self.indptr.nbytes + self.indices.nbytes + self.mask_index.nbytes + self.masks.nbytes)

    def cost(self, head_dim=64, value_dim=None, *, q_heads=None):
        out = CSRLayout.cost(self, head_dim, value_dim, q_heads=q_heads)
        out["block_flops"] = self.block_flops(head_dim, value_dim, q_heads=q_heads)
        out["blocks"] = self.n_blocks
        return out

    # -- constructors
    @classmethod
    def from_dense(cls, mask, block_size=(64, 64)):
        """Build from a boolean mask ``(n_q, n_k)`` or ``(heads, n_q, n_k)``; exact."""
        mask = np.asarray(mask)
        if mask.dtype != bool:
            raise TypeError(f"mask must be boolean, got dtype {mask.dtype}")
        if mask.ndim == 2:
            mask = mask[None]
        if mask.ndim != 3:
            raise ValueError(f"mask must have shape (n_q, n_k) or (heads, n_q, n_k), got {mask.shape}")
        return cls.from_csr(CSRLayout.from_dense(mask), block_size)

    @classmethod
    def from_csr(cls, layout, block_size):
        """Exact block form of a token-level layout."""
        if not isinstance(layout, CSRLayout):
            raise TypeError(f"layout must be a CSRLayout, got {type(layout).__name__}")
        bq, bk = _check_block_size(block_size)
        n_q, n_k = layout.shape
        heads = layout.heads
        nbq, nbk = -(-n_q // bq), -(-n_k // bk)
        rows = _rows_of(layout.indptr)
        head = rows // max(n_q, 1)
        qpos = rows - head * n_q
        cols = layout.indices.astype(np.int64)
        block_key = (head * nbq + qpos // bq) * nbk + cols // bk
        ukeys, elem_block, counts = np.unique(block_key, return_inverse=True, return_counts=True)
        elem_block = elem_block.ravel()
        brow_all, bcol = np.divmod(ukeys, nbk)
        brow = brow_all % max(nbq, 1)
        area = np.minimum(bq, n_q - brow * bq) * np.minimum(bk, n_k - bcol * bk)
        partial = counts < area
        mask_index = np.full(ukeys.shape[0], -1, np.int64)
        mask_index[partial] = np.arange(int(partial.sum()))
        masks = np.zeros((int(partial.sum()), bq, bk), bool)
        in_partial = partial[elem_block]
        masks[mask_index[elem_block[in_partial]], (qpos % bq)[in_partial], (cols % bk)[in_partial]] = True
        masks, remap = _dedupe_masks(masks)
        mask_index[partial] = remap
        return cls(
            _indptr_from_rows(brow_all, heads * nbq), bcol, (n_q, n_k), (bq, bk), heads,
            mask_index, masks, check=False,
        )

    @classmethod
    def from_block_mask(cls, block_mask, block_size, shape=None):
        """All-full blocks from a boolean block mask ``(nbq, nbk)`` or ``(heads, nbq, nbk)``.

        ``shape`` (tokens) defaults to the block grid times the block size.
        """
        bm = np.asarray(block_mask)
        if bm.dtype != bool:
            raise TypeError(f"block_mask must be boolean, got dtype {bm.dtype}")
        if bm.ndim == 2:
            bm = bm[None]
        if bm.ndim != 3 or bm.shape[0] == 0:
            raise ValueError(f"block_mask must have shape (nbq, nbk) or (heads, nbq, nbk), got {bm.shape}")
        bq, bk = _check_block_size(block_size)
        heads, nbq, nbk = bm.shape
        if shape is None:
            shape = (nbq * bq, nbk * bk)
        n_q, n_k = _check_shape(shape)
        if (-(-n_q // bq), -(-n_k // bk)) != (nbq, nbk):
            raise ValueError(
                f"block_mask grid {(nbq, nbk)} does not fit shape {(n_q, n_k)} with block_size {(bq, bk)}"
            )
        rows, cols = np.nonzero(bm.reshape(heads * nbq, nbk))
        return cls(_indptr_from_rows(rows, heads * nbq), cols, (n_q, n_k), (bq, bk), heads, check=False)

    # -- conversions
    def element_blocks(self):
        """Boolean element mask of every stored block, ``(n_blocks, bq, bk)``, edges cleared."""
        bq, bk = self.block_size
        check_memory(self.n_blocks * bq * bk, f"the element masks of {self.n_blocks} blocks")
        _, brow, bcol = self._block_coords()
        rq, rk = self._valid_extent(brow, bcol)
        valid = (np.arange(bq)[None, :, None] < rq[:, None, None]) & (
            np.arange(bk)[None, None, :] < rk[:, None, None]
        )
        partial = self.mask_index >= 0
        valid[partial] &= self.masks[self.mask_index[partial]]
        return valid

    def to_csr(self):
        """Exact token-level layout."""
        cached = self._cache.get("csr")
        if cached is not None:
            return cached
        bq, bk = self.block_size
        n_q, n_k = self.shape
        head, brow, bcol = self._block_coords()
        b, i, j = np.nonzero(self.element_blocks())
        rows = head[b] * n_q + brow[b] * bq + i
        cols = bcol[b] * bk + j
        order = np.argsort(rows, kind="stable")  # blocks are column-ordered within a block row
        out = CSRLayout(
            _indptr_from_rows(rows[order], self.heads * n_q), cols[order], (n_q, n_k), self.heads,
            check=False,
        )
        self._cache["csr"] = out
        return out

    def to_dense(self):
        """Boolean mask ``(heads, n_q, n_k)``."""
        return self.to_csr().to_dense()

    def to_block(self, block_size):
        if _check_block_size(block_size) == self.block_size:
            return self
        return BlockCSRLayout.from_csr(self.to_csr(), block_size)

    def block_mask(self):
        """Boolean ``(heads, nbq, nbk)`` grid of stored blocks (block-level, small)."""
        nbq, nbk = self.grid
        out = np.zeros((self.heads * nbq, nbk), bool)
        out[_rows_of(self.indptr), self.indices] = True
        return out.reshape(self.heads, nbq, nbk)

    def expand_heads(self, heads):
        heads = _check_heads(heads)
        if heads == self.heads:
            return self
        if self.heads != 1:
            raise ValueError(f"only a shared layout (heads=1) can be expanded, this has {self.heads}")
        counts = np.tile(np.diff(self.indptr), heads)
        indptr = np.zeros(counts.shape[0] + 1, np.int64)
        np.cumsum(counts, out=indptr[1:])
        return BlockCSRLayout(
            indptr, np.tile(self.indices, heads), self.shape, self.block_size, heads,
            np.tile(self.mask_index, heads), self.masks, check=False,
        )

    def transpose(self):
        """Key-major block layout of shape ``(n_k, n_q)`` with block size ``(bk, bq)``."""
        cached = self._cache.get("transpose")
        if cached is not None:
            return cached
        nbq, nbk = self.grid
        head, brow, bcol = self._block_coords()
        new_rows = head * nbk + bcol
        order = np.argsort(new_rows, kind="stable")
        mask_index = self.mask_index[order]
        out = BlockCSRLayout(
            _indptr_from_rows(new_rows[order], self.heads * nbk), brow[order], (self.n_k, self.n_q),
            self.block_size[::-1], self.heads, mask_index,
            np.ascontiguousarray(self.masks.transpose(0, 2, 1)), check=False,
        )
        self._cache["transpose"] = out
        return out

    @property
    def T(self):
        return self.transpose()

    def to_scipy(self, head=None):
        return self.to_csr().to_scipy(head)

    def union(self, other):
        return self.to_csr().union(other).to_block(self.block_size)

    def intersection(self, other):
        return self.to_csr().intersection(other).to_block(self.block_size)

    __or__ = union
    __and__ = intersection
