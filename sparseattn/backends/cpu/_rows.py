"""Row-gather steps shared by the token-level (CSR) CPU kernels, forward and backward.

A token row names arbitrary keys, so its kernels gather one K/V (or, key-major, q/dout) row per
entry. Taking four entries per step gives four independent dot products that share every load of
the fixed row and keep the FMA units busy (one dot alone is a latency-bound reduction), and one
load and store of an accumulator per four rows. Plain indexing, no row views: a view costs an
atomic refcount update on the shared array, which threads would fight over for every row.
"""

from __future__ import annotations

from numba import njit

from ._fastmath import FASTMATH
from ._prefetch import prefetch

__all__ = ["dot4", "axpy4", "prefetch_rows"]


@njit(cache=True, fastmath=FASTMATH, inline="always")
def dot4(qrow, k, b, h, j0, j1, j2, j3, zero):
    """``qrow . k[b, h, j_u]`` for the four rows ``j0..j3`` (see the module doc)."""
    a0 = a1 = a2 = a3 = zero
    for d in range(qrow.shape[0]):
        qd = qrow[d]
        a0 += qd * k[b, h, j0, d]
        a1 += qd * k[b, h, j1, d]
        a2 += qd * k[b, h, j2, d]
        a3 += qd * k[b, h, j3, d]
    return a0, a1, a2, a3


@njit(cache=True, fastmath=FASTMATH, inline="always")
def axpy4(acc, v, b, h, j0, j1, j2, j3, e0, e1, e2, e3):
    """``acc += sum_u e_u * v[b, h, j_u]`` for four keys: one load and store of acc per four."""
    for d in range(acc.shape[0]):
        acc[d] += (e0 * v[b, h, j0, d] + e1 * v[b, h, j1, d]
                   + e2 * v[b, h, j2, d] + e3 * v[b, h, j3, d])


@njit(cache=True, inline="always")
def prefetch_rows(x, b, h, indices, p, last, line):
    """Prefetch the rows ``x[b, h, indices[p + u]]`` of the four entries from ``p`` on."""
    for u in range(4):
        j = indices[min(p + u, last)]
        for d in range(0, x.shape[3], line):
            prefetch(x, b, h, j, d)
