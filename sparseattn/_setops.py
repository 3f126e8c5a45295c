"""Union and intersection of two token-level CSR layouts, row by row in linear time.

Rows of a layout hold strictly increasing key indices, so two rows combine by one merge pass;
sorting the concatenated entries (``np.union1d`` / ``np.intersect1d``) cost ``O(nnz log nnz)``
and several copies: 25 s for ``dilated(2) & dilated(3)`` at N=16384. Two parallel passes here:
count each row's result, then fill it.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

__all__ = ["combine_rows"]


@njit(cache=True, inline="always")
def _merge_row(a, a0, a1, b, b0, b1, union, out, o):
    """Merge ``a[a0:a1]`` and ``b[b0:b1]`` (each strictly increasing); write at ``out[o:]`` when
    ``out`` is not empty; return how many entries the result has."""
    write = out.shape[0] > 0
    i, j, n = a0, b0, 0
    while i < a1 and j < b1:
        x, y = a[i], b[j]
        if x == y:
            if write:
                out[o + n] = x
            n += 1
            i += 1
            j += 1
        elif x < y:
            if union:
                if write:
                    out[o + n] = x
                n += 1
            i += 1
        else:
            if union:
                if write:
                    out[o + n] = y
                n += 1
            j += 1
    if union:
        while i < a1:
            if write:
                out[o + n] = a[i]
            n += 1
            i += 1
        while j < b1:
            if write:
                out[o + n] = b[j]
            n += 1
            j += 1
    return n


@njit(parallel=True, cache=True)
def _count(ptr_a, idx_a, ptr_b, idx_b, union, counts):
    empty = np.empty(0, idx_a.dtype)  # a zero-length output: count only
    for r in prange(counts.shape[0]):
        counts[r] = _merge_row(idx_a, ptr_a[r], ptr_a[r + 1], idx_b, ptr_b[r], ptr_b[r + 1], union,
                               empty, 0)


@njit(parallel=True, cache=True)
def _fill(ptr_a, idx_a, ptr_b, idx_b, union, indptr, out):
    for r in prange(indptr.shape[0] - 1):
        _merge_row(idx_a, ptr_a[r], ptr_a[r + 1], idx_b, ptr_b[r], ptr_b[r + 1], union, out,
                   indptr[r])


def combine_rows(ptr_a, idx_a, ptr_b, idx_b, union):
    """Row-wise union (``union=True``) or intersection of two CSR index structures.

    Parameters
    ----------
    ptr_a, ptr_b : ndarray of int, shape (rows + 1,)
    idx_a, idx_b : ndarray of int
        Strictly increasing within each row; one integer dtype for both.
    union : bool

    Returns
    -------
    indptr : ndarray of int64, shape (rows + 1,)
    indices : ndarray, ``idx_a``'s dtype
    """
    idx_b = idx_b.astype(idx_a.dtype, copy=False)
    counts = np.empty(ptr_a.shape[0] - 1, np.int64)
    _count(ptr_a, idx_a, ptr_b, idx_b, union, counts)
    indptr = np.zeros(counts.shape[0] + 1, np.int64)
    np.cumsum(counts, out=indptr[1:])
    out = np.empty(indptr[-1], idx_a.dtype)
    _fill(ptr_a, idx_a, ptr_b, idx_b, union, indptr, out)
    return indptr, out
