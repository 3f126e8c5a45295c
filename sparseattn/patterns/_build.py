"""Layout builders shared by the pattern families.

Most static patterns say, for each query row, which keys it sees as a union of a few
*components*. A component allows the keys ``j`` with

    lo[r] <= j < hi[r]   and   (j - phase[r]) mod period < width

(``period = 1`` is a plain interval). Sliding windows, dense and causal masks, sinks, dilated and
Sparse-Transformer patterns and Longformer's global columns are all one or a few components, so
one builder pair serves them all:

* :func:`components_to_csr`: token-level CSR, filled by a Numba kernel straight from the
  component arrays (a K-way merge per row), O(nnz) time and memory.
* :func:`components_to_block`: block CSR without touching elements of full blocks. Per block row
  it reduces the component edges to a candidate column range and a range of provably full
  blocks; only the few remaining (partial) blocks look at their rows, and they are de-duplicated
  by the component edges relative to the block *before* any element mask is built, so a sliding
  window at N = 1M builds a handful of ``(bq, bk)`` masks.

Patterns defined on a block grid (BigBird, block-sparse) use :func:`expand_block_rows`.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit, prange

from .._validation import check_memory
from ..layout import (BlockCSRLayout, CSRLayout, _dedupe_masks, _index_dtype, _indptr_from_rows)

__all__ = ["Components", "components_to_csr", "components_to_block", "expand_block_rows",
           "stack_heads", "empty_layout", "ranges"]

#: Partial blocks whose edge keys are examined at once (bounds the builder's scratch memory).
_KEY_CHUNK = 16384


class Components(NamedTuple):
    """Per-row key sets of a pattern, as a union of K periodic intervals.

    ``lo``, ``hi``, ``phase``: int64 ``(K, rows)``; ``period``, ``width``: int64 ``(K,)``.
    ``lo``/``hi`` are clipped to ``[0, n_k]`` with ``hi >= lo``; ``0 <= phase < period``;
    ``1 <= width <= period``.
    """

    lo: np.ndarray
    hi: np.ndarray
    phase: np.ndarray
    period: np.ndarray
    width: np.ndarray

    @property
    def k(self):
        return self.lo.shape[0]


def interval(pos, lo, hi, n_k):
    """One plain-interval component ``[lo, hi)`` (clipped) for the rows at positions ``pos``."""
    lo = np.clip(np.asarray(lo, np.int64), 0, n_k)
    hi = np.maximum(np.clip(np.asarray(hi, np.int64), 0, n_k), lo)
    lo, hi, _ = np.broadcast_arrays(lo, hi, pos)
    z = np.zeros((1,) + lo.shape, np.int64)
    return Components(lo[None].copy(), hi[None].copy(), z, np.ones(1, np.int64), np.ones(1, np.int64))


def periodic(pos, lo, hi, phase, period, width, n_k):
    """One periodic component: ``lo <= j < hi`` and ``(j - phase) mod period < width``."""
    lo = np.clip(np.asarray(lo, np.int64), 0, n_k)
    hi = np.maximum(np.clip(np.asarray(hi, np.int64), 0, n_k), lo)
    phase = np.mod(np.asarray(phase, np.int64), period)
    lo, hi, phase, _ = np.broadcast_arrays(lo, hi, phase, pos)
    return Components(lo[None].copy(), hi[None].copy(), phase[None].copy(),
                      np.array([period], np.int64), np.array([min(width, period)], np.int64))


def concat(*parts):
    """Union of component sets (rows must match)."""
    return Components(*(np.concatenate([getattr(p, f) for p in parts]) for f in Components._fields))


def limit_hi(comps, hi):
    """Intersect every component with ``j < hi[r]`` (used by the causal modifier)."""
    new_hi = np.minimum(comps.hi, np.asarray(hi, np.int64)[None])
    new_hi = np.maximum(new_hi, comps.lo)
    return comps._replace(hi=new_hi)


def ranges(starts, stops):
    """Concatenation of ``arange(starts[i], stops[i])`` (vectorised; empty ranges allowed)."""
    starts = np.asarray(starts, np.int64)
    counts = np.maximum(np.asarray(stops, np.int64) - starts, 0)
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, np.int64), counts
    ends = np.cumsum(counts)
    out = np.ones(total, np.int64)
    nz = counts > 0
    first = (ends - counts)[nz]
    s = starts[nz]
    out[first[0]] = s[0]
    # at each range start, jump from the previous range's last value to this range's start
    prev_last = (s + counts[nz] - 1)[:-1]
    out[first[1:]] = s[1:] - prev_last
    np.cumsum(out, out=out)
    return out, counts


# ----------------------------------------------------------------------------- token-level CSR


@njit(cache=True, inline="always")
def _next(j, hi, ph, per, wid):
    """Smallest j' >= j allowed by one component, or ``hi`` when none is left."""
    if per > 1:
        m = (j - ph) % per
        if m >= wid:
            j += per - m
    return j if j < hi else hi


