"""Row-gather steps shared by the token-level (CSR) CPU kernels, forward and backward.

A token row names arbitrary keys, so its kernels gather one K/V (or, key-major, q/dout) row per
entry. Taking four entries per step gives four independent dot products that share every load of
the fixed row and keep the FMA units busy (one dot alone is a latency-bound reduction), and one
load and store of an accumulator per four rows. Plain indexing, no row views: a view costs an
atomic refcount update on the shared array, which threads would fight over for every row.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ... import config

from ._fastmath import FASTMATH
from ._prefetch import prefetch
from ._threads import num_threads

__all__ = ["dot4", "axpy4", "dot1", "axpy1", "prefetch_rows", "piece_rows", "one_head_at_a_time"]


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


@njit(cache=True, fastmath=FASTMATH, inline="always")
def dot1(row, x, b, h, j, zero):
    """``row . x[b, h, j]``: the step for a row's last (fewer than four) entries."""
    a = zero
    for d in range(row.shape[0]):  # a reduction: vectorised under fastmath's reassoc
        a += row[d] * x[b, h, j, d]
    return a


@njit(cache=True, fastmath=FASTMATH, inline="always")
def axpy1(acc, x, b, h, j, e):
    """``acc += e * x[b, h, j]``."""
    for d in range(acc.shape[0]):
        acc[d] += e * x[b, h, j, d]


@njit(cache=True, inline="always")
def prefetch_rows(x, b, h, indices, p, last, line):
    """Prefetch the rows ``x[b, h, indices[p + u]]`` of the four entries from ``p`` on."""
    for u in range(4):
        j = indices[min(p + u, last)]
        for d in range(0, x.shape[3], line):
            prefetch(x, b, h, j, d)


@njit(cache=True)
def piece_rows(indptr, row0, rows, piece, pieces):
    """Rows ``[r0, r1)`` (relative to ``row0``) of piece ``piece`` of ``pieces`` of about equal
    numbers of entries."""
    ptr = indptr[row0:row0 + rows + 1]
    nnz = ptr[rows] - ptr[0]
    r0 = np.searchsorted(ptr, ptr[0] + nnz * piece // pieces)
    r1 = np.searchsorted(ptr, ptr[0] + nnz * (piece + 1) // pieces)
    if piece == pieces - 1:
        r1 = rows
    return min(r0, rows), min(r1, rows)


def one_head_at_a_time(k, v, n_q):
    """Whether scattered token rows are computed one head at a time by all threads (the forward's
    ``csr_forward_by_head``, the backward's ``csr_backward_by_head``): when one head's K and V
    take more than ``config.CSR_BY_HEAD_MIN_BYTES`` and there are rows enough to keep every
    thread busy."""
    head_bytes = k.shape[2] * (k.shape[3] * k.itemsize + v.shape[3] * v.itemsize)
    return (head_bytes > config.CSR_BY_HEAD_MIN_BYTES
            and n_q >= config.CSR_BY_HEAD_MIN_ROWS * num_threads())
