"""Forward kernels of the CPU backend (Numba, parallel over work-balanced task chunks).

Both kernels keep a flash-style online softmax: per query row a running maximum ``m``, a running
sum ``l`` of ``exp(s - m)`` and an un-normalised output accumulator, rescaled whenever ``m`` grows,
so no row of probabilities longer than one tile ever exists.

* ``block_forward``: block-CSR. One task is one (batch, head, query block). Runs of consecutive
  key blocks (up to ``config.CPU_MAX_KEY_TILE`` keys) form one wide tile: a ``(bq, D) x (D, w)``
  BLAS product for the scores and a ``(bq, w) x (w, Dv)`` one for the values. Full blocks skip
  the element mask entirely. Scores are exponentiated by the vectorised
  :func:`~._fastmath.exp_row`.
* ``csr_forward``: token-level CSR with arbitrary (scattered) keys. One task is one
  (batch, head, query); keys are gathered in chunks of ``config.CSR_KEY_CHUNK``.

Kernels trust their inputs: :mod:`sparseattn.api` validated shapes and the layout's constructor
validated every index, so every read below is in bounds.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ... import config
from ._fastmath import FASTMATH, exp_row, fast_exp, neg_inf_of, one_of, zero_of
from ._prefetch import CACHE_LINE, prefetch
from ._rows import axpy1, axpy4, dot1, dot4, piece_rows, prefetch_rows
from ._tasks import task_coords

_CHUNK = config.CSR_KEY_CHUNK



@njit(cache=True, fastmath=FASTMATH)
def _online_update(s, nq, nk, m, l, acc, dv):
    """Turn scores ``s[:nq, :nk]`` into ``exp(s - m_new)`` in place; rescale ``l`` and ``acc``."""
    for i in range(nq):
        row = s[i]
        mx = m[i]
        for j in range(nk):
            mx = max(mx, row[j])
        if mx == -np.inf:  # nothing allowed in this row so far: contributes zeros
            for j in range(nk):
                row[j] = 0.0
            continue
        alpha = np.exp(m[i] - mx)
        l[i] = l[i] * alpha + exp_row(row, nk, mx)
        if alpha != 1.0:
            for d in range(dv):
                acc[i, d] *= alpha
        m[i] = mx


@njit(cache=True, fastmath=FASTMATH)
def _apply_mask(s, mask, nq, offset, width):
    """Set the scores a partial block's element mask forbids to -inf."""
    for i in range(nq):
        for j in range(width):
            s[i, offset + j] = s[i, offset + j] if mask[i, j] else -np.inf