@njit(cache=True, inline="always")
def _count_one(lo, hi, ph, per, wid):
    """Keys of one component in closed form."""
    if hi <= lo:
        return 0
    if per == 1:
        return hi - lo

    def f(x):
        q = (x - ph) // per
        m = (x - ph) - q * per
        return q * wid + min(m, wid)

    return f(hi) - f(lo)


@njit(parallel=True, cache=True)
def _csr_counts(lo, hi, phase, period, width, counts):
    K, R = lo.shape
    for r in prange(R):
        if K == 1:
            counts[r] = _count_one(lo[0, r], hi[0, r], phase[0, r], period[0], width[0])
            continue
        cur = np.empty(K, np.int64)
        for k in range(K):
            cur[k] = _next(lo[k, r], hi[k, r], phase[k, r], period[k], width[k])
        n = 0
        while True:
            best = -1
            bj = 0
            for k in range(K):
                if cur[k] < hi[k, r] and (best < 0 or cur[k] < bj):
                    best = k
                    bj = cur[k]
            if best < 0:
                break
            n += 1
            for k in range(K):
                if cur[k] == bj:
                    cur[k] = _next(bj + 1, hi[k, r], phase[k, r], period[k], width[k])
        counts[r] = n


@njit(parallel=True, cache=True)
def _csr_fill(lo, hi, phase, period, width, indptr, out):
    K, R = lo.shape
    for r in prange(R):
        p = indptr[r]
        if K == 1:
            h = hi[0, r]
            j = _next(lo[0, r], h, phase[0, r], period[0], width[0])
            if period[0] == 1:
                for jj in range(j, h):
                    out[p] = jj
                    p += 1
            else:
                while j < h:
                    out[p] = j
                    p += 1
                    j = _next(j + 1, h, phase[0, r], period[0], width[0])
            continue
        cur = np.empty(K, np.int64)
        for k in range(K):
            cur[k] = _next(lo[k, r], hi[k, r], phase[k, r], period[k], width[k])
        while True:
            best = -1
            bj = 0
            for k in range(K):
                if cur[k] < hi[k, r] and (best < 0 or cur[k] < bj):
                    best = k
                    bj = cur[k]
            if best < 0:
                break
            out[p] = bj
            p += 1
            for k in range(K):
                if cur[k] == bj:
                    cur[k] = _next(bj + 1, hi[k, r], phase[k, r], period[k], width[k])


def components_to_csr(comps, n_q, n_k):
    """Token-level CSR (one head) of a component set with ``n_q`` rows."""
    counts = np.empty(n_q, np.int64)
    if n_q:
        _csr_counts(comps.lo, comps.hi, comps.phase, comps.period, comps.width, counts)
    indptr = np.zeros(n_q + 1, np.int64)
    np.cumsum(counts, out=indptr[1:])
    nnz = int(indptr[-1])
    check_memory(nnz * np.dtype(_index_dtype(n_k, nnz)).itemsize, f"a layout with {nnz} non-zeros")
    out = np.empty(nnz, _index_dtype(n_k, nnz))
    if nnz:
        _csr_fill(comps.lo, comps.hi, comps.phase, comps.period, comps.width, indptr, out)
    return CSRLayout(indptr, out, (n_q, n_k), 1, check=False)


# ----------------------------------------------------------------------------- block CSR


@njit(cache=True)  # serial: a few hundred thousand rows at most, not worth waking threads
def _edge_keys_kernel(lo, hi, phase, period, width, brow, bcol, n_rows, n_k, bq, bk, out):
    K = lo.shape[0]
    for b in range(brow.shape[0]):
        J = bcol[b] * bk
        cv = min(bk, n_k - J)
        col = 0
        for k in range(K):
            per = period[k]
            has_ph = per > 1 and width[k] < per
            for r in range(bq):
                i = brow[b] * bq + r
                L = 0
                H = 0
                ph = 0
                if i < n_rows:
                    L = min(max(lo[k, i] - J, 0), cv)
                    H = min(max(hi[k, i] - J, 0), cv)
                    if H <= L:
                        L = 0
                        H = 0
                    elif has_ph:
                        ph = (J - phase[k, i]) % per
                out[b, col + r] = L
                out[b, col + bq + r] = H
                if has_ph:
                    out[b, col + 2 * bq + r] = ph
            col += 3 * bq if has_ph else 2 * bq


def _edge_keys(comps, brow, bcol, n_q, n_k, bq, bk):
    """Per block, each component's row edges relative to the block, clipped to its valid columns
    (and, for a periodic component, its phase): together they fix the block's mask. Rows out of
    range and empty rows read as ``L = H = 0``. Every entry is < max(bk, period): int32."""
    ncols = sum((3 if (comps.period[k] > 1 and comps.width[k] < comps.period[k]) else 2) * bq
                for k in range(comps.k))
    out = np.empty((brow.shape[0], ncols), np.int32)
    if brow.shape[0]:
        _edge_keys_kernel(comps.lo, comps.hi, comps.phase, comps.period, comps.width,
                          np.ascontiguousarray(brow, np.int64), np.ascontiguousarray(bcol, np.int64),
                          n_q, n_k, bq, bk, out)
    return out


def _mask_from_key(key, comps, bq, bk):
    """Element mask of one block from its edge key (the inverse of :func:`_edge_keys`)."""
    c = np.arange(bk, dtype=np.int64)[None, :]
    out = np.zeros((bq, bk), bool)
    pos = 0
    for k in range(comps.k):
        L, H = key[pos:pos + bq, None], key[pos + bq:pos + 2 * bq, None]
        pos += 2 * bq
        m = (c >= L) & (c < H)
        per, wid = comps.period[k], comps.width[k]
        if per > 1 and wid < per:
            ph = key[pos:pos + bq, None]
            pos += bq
            m &= np.mod(ph + c, per) < wid
        out |= m
    return out



class _MaskBank:
    """Distinct partial-block masks met so far, keyed by their edge keys (shared across chunks)."""

    def __init__(self, bq, bk):
        self.bq, self.bk = bq, bk
        self.lookup = {}
        self.masks = []
        self.counts = []

    def ids(self, keys, comps):
        """Mask id of every row of ``keys`` (building each distinct mask once)."""
        view = keys.view(np.dtype((np.void, keys.shape[1] * keys.itemsize))).ravel()
        uniq, first, inv = np.unique(view, return_index=True, return_inverse=True)
        local = np.empty(uniq.shape[0], np.int64)
        for u in range(uniq.shape[0]):  # distinct masks only: a handful for banded patterns
            b = uniq[u].tobytes()
            got = self.lookup.get(b)
            if got is None:
                got = len(self.masks)
                self.lookup[b] = got
                m = _mask_from_key(keys[first[u]], comps, self.bq, self.bk)
                self.masks.append(m)
                self.counts.append(int(m.sum()))
            local[u] = got
        return local[inv.ravel()]

    def finish(self, mask_index):
        """Compact the masks to those ``mask_index`` uses, de-duplicated by content."""
        masks = np.array(self.masks, bool).reshape(-1, self.bq, self.bk)
        used = np.nonzero(np.bincount(mask_index[mask_index >= 0], minlength=masks.shape[0]))[0]
        umasks, inv = _dedupe_masks(masks[used])
        remap = np.full(max(masks.shape[0], 1), -1, np.int64)
        remap[used] = inv
        mask_index = mask_index.astype(np.int64)
        return np.where(mask_index >= 0, remap[np.maximum(mask_index, 0)], -1), umasks


#: Query rows handled at once by the block builder: bounds its temporaries (about 100 bytes per
#: candidate block) however long the sequence.
_ROW_CHUNK = 1 << 16