@njit(parallel=True, cache=True)
def block_forward(q, k, v, indptr, indices, mask_index, masks, lay_heads, bq, bk, scale,
                  chunk_starts, out, lse, max_run):
    B, Hq, Nq, D = q.shape
    Bk, Hkv, Nk, _ = k.shape
    Dv = v.shape[3]
    nbq = (Nq + bq - 1) // bq
    group = Hq // Hkv
    for c in prange(chunk_starts.shape[0] - 1):
        qs = np.empty((bq, D), q.dtype)
        s_buf = np.empty(bq * bk * max_run, q.dtype)
        pv_buf = np.empty(bq * Dv, q.dtype)
        acc = np.empty((bq, Dv), q.dtype)
        m = np.empty(bq, q.dtype)
        l = np.empty(bq, q.dtype)
        for t in range(chunk_starts[c], chunk_starts[c + 1]):
            b, h, qb, lh, bkv, hk = task_coords(
                t, nbq, Hq, lay_heads, Bk, group)
            q0 = qb * bq
            nq = min(bq, Nq - q0)
            for i in range(nq):
                for d in range(D):
                    qs[i, d] = q[b, h, q0 + i, d] * scale
                m[i] = -np.inf
                l[i] = 0.0
                for d in range(Dv):
                    acc[i, d] = 0.0
            qt = qs[:nq]
            row = lh * nbq + qb
            p = indptr[row]
            pend = indptr[row + 1]
            while p < pend:
                # consecutive key blocks form one wide tile: fewer, larger BLAS calls
                pr = p + 1
                while pr < pend and pr - p < max_run and indices[pr] == indices[pr - 1] + 1:
                    pr += 1
                k0 = indices[p] * bk
                k1 = min(Nk, (indices[pr - 1] + 1) * bk)
                nk = k1 - k0
                s = s_buf[: nq * nk].reshape((nq, nk))
                np.dot(qt, k[bkv, hk, k0:k1].T, s)
                for pp in range(p, pr):
                    mi = mask_index[pp]
                    if mi >= 0:  # partial block: apply its element mask; full blocks skip this
                        _apply_mask(s, masks[mi], nq, (indices[pp] - indices[p]) * bk,
                                    min(bk, Nk - indices[pp] * bk))
                _online_update(s, nq, nk, m, l, acc, Dv)
                pv = pv_buf[: nq * Dv].reshape((nq, Dv))
                np.dot(s, v[bkv, hk, k0:k1], pv)
                for i in range(nq):
                    for d in range(Dv):
                        acc[i, d] += pv[i, d]
                p = pr
            for i in range(nq):
                if l[i] > 0.0:
                    inv = 1.0 / l[i]
                    for d in range(Dv):
                        out[b, h, q0 + i, d] = acc[i, d] * inv
                    lse[b, h, q0 + i] = m[i] + np.log(l[i])
                else:
                    for d in range(Dv):
                        out[b, h, q0 + i, d] = 0.0
                    lse[b, h, q0 + i] = -np.inf


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def csr_forward(q, k, v, indptr, indices, lay_heads, scale, chunk_starts, out, lse, ahead):
    B, Hq, Nq, D = q.shape
    Bk, Hkv, Nk, _ = k.shape
    Dv = v.shape[3]
    group = Hq // Hkv
    last = indices.shape[0] - 1
    line = max(1, CACHE_LINE // k.itemsize)  # k and v share the compute dtype
    for c in prange(chunk_starts.shape[0] - 1):
        qrow = np.empty(D, q.dtype)
        s = np.empty(_CHUNK, q.dtype)
        acc = np.empty(Dv, q.dtype)
        # typed constants: float64 literals would widen the float32 sums below (1.6x slower)
        zero = zero_of(q)
        neg_inf = neg_inf_of(q)
        for t in range(chunk_starts[c], chunk_starts[c + 1]):
            b, h, i, lh, bkv, hk = task_coords(
                t, Nq, Hq, lay_heads, Bk, group)
            for d in range(D):
                qrow[d] = q[b, h, i, d] * scale
            for d in range(Dv):
                acc[d] = 0.0
            m = neg_inf
            l = zero
            row = lh * Nq + i
            end = indptr[row + 1]
            for p0 in range(indptr[row], end, _CHUNK):
                n = min(_CHUNK, end - p0)
                mx = m
                # four keys at a time (see _rows.dot4)
                n4 = n - n % 4
                for p in range(0, n4, 4):
                    j0 = indices[p0 + p]
                    j1 = indices[p0 + p + 1]
                    j2 = indices[p0 + p + 2]
                    j3 = indices[p0 + p + 3]
                    # Scattered keys defeat the hardware prefetchers: ask for the K rows `ahead`
                    # keys on (the indices run on into the next row, which the next task reads)
                    # and for these keys' V rows, read after the chunk's scores. 0: keys are
                    # local, the hardware does it and prefetches would only cost issue slots.
                    if ahead > 0:
                        for u in range(4):
                            jk = indices[min(p0 + p + ahead + u, last)]
                            jv = indices[p0 + p + u]
                            for d in range(0, D, line):  # one loop for both: half the overhead
                                prefetch(k, bkv, hk, jk, d)
                                prefetch(v, bkv, hk, jv, min(d, Dv - 1))
                            for d in range(D, Dv, line):
                                prefetch(v, bkv, hk, jv, d)
                    a0, a1, a2, a3 = dot4(qrow, k, bkv, hk, j0, j1, j2, j3, zero)
                    s[p] = a0
                    s[p + 1] = a1
                    s[p + 2] = a2
                    s[p + 3] = a3
                    mx = max(mx, max(max(a0, a1), max(a2, a3)))
                for p in range(n4, n):
                    dot = dot1(qrow, k, bkv, hk, indices[p0 + p], zero)
                    s[p] = dot
                    mx = max(mx, dot)
                if mx == neg_inf:
                    continue
                alpha = np.exp(m - mx)
                l = l * alpha + exp_row(s, n, mx)
                for d in range(Dv):
                    acc[d] *= alpha
                for p in range(0, n4, 4):
                    e0 = s[p]
                    e1 = s[p + 1]
                    e2 = s[p + 2]
                    e3 = s[p + 3]
                    j0 = indices[p0 + p]
                    j1 = indices[p0 + p + 1]
                    j2 = indices[p0 + p + 2]
                    j3 = indices[p0 + p + 3]
                    axpy4(acc, v, bkv, hk, j0, j1, j2, j3, e0, e1, e2, e3)
                for p in range(n4, n):
                    axpy1(acc, v, bkv, hk, indices[p0 + p], s[p])
                m = mx
            if l > 0.0:
                inv = 1.0 / l
                for d in range(Dv):
                    out[b, h, i, d] = acc[d] * inv
                lse[b, h, i] = m + np.log(l)
            else:
                for d in range(Dv):
                    out[b, h, i, d] = 0.0
                lse[b, h, i] = -np.inf



@njit(cache=True, fastmath=FASTMATH)
def _weights_pass(q, k, indptr, indices, b, h, bkv, hk, row0, r0, r1, scale, ahead, w, base, lse):
    """Pass 1 of :func:`csr_forward_by_head` for query rows ``[r0, r1)`` of head ``(b, h)``: the
    softmax weights ``w[p - base]`` of every entry ``p`` of those rows, and the rows' lse."""
    D = q.shape[3]
    last = indices.shape[0] - 1
    line = max(1, CACHE_LINE // k.itemsize)
    zero = zero_of(q)
    neg_inf = neg_inf_of(q)
    qrow = np.empty(D, q.dtype)
    for i in range(r0, r1):
        for d in range(D):
            qrow[d] = q[b, h, i, d] * scale
        start = indptr[row0 + i]
        end = indptr[row0 + i + 1]
        p = start
        while p + 3 < end:
            if ahead > 0:  # the entries run on into the next row, which is computed next
                prefetch_rows(k, bkv, hk, indices, p + ahead, last, line)
            a0, a1, a2, a3 = dot4(qrow, k, bkv, hk, indices[p], indices[p + 1],
                                   indices[p + 2], indices[p + 3], zero)
            w[p - base] = a0
            w[p + 1 - base] = a1
            w[p + 2 - base] = a2
            w[p + 3 - base] = a3
            p += 4
        for p in range(p, end):
            w[p - base] = dot1(qrow, k, bkv, hk, indices[p], zero)
        # the row's softmax while its scores are in L1; 1/l goes into the weights
        m = neg_inf
        for p in range(start - base, end - base):
            m = max(m, w[p])
        if m == neg_inf:  # no keys (or only -inf scores): weights 0, out 0
            for p in range(start - base, end - base):
                w[p] = zero
            lse[b, h, i] = neg_inf
            continue
        l = zero
        for p in range(start - base, end - base):
            e = fast_exp(w[p] - m)
            w[p] = e
            l += e
        inv = one_of(q) / l  # typed: a literal 1 would make the weights' products float64
        for p in range(start - base, end - base):
            w[p] *= inv
        lse[b, h, i] = m + np.log(l)


@njit(cache=True, fastmath=FASTMATH)
def _values_pass(v, indptr, indices, b, h, bkv, hk, row0, r0, r1, ahead, w, base, out):
    """Pass 2 of :func:`csr_forward_by_head`: ``out[b, h, i] = sum_p w[p] v[indices[p]]``."""
    Dv = v.shape[3]
    last = indices.shape[0] - 1
    line = max(1, CACHE_LINE // v.itemsize)
    zero = zero_of(v)
    acc = np.empty(Dv, v.dtype)
    for i in range(r0, r1):
        for d in range(Dv):
            acc[d] = zero
        end = indptr[row0 + i + 1]
        p = indptr[row0 + i]
        while p + 3 < end:
            if ahead > 0:
                prefetch_rows(v, bkv, hk, indices, p + ahead, last, line)
            axpy4(acc, v, bkv, hk, indices[p], indices[p + 1], indices[p + 2], indices[p + 3],
                   w[p - base], w[p + 1 - base], w[p + 2 - base], w[p + 3 - base])
            p += 4
        for p in range(p, end):
            axpy1(acc, v, bkv, hk, indices[p], w[p - base])
        for d in range(Dv):
            out[b, h, i, d] = acc[d]


@njit(parallel=True, cache=True)
def csr_forward_by_head(q, k, v, indptr, indices, lay_heads, scale, out, lse, ahead, w, pieces):
    """Token-level CSR forward for scattered keys, one head at a time, in two passes.

    All threads work on the same head (its rows cut into ``pieces`` of about equal entries), and
    first gather only K rows (scores, then each row's softmax into weights ``w``), then only V rows:
    the rows gathered at any moment lie in one 4 MiB array (N=16384, D=64) instead of the
    ``2 * threads`` arrays of the one-pass kernel, so more of them hit the shared L3. ``w``
    (``config.CSR_WEIGHTS_BUFFER`` entries, at least the longest row) takes the weights of
    one segment of rows at a time.
    """
    B, Hq, Nq, _ = q.shape
    Bk, Hkv, _, _ = k.shape
    group = Hq // Hkv
    cap = w.shape[0]
    for bh in range(B * Hq):
        b = bh // Hq
        h = bh - b * Hq
        lh = h if lay_heads > 1 else 0
        bkv = b if Bk > 1 else 0
        hk = h // group
        row0 = lh * Nq
        s0 = 0
        while s0 < Nq:  # segments of rows whose entries fit in w
            base = indptr[row0 + s0]
            s1 = np.searchsorted(indptr[row0:row0 + Nq + 1], base + cap, side="right") - 1
            s1 = min(max(s1, s0 + 1), Nq)
            for pc in prange(pieces):
                r0, r1 = piece_rows(indptr, row0 + s0, s1 - s0, pc, pieces)
                _weights_pass(q, k, indptr, indices, b, h, bkv, hk, row0, s0 + r0, s0 + r1,
                              scale, ahead, w, base, lse)
            for pc in prange(pieces):
                r0, r1 = piece_rows(indptr, row0 + s0, s1 - s0, pc, pieces)
                _values_pass(v, indptr, indices, b, h, bkv, hk, row0, s0 + r0, s0 + r1,
                             ahead, w, base, out)
            s0 = s1