def components_to_block(comps_fn, n_q, n_k, block_size):
    """Exact block-CSR layout (one head) of a pattern given as components.

    ``comps_fn(pos)`` returns the :class:`Components` of the queries at positions ``pos``; it is
    called on consecutive slices of block rows so that scratch memory stays bounded.
    """
    bq, bk = block_size
    nbq = -(-n_q // bq)
    if n_q == 0 or n_k == 0:
        return empty_layout(n_q, n_k, 1, block_size)
    off = n_k - n_q
    bank = _MaskBank(bq, bk)
    step = max(1, _ROW_CHUNK // bq)
    counts = np.zeros(nbq, np.int64)
    out_cols, out_mid = [], []
    for b0 in range(0, nbq, step):
        b1 = min(nbq, b0 + step)
        r0, r1 = b0 * bq, min(b1 * bq, n_q)
        comps = comps_fn(np.arange(r0, r1, dtype=np.int64) + off)
        rows, cols, mid = _block_chunk(comps, r1 - r0, n_k, bq, bk, bank, b0, n_q)
        counts[b0:b1] = np.bincount(rows - b0, minlength=b1 - b0)
        out_cols.append(cols.astype(np.int32))  # keep only the compact forms across chunks
        out_mid.append(mid.astype(np.int32))
    indptr = np.zeros(nbq + 1, np.int64)
    np.cumsum(counts, out=indptr[1:])
    mask_index, masks = bank.finish(np.concatenate(out_mid))
    return BlockCSRLayout(indptr, np.concatenate(out_cols), (n_q, n_k), (bq, bk), 1,
                          mask_index.astype(np.int32), masks, check=False)


def _block_chunk(comps, n_rows, n_k, bq, bk, bank, b0, n_q):
    """Blocks of the block rows starting at ``b0`` whose ``n_rows`` rows ``comps`` describes.

    Returns global block rows, columns and mask ids (-1 full; ids index ``bank``).
    """
    nb = -(-n_rows // bq)
    nbk = -(-n_k // bk)
    starts = np.arange(nb, dtype=np.int64) * bq
    K = comps.k
    big = np.int64(np.iinfo(np.int64).max // 4)
    row_parts, col_parts, full_ranges = [], [], []
    for k in range(K):
        lo, hi = comps.lo[k], comps.hi[k]
        nonempty = hi > lo
        # candidate columns: from the least start to the greatest end of the rows' intervals
        minlo = np.minimum.reduceat(np.where(nonempty, lo, big), starts)
        maxhi = np.maximum.reduceat(np.where(nonempty, hi, -1), starts)
        br = np.nonzero(maxhi > minlo)[0]
        cols, counts = ranges(minlo[br] // bk, (maxhi[br] - 1) // bk + 1)
        row_parts.append(np.repeat(br, counts))
        col_parts.append(cols)
        if comps.period[k] == 1 or comps.width[k] >= comps.period[k]:
            # blocks that every row covers entirely: no element work, no mask
            maxlo = np.maximum.reduceat(lo, starts)
            minhi = np.minimum.reduceat(hi, starts)
            f0 = -(-maxlo // bk)
            f1 = np.where(minhi >= n_k, nbk, minhi // bk)  # exclusive
            full_ranges.append((f0, f1))
    if K == 1:
        rows, cols = row_parts[0], col_parts[0]
    else:
        keys = np.unique(np.concatenate(row_parts) * nbk + np.concatenate(col_parts))
        rows, cols = np.divmod(keys, nbk)
    full = np.zeros(rows.shape[0], bool)
    for f0, f1 in full_ranges:
        full |= (cols >= f0[rows]) & (cols < f1[rows])
    mid = np.full(rows.shape[0], -1, np.int64)
    keep = np.ones(rows.shape[0], bool)
    part = np.nonzero(~full)[0]
    for s in range(0, part.shape[0], _KEY_CHUNK):
        idx = part[s:s + _KEY_CHUNK]
        keys = _edge_keys(comps, rows[idx], cols[idx], n_rows, n_k, bq, bk)
        ids = bank.ids(keys, comps)
        cnt = np.asarray(bank.counts, np.int64)[ids]
        grow = rows[idx] + b0
        area = np.minimum(bq, n_q - grow * bq) * np.minimum(bk, n_k - cols[idx] * bk)
        keep[idx[cnt == 0]] = False
        mid[idx] = np.where(cnt == area, -1, ids)
    return rows[keep] + b0, cols[keep], mid[keep]


# ----------------------------------------------------------------------------- block-grid patterns


@njit(parallel=True, cache=True)
def _expand_counts(pos, bsq, bsk, nrows, b_indptr, b_indices, n_k, causal, counts):
    for i in prange(pos.shape[0]):
        p = pos[i]
        n = 0
        if p >= 0:
            R = p // bsq
            if R < nrows:
                for t in range(b_indptr[R], b_indptr[R + 1]):
                    c0 = b_indices[t] * bsk
                    c1 = min(c0 + bsk, n_k)
                    if causal:
                        c1 = min(c1, p + 1)
                    if c1 > c0:
                        n += c1 - c0
        counts[i] = n


@njit(parallel=True, cache=True)
def _expand_fill(pos, bsq, bsk, nrows, b_indptr, b_indices, n_k, causal, indptr, out):
    for i in prange(pos.shape[0]):
        p = pos[i]
        w = indptr[i]
        if p >= 0:
            R = p // bsq
            if R < nrows:
                for t in range(b_indptr[R], b_indptr[R + 1]):
                    c0 = b_indices[t] * bsk
                    c1 = min(c0 + bsk, n_k)
                    if causal:
                        c1 = min(c1, p + 1)
                    for j in range(c0, c1):
                        out[w] = j
                        w += 1


def expand_block_rows(pos, grid_block, b_indptr, b_indices, n_k, causal=False):
    """Token CSR of queries at positions ``pos`` for a full-block pattern on a position grid.

    Row ``R`` of ``(b_indptr, b_indices)`` lists (sorted) the key blocks that positions
    ``[R * bsq, (R + 1) * bsq)`` see; ``grid_block = (bsq, bsk)``. ``causal`` also drops ``j > pos``.
    """
    bsq, bsk = grid_block
    n_q = pos.shape[0]
    nrows = b_indptr.shape[0] - 1
    b_indptr = np.ascontiguousarray(b_indptr, np.int64)
    b_indices = np.ascontiguousarray(b_indices, np.int64)
    counts = np.empty(n_q, np.int64)
    if n_q:
        _expand_counts(pos, bsq, bsk, nrows, b_indptr, b_indices, n_k, causal, counts)
    indptr = np.zeros(n_q + 1, np.int64)
    np.cumsum(counts, out=indptr[1:])
    nnz = int(indptr[-1])
    check_memory(nnz * np.dtype(_index_dtype(n_k, nnz)).itemsize, f"a layout with {nnz} non-zeros")
    out = np.empty(nnz, _index_dtype(n_k, nnz))
    if nnz:
        _expand_fill(pos, bsq, bsk, nrows, b_indptr, b_indices, n_k, causal, indptr, out)
    return CSRLayout(indptr, out, (n_q, n_k), 1, check=False)


# ----------------------------------------------------------------------------- heads


def empty_layout(n_q, n_k, heads, block_size):
    """A layout with no allowed pair."""
    if block_size is None:
        return CSRLayout(np.zeros(heads * n_q + 1, np.int64), np.zeros(0, np.int32), (n_q, n_k),
                         heads, check=False)
    bq, bk = block_size
    nbq = -(-n_q // bq)
    return BlockCSRLayout(np.zeros(heads * nbq + 1, np.int64), np.zeros(0, np.int32), (n_q, n_k),
                          (bq, bk), heads, check=False)


def stack_heads(layouts):
    """One layout whose head ``h`` is ``layouts[h]`` (each a one-head layout of the same kind)."""
    first = layouts[0]
    if len(layouts) == 1:
        return first
    offs = np.cumsum([0] + [lay.indices.shape[0] for lay in layouts])
    indptr = np.concatenate([lay.indptr[:-1] + o for lay, o in zip(layouts, offs)] + [offs[-1:]])
    indices = np.concatenate([lay.indices for lay in layouts])
    heads = len(layouts)
    if isinstance(first, CSRLayout):
        return CSRLayout(indptr, indices, first.shape, heads, check=False)
    moffs = np.cumsum([0] + [lay.masks.shape[0] for lay in layouts])
    mask_index = np.concatenate([np.where(lay.mask_index >= 0, lay.mask_index + o, -1)
                                 for lay, o in zip(layouts, moffs)])
    masks, remap = _dedupe_masks(np.concatenate([lay.masks for lay in layouts]))
    mask_index = np.where(mask_index >= 0, remap[np.maximum(mask_index, 0)] if remap.size else -1, -1)
    return BlockCSRLayout(indptr, indices, first.shape, first.block_size, heads, mask_index, masks,
                          check=False)


# ----------------------------------------------------------------------------- block-level set ops


def merge_blocks(a, b, op):
    """Union (``op="or"``) or intersection (``op="and"``) of two one-head block layouts.

    Works on blocks, not elements: a full block decides alone, a block present in one layout only
    keeps its mask (union), and only the distinct *pairs* of partial masks are combined
    element-wise, so a sliding window united with sinks combines a handful of masks however long
    the sequence.
    """
    if a.block_size != b.block_size or a.shape != b.shape:
        raise ValueError(
            f"cannot combine block layouts of shape/block size {a.shape}/{a.block_size} and "
            f"{b.shape}/{b.block_size}"
        )
    bq, bk = a.block_size
    n_q, n_k = a.shape
    nbq, nbk = a.grid
    ka = np.repeat(np.arange(nbq, dtype=np.int64), np.diff(a.indptr)) * nbk + a.indices
    kb = np.repeat(np.arange(nbq, dtype=np.int64), np.diff(b.indptr)) * nbk + b.indices
    keys = np.union1d(ka, kb) if op == "or" else np.intersect1d(ka, kb, assume_unique=True)
    ia = np.minimum(np.searchsorted(ka, keys), max(ka.shape[0] - 1, 0))
    ib = np.minimum(np.searchsorted(kb, keys), max(kb.shape[0] - 1, 0))
    in_a = (ka[ia] == keys) if ka.size else np.zeros(keys.shape[0], bool)
    in_b = (kb[ib] == keys) if kb.size else np.zeros(keys.shape[0], bool)
    ma = np.where(in_a, a.mask_index[ia] if ka.size else 0, -2)  # -2: absent, -1: full
    mb = np.where(in_b, b.mask_index[ib] if kb.size else 0, -2)
    n_a = a.masks.shape[0]
    stack = [a.masks, b.masks]
    mid = np.full(keys.shape[0], -1, np.int64)  # full unless set below
    if op == "or":
        only_a = (ma >= 0) & (mb == -2)
        only_b = (mb >= 0) & (ma == -2)
        mid[only_a] = ma[only_a]
        mid[only_b] = mb[only_b] + n_a
    else:
        a_only = (ma >= 0) & (mb == -1)
        b_only = (mb >= 0) & (ma == -1)
        mid[a_only] = ma[a_only]
        mid[b_only] = mb[b_only] + n_a
    both = (ma >= 0) & (mb >= 0)
    if np.any(both):
        pair = ma[both] * max(b.masks.shape[0], 1) + mb[both]
        upair, inv = np.unique(pair, return_inverse=True)
        pa, pb = np.divmod(upair, max(b.masks.shape[0], 1))
        combined = (a.masks[pa] | b.masks[pb]) if op == "or" else (a.masks[pa] & b.masks[pb])
        stack.append(combined)
        mid[both] = n_a + b.masks.shape[0] + inv.ravel()
    masks = np.concatenate(stack)
    rows, cols = np.divmod(keys, nbk)
    # a combination may have become full or (intersection) empty
    partial = mid >= 0
    area = np.minimum(bq, n_q - rows * bq) * np.minimum(bk, n_k - cols * bk)
    counts = masks.reshape(masks.shape[0], bq * bk).sum(axis=1)
    cnt = np.where(partial, counts[np.maximum(mid, 0)] if counts.size else 0, area)
    keep = cnt > 0
    mid = np.where(partial & (cnt == area), -1, mid)
    rows, cols, mid = rows[keep], cols[keep], mid[keep]
    used = np.unique(mid[mid >= 0])
    umasks, inv = _dedupe_masks(masks[used])
    remap = np.full(max(masks.shape[0], 1), -1, np.int64)
    remap[used] = inv
    mid = np.where(mid >= 0, remap[np.maximum(mid, 0)], -1)
    return BlockCSRLayout(_indptr_from_rows(rows, nbq), cols, (n_q, n_k), (bq, bk), 1, mid, umasks,
                          check=False)


def _is_plain(comps, k):
    return comps.period[k] == 1 or comps.width[k] >= comps.period[k]


def intersect(a, b):
    """Components of ``a & b`` (pairwise: the union distributes), or None when some pair of
    periodic components cannot be expressed as one component (then layouts are intersected)."""
    out = []
    for i in range(a.k):
        for j in range(b.k):
            lo = np.maximum(a.lo[i], b.lo[j])
            hi = np.maximum(np.minimum(a.hi[i], b.hi[j]), lo)
            if _is_plain(a, i) or _is_plain(b, j):
                src, k = (b, j) if _is_plain(a, i) else (a, i)
                out.append(Components(lo[None], hi[None], src.phase[k][None], src.period[k:k + 1],
                                      src.width[k:k + 1]))
            elif a.period[i] == b.period[j] and a.width[i] == 1 and b.width[j] == 1:
                # one residue each: the rows whose residues differ keep nothing
                hi = np.where(a.phase[i] == b.phase[j], hi, lo)
                out.append(Components(lo[None], hi[None], a.phase[i][None], a.period[i:i + 1],
                                      a.width[i:i + 1]))
            else:
                return None
    return concat(*out)


def grid_to_block(g_indptr, g_indices, grid_block, n_cols, n_q, n_k, block_size, causal):
    """Exact block layout (one head) of a full-block grid pattern at another block size.

    The grid's cell ``(R, C)`` allows positions ``[R*gq, (R+1)*gq)`` x keys ``[C*gk, (C+1)*gk)``
    (``n_cols`` grid columns); queries are the last ``n_q`` of ``n_k`` positions; ``causal`` also
    keeps only ``j <= i``. A layout block's mask is fixed by its offsets inside the grid cells,
    the bits of the few cells it overlaps, its clipped extent and (causal) its offset to the
    diagonal, so blocks are de-duplicated on that key and each distinct mask is built once.
    """
    gq, gk = grid_block
    bq, bk = block_size
    nbq, nbk = -(-n_q // bq), -(-n_k // bk)
    off = n_k - n_q
    n_rows = g_indptr.shape[0] - 1
    g_rows = np.repeat(np.arange(n_rows, dtype=np.int64), np.diff(g_indptr))
    g_cols = np.asarray(g_indices, np.int64)
    gkeys = g_rows * n_cols + g_cols  # sorted (CSR order)
    # layout blocks each grid cell overlaps (a small rectangle of them)
    q0 = np.maximum(g_rows * gq - off, 0)
    q1 = np.minimum((g_rows + 1) * gq - off, n_q)
    c1 = np.minimum((g_cols + 1) * gk, n_k)
    ok = (q1 > q0) & (c1 > g_cols * gk)
    br0, br1 = q0[ok] // bq, (q1[ok] - 1) // bq + 1
    bc0, bc1 = (g_cols[ok] * gk) // bk, (c1[ok] - 1) // bk + 1
    nr, nc = br1 - br0, bc1 - bc0
    cell = np.repeat(np.arange(nr.shape[0]), nr * nc)
    t, _ = ranges(np.zeros_like(nr), nr * nc)
    rows = br0[cell] + t // nc[cell]
    cols = bc0[cell] + t % nc[cell]
    keys = np.unique(rows * nbk + cols)
    rows, cols = np.divmod(keys, nbk)
    I = rows * bq + off  # first position of each block
    J = cols * bk
    rv = np.minimum(bq, n_q - rows * bq)
    cv = np.minimum(bk, n_k - J)
    R0, C0 = I // gq, J // gk
    SR, SC = (bq + gq - 2) // gq + 2, (bk + gk - 2) // gk + 2  # grid cells a block can overlap
    sr, sc = np.arange(SR), np.arange(SC)
    Rs = R0[:, None, None] + sr[None, :, None]
    Cs = C0[:, None, None] + sc[None, None, :]
    inside = (Rs >= 0) & (Rs < n_rows) & (Cs < n_cols)
    inside &= (sr[None, :, None] * gq < (I % gq + rv)[:, None, None])
    inside &= (sc[None, None, :] * gk < (J % gk + cv)[:, None, None])
    ck = np.where(inside, Rs * n_cols + Cs, -1).reshape(rows.shape[0], SR * SC)
    pos = np.minimum(np.searchsorted(gkeys, ck), max(gkeys.shape[0] - 1, 0))
    bits = inside.reshape(ck.shape) & (gkeys[pos] == ck) if gkeys.size else np.zeros(ck.shape, bool)
    diag = np.clip(I - J, -bq, bk - 1) if causal else np.zeros_like(I)
    key = np.concatenate([(I % gq)[:, None], (J % gk)[:, None], rv[:, None], cv[:, None],
                          diag[:, None], bits.astype(np.int64)], axis=1).astype(np.int32)
    view = np.ascontiguousarray(key).view(np.dtype((np.void, key.shape[1] * 4))).ravel()
    _, first, inv = np.unique(view, return_index=True, return_inverse=True)
    inv = inv.ravel()
    r, c = np.arange(bq)[:, None], np.arange(bk)[None, :]
    masks = np.empty((first.shape[0], bq, bk), bool)
    for u, b in enumerate(first):  # one mask per distinct key
        sub = bits[b].reshape(SR, SC)
        m = sub[(I[b] % gq + r) // gq, (J[b] % gk + c) // gk] & (r < rv[b]) & (c < cv[b])
        if causal:
            m &= (diag[b] + r - c) >= 0
        masks[u] = m
    counts = masks.reshape(masks.shape[0], bq * bk).sum(axis=1)[inv]
    keep = counts > 0
    mid = np.where(counts == rv * cv, -1, inv)
    rows, cols, mid = rows[keep], cols[keep], mid[keep]
    used = np.nonzero(np.bincount(mid[mid >= 0], minlength=masks.shape[0]))[0]
    umasks, uinv = _dedupe_masks(masks[used])
    remap = np.full(max(masks.shape[0], 1), -1, np.int64)
    remap[used] = uinv
    mid = np.where(mid >= 0, remap[np.maximum(mid, 0)], -1)
    return BlockCSRLayout(_indptr_from_rows(rows, nbq), cols, (n_q, n_k), (bq, bk), 1, mid, umasks,
                          check=False)


def causal_csr(lay):
    """Drop the entries of a one-head token layout whose key lies after the query's position."""
    n_q, n_k = lay.shape
    rows = np.repeat(np.arange(n_q, dtype=np.int64), np.diff(lay.indptr))
    keep = lay.indices <= rows + (n_k - n_q)
    return CSRLayout(_indptr_from_rows(rows[keep], n_q), lay.indices[keep], lay.shape, 1, check=False)


def causal_block(lay):
    """Keep only ``j <= i`` in a one-head block layout: blocks wholly after the diagonal go, blocks
    it cuts get their mask cut by a triangle (each distinct (mask, offset) pair built once)."""
    bq, bk = lay.block_size
    n_q, n_k = lay.shape
    nbq = lay.grid[0]
    rows = np.repeat(np.arange(nbq, dtype=np.int64), np.diff(lay.indptr))
    cols = lay.indices.astype(np.int64)
    I = rows * bq + (n_k - n_q)
    J = cols * bk
    rv = np.minimum(bq, n_q - rows * bq)
    cv = np.minimum(bk, n_k - J)
    keep = I + rv - 1 >= J  # some row of the block reaches the block's first key
    cut = keep & (I < J + cv - 1)  # and some key is after some row: the diagonal crosses it
    mid = lay.mask_index.astype(np.int64).copy()
    idx = np.nonzero(cut)[0]
    masks = lay.masks
    if idx.size:
        d = I[idx] - J[idx]
        key = np.stack([mid[idx], d, rv[idx], cv[idx]], axis=1)
        ukey, first, inv = np.unique(key, axis=0, return_index=True, return_inverse=True)
        r, c = np.arange(bq)[:, None], np.arange(bk)[None, :]
        new = np.empty((ukey.shape[0], bq, bk), bool)
        for u, (m, du, rvu, cvu) in enumerate(ukey):  # distinct (mask, offset) pairs only
            base = masks[m] if m >= 0 else np.ones((bq, bk), bool)
            new[u] = base & (r < rvu) & (c < cvu) & (du + r - c >= 0)
        counts = new.reshape(new.shape[0], bq * bk).sum(axis=1)[inv.ravel()]
        keep[idx[counts == 0]] = False
        ids = masks.shape[0] + inv.ravel()
        mid[idx] = np.where(counts == rv[idx] * cv[idx], -1, ids)
        masks = np.concatenate([masks, new])
    rows, cols, mid = rows[keep], cols[keep], mid[keep]
    used = np.nonzero(np.bincount(mid[mid >= 0], minlength=masks.shape[0]))[0]
    umasks, uinv = _dedupe_masks(masks[used])
    remap = np.full(max(masks.shape[0], 1), -1, np.int64)
    remap[used] = uinv
    mid = np.where(mid >= 0, remap[np.maximum(mid, 0)], -1)
    return BlockCSRLayout(_indptr_from_rows(rows, nbq), cols, lay.shape, lay.block_size, 1, mid,
                          umasks, check=False)
