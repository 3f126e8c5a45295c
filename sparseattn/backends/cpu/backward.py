"""Backward kernels of the CPU backend (Numba, parallel over work-balanced task chunks).

Flash-style: nothing of the forward pass is kept but ``out`` and the log-sum-exp ``lse``. Per
tile the probabilities are recomputed as ``P = exp(scale * q.k - lse)``, and with
``delta = rowsum(dout * out)``::

    dP = dout . v^T          dS = P * (dP - delta)
    dq = scale * dS . k      dk = scale * dS^T . q      dv = P^T . dout

Threads never race and nothing is atomic, so results are deterministic. Two strategies:

* two passes (token CSR, and block-CSR layouts whose key blocks are shared by many work chunks):

  1. query-major, over the layout (one task: one batch, head and query block / query): ``dq``,
     and ``delta`` on the way;
  2. key-major, over ``layout.transpose()`` (cached on the layout; one task: one kv-batch, kv-head
     and key block / key): ``dk`` and ``dv``, summed over the query heads of the task's GQA group
     and, when ``k``/``v`` are broadcast along the batch, over the batch. Each task owns its rows.

  Seven tile products per tile (scores and ``dP`` are computed in both passes); bit-identical
  whatever the thread count.
* fused (block-CSR, local patterns such as sliding windows): one query-major pass with five tile
  products per tile. Each work chunk (run by one thread at a time) adds its ``dk``/``dv``
  contributions straight into the key blocks only it touches, and into partial buffers of its own
  for the key blocks it shares with other chunks (:func:`_fused_plan`; a sliding window shares
  only the few blocks at chunk boundaries); :func:`reduce_partials` then adds those per key block
  in chunk order. Used
  while those buffers stay below ``config.CPU_BACKWARD_MAX_PARTIALS`` times ``dk``/``dv``;
  bit-identical for a given thread count.

No tile of probabilities outlives its step. A query row with no key (``lse = -inf``) recomputes
``exp(s - inf) = 0``: it contributes nothing and never produces NaN. A NaN in an input is never
turned into 0: it reaches the gradients of the pairs that use it (and, through the tile products,
of the rows and keys sharing a tile with it).

Kernels trust their inputs: :mod:`sparseattn.api` validated shapes and the layout's constructor
validated every index, so every read below is in bounds.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ... import config
from ...layout import BlockCSRLayout, CSRLayout
from ._fastmath import fast_exp
from ._tasks import task_coords
from ._threads import balanced_chunks, blas_single_thread

__all__ = ["backward"]


# ----------------------------------------------------------------------------- block-CSR kernels


@njit(cache=True)
def _grad_scores(s, dp, nr, nc, lrow, drow, mk):
    """Query-major tile ``(queries, keys)``: scores ``s`` become ``dS = P * (dP - delta)`` in place.

    ``lrow``/``drow`` hold lse (``-inf`` made ``+inf``, so an empty row gives ``P = 0``) and delta
    of the tile's rows; ``mk`` is the element mask, ``None`` for a full block (no mask work).
    """
    for r in range(nr):
        li = lrow[r]
        di = drow[r]
        for c in range(nc):
            ds = fast_exp(s[r, c] - li) * (dp[r, c] - di)
            if mk is not None:
                ds = ds if mk[r, c] else 0.0
            s[r, c] = ds


@njit(cache=True)
def _grad_scores_t(s, dp, nr, nc, lrow, drow, mk):
    """Key-major tile ``(keys, queries)``: ``s`` becomes ``dS^T`` and ``dp`` becomes ``P^T``."""
    for r in range(nr):
        for c in range(nc):
            p = fast_exp(s[r, c] - lrow[c])
            ds = p * (dp[r, c] - drow[c])
            if mk is not None:  # select, not multiply: a NaN of a masked-out pair stays out
                p = p if mk[r, c] else 0.0
                ds = ds if mk[r, c] else 0.0
            s[r, c] = ds
            dp[r, c] = p


@njit(cache=True)
def _block_dq_tasks(t0, t1, q, k, v, out, lse, dout, indptr, indices, mask_index, masks, lay_heads,
                    bq, bk, scale, dq, delta, lse_eff):
    """Tasks ``t0..t1-1`` of pass 1 (one per batch, head and query block), with their scratch."""
    B, Hq, Nq, D = q.shape
    Bk, Hkv, Nk, _ = k.shape
    Dv = v.shape[3]
    nbq = (Nq + bq - 1) // bq
    group = Hq // Hkv
    qs = np.empty((bq, D), q.dtype)
    s_buf = np.empty(bq * bk, q.dtype)
    dp_buf = np.empty(bq * bk, q.dtype)
    t_buf = np.empty(bq * D, q.dtype)
    acc = np.empty((bq, D), q.dtype)
    lrow = np.empty(bq, q.dtype)
    drow = np.empty(bq, q.dtype)
    for t in range(t0, t1):
        b, h, qb, lh, bkv, hk = task_coords(
            t, nbq, Hq, lay_heads, Bk, group)
        q0 = qb * bq
        nq = min(bq, Nq - q0)
        for i in range(nq):
            dsum = 0.0
            for d in range(Dv):
                dsum += dout[b, h, q0 + i, d] * out[b, h, q0 + i, d]
            delta[b, h, q0 + i] = dsum
            drow[i] = dsum
            li = lse[b, h, q0 + i]
            lrow[i] = np.inf if li == -np.inf else li
            lse_eff[b, h, q0 + i] = lrow[i]
            for d in range(D):
                qs[i, d] = q[b, h, q0 + i, d] * scale
                acc[i, d] = 0.0
        qt = qs[:nq]
        dot_ = dout[b, h, q0 : q0 + nq]
        row = lh * nbq + qb
        for p in range(indptr[row], indptr[row + 1]):
            k0 = indices[p] * bk
            nk = min(bk, Nk - k0)
            kt = k[bkv, hk, k0 : k0 + nk]
            s = s_buf[: nq * nk].reshape((nq, nk))
            dp = dp_buf[: nq * nk].reshape((nq, nk))
            np.dot(qt, kt.T, s)
            np.dot(dot_, v[bkv, hk, k0 : k0 + nk].T, dp)
            mi = mask_index[p]
            if mi >= 0:
                _grad_scores(s, dp, nq, nk, lrow, drow, masks[mi])
            else:
                _grad_scores(s, dp, nq, nk, lrow, drow, None)
            tmp = t_buf[: nq * D].reshape((nq, D))
            np.dot(s, kt, tmp)
            for i in range(nq):
                for d in range(D):
                    acc[i, d] += tmp[i, d]
        for i in range(nq):
            for d in range(D):
                dq[b, h, q0 + i, d] = acc[i, d] * scale


@njit(parallel=True, cache=True)
def block_dq(q, k, v, out, lse, dout, indptr, indices, mask_index, masks, lay_heads, bq, bk, scale,
             chunk_starts, dq, delta, lse_eff):
    """Pass 1: ``dq``, ``delta`` and ``lse_eff`` (lse with -inf made +inf)."""
    # the parallel body only dispatches: a small parfor compiles fast, the task code once
    for c in prange(chunk_starts.shape[0] - 1):
        _block_dq_tasks(chunk_starts[c], chunk_starts[c + 1], q, k, v, out, lse, dout, indptr,
                        indices, mask_index, masks, lay_heads, bq, bk, scale, dq, delta, lse_eff)


@njit(cache=True)
def _block_dkdv_tasks(t0, t1, q, k, v, dout, lse_eff, delta, indptr, indices, mask_index, masks,
                      lay_heads, bq, bk, scale, dk, dv):
    """Tasks ``t0..t1-1`` of pass 2 (one per kv batch, kv head and key block)."""
    B, Hq, Nq, D = q.shape
    Bk, Hkv, Nk, _ = k.shape
    Dv = v.shape[3]
    nbk = (Nk + bk - 1) // bk
    group = Hq // Hkv
    nb = B if Bk == 1 else 1
    ks = np.empty((bk, D), k.dtype)
    s_buf = np.empty(bk * bq, k.dtype)
    dp_buf = np.empty(bk * bq, k.dtype)
    tk_buf = np.empty(bk * D, k.dtype)
    tv_buf = np.empty(bk * Dv, k.dtype)
    dk_acc = np.empty((bk, D), k.dtype)
    dv_acc = np.empty((bk, Dv), k.dtype)
    lrow = np.empty(bq, k.dtype)
    drow = np.empty(bq, k.dtype)
    for t in range(t0, t1):
        bkv = t // (Hkv * nbk)
        r = t - bkv * (Hkv * nbk)
        hk = r // nbk
        kb = r - hk * nbk
        k0 = kb * bk
        nk = min(bk, Nk - k0)
        for j in range(nk):
            for d in range(D):
                ks[j, d] = k[bkv, hk, k0 + j, d] * scale
                dk_acc[j, d] = 0.0
            for d in range(Dv):
                dv_acc[j, d] = 0.0
        kt = ks[:nk]
        vt = v[bkv, hk, k0 : k0 + nk]
        tk = tk_buf[: nk * D].reshape((nk, D))
        tv = tv_buf[: nk * Dv].reshape((nk, Dv))
        for g in range(group):
            h = hk * group + g
            lh = h if lay_heads > 1 else 0
            row = lh * nbk + kb
            for bi in range(nb):
                b = bi if Bk == 1 else bkv
                for p in range(indptr[row], indptr[row + 1]):
                    q0 = indices[p] * bq
                    nq = min(bq, Nq - q0)
                    for i in range(nq):
                        lrow[i] = lse_eff[b, h, q0 + i]
                        drow[i] = delta[b, h, q0 + i]
                    qt = q[b, h, q0 : q0 + nq]
                    dot_ = dout[b, h, q0 : q0 + nq]
                    s = s_buf[: nk * nq].reshape((nk, nq))
                    dp = dp_buf[: nk * nq].reshape((nk, nq))
                    np.dot(kt, qt.T, s)
                    np.dot(vt, dot_.T, dp)
                    mi = mask_index[p]
                    if mi >= 0:
                        _grad_scores_t(s, dp, nk, nq, lrow, drow, masks[mi])
                    else:
                        _grad_scores_t(s, dp, nk, nq, lrow, drow, None)
                    np.dot(dp, dot_, tv)  # dp now holds P^T
                    np.dot(s, qt, tk)  # s now holds dS^T
                    for j in range(nk):
                        for d in range(Dv):
                            dv_acc[j, d] += tv[j, d]
                        for d in range(D):
                            dk_acc[j, d] += tk[j, d]
        for j in range(nk):
            for d in range(D):
                dk[bkv, hk, k0 + j, d] = dk_acc[j, d] * scale
            for d in range(Dv):
                dv[bkv, hk, k0 + j, d] = dv_acc[j, d]


@njit(parallel=True, cache=True)
def block_dkdv(q, k, v, dout, lse_eff, delta, indptr, indices, mask_index, masks, lay_heads, bq, bk,
               scale, chunk_starts, dk, dv):
    """Pass 2: ``dk`` and ``dv`` over the transposed layout (its masks are ``(bk, bq)``)."""
    for c in prange(chunk_starts.shape[0] - 1):
        _block_dkdv_tasks(chunk_starts[c], chunk_starts[c + 1], q, k, v, dout, lse_eff, delta,
                          indptr, indices, mask_index, masks, lay_heads, bq, bk, scale, dk, dv)


@njit(cache=True)
def _grad_probs(s, dp, nr, nc, lrow, drow, mk):
    """Query-major tile: ``s`` becomes ``dS`` and ``dp`` becomes ``P`` (the fused pass needs both)."""
    for r in range(nr):
        li = lrow[r]
        di = drow[r]
        for c in range(nc):
            p = fast_exp(s[r, c] - li)
            ds = p * (dp[r, c] - di)
            if mk is not None:
                p = p if mk[r, c] else 0.0
                ds = ds if mk[r, c] else 0.0
            s[r, c] = ds
            dp[r, c] = p


@njit(cache=True)
def _block_fused_tasks(t0, t1, q, k, v, out, lse, dout, indptr, indices, mask_index, masks,
                       lay_heads, bq, bk, scale, entry_start, entry_slot, dq, dk, dv, pdk, pdv):
    """Tasks ``t0..t1-1`` of the fused pass: ``dq`` of the task's query block, and its tiles'
    contributions to ``dk``/``dv`` (unscaled), added straight into ``dk``/``dv`` for a key block
    no other chunk touches, else into this chunk's own partial slot (``entry_slot``: the slot of
    each (task, block) entry, -1 for straight)."""
    B, Hq, Nq, D = q.shape
    Bk, Hkv, Nk, _ = k.shape
    Dv = v.shape[3]
    nbq = (Nq + bq - 1) // bq
    group = Hq // Hkv
    qs = np.empty((bq, D), q.dtype)
    s_buf = np.empty(bq * bk, q.dtype)
    dp_buf = np.empty(bq * bk, q.dtype)
    t_buf = np.empty(bq * D, q.dtype)
    tk_buf = np.empty(bk * D, q.dtype)
    tv_buf = np.empty(bk * Dv, q.dtype)
    acc = np.empty((bq, D), q.dtype)
    lrow = np.empty(bq, q.dtype)
    drow = np.empty(bq, q.dtype)
    for t in range(t0, t1):
        b, h, qb, lh, bkv, hk = task_coords(
            t, nbq, Hq, lay_heads, Bk, group)
        q0 = qb * bq
        nq = min(bq, Nq - q0)
        for i in range(nq):
            dsum = 0.0
            for d in range(Dv):
                dsum += dout[b, h, q0 + i, d] * out[b, h, q0 + i, d]
            drow[i] = dsum
            li = lse[b, h, q0 + i]
            lrow[i] = np.inf if li == -np.inf else li
            for d in range(D):
                qs[i, d] = q[b, h, q0 + i, d] * scale
                acc[i, d] = 0.0
        qt = qs[:nq]
        qo = q[b, h, q0 : q0 + nq]
        dot_ = dout[b, h, q0 : q0 + nq]
        row = lh * nbq + qb
        e = entry_start[t]
        for p in range(indptr[row], indptr[row + 1]):
            k0 = indices[p] * bk
            nk = min(bk, Nk - k0)
            kt = k[bkv, hk, k0 : k0 + nk]
            s = s_buf[: nq * nk].reshape((nq, nk))
            dp = dp_buf[: nq * nk].reshape((nq, nk))
            np.dot(qt, kt.T, s)
            np.dot(dot_, v[bkv, hk, k0 : k0 + nk].T, dp)
            mi = mask_index[p]
            if mi >= 0:
                _grad_probs(s, dp, nq, nk, lrow, drow, masks[mi])
            else:
                _grad_probs(s, dp, nq, nk, lrow, drow, None)
            tmp = t_buf[: nq * D].reshape((nq, D))
            np.dot(s, kt, tmp)
            for i in range(nq):
                for d in range(D):
                    acc[i, d] += tmp[i, d]
            tk = tk_buf[: nk * D].reshape((nk, D))
            tv = tv_buf[: nk * Dv].reshape((nk, Dv))
            np.dot(dp.T, dot_, tv)
            np.dot(s.T, qo, tk)
            slot = entry_slot[e]
            e += 1
            if slot < 0:  # a key block only this chunk touches: it owns its rows of dk/dv
                for j in range(nk):
                    for d in range(D):
                        dk[bkv, hk, k0 + j, d] += tk[j, d]
                    for d in range(Dv):
                        dv[bkv, hk, k0 + j, d] += tv[j, d]
            else:
                for j in range(nk):
                    for d in range(D):
                        pdk[slot, j, d] += tk[j, d]
                    for d in range(Dv):
                        pdv[slot, j, d] += tv[j, d]
        for i in range(nq):
            for d in range(D):
                dq[b, h, q0 + i, d] = acc[i, d] * scale


@njit(parallel=True, cache=True)
def block_fused(q, k, v, out, lse, dout, indptr, indices, mask_index, masks, lay_heads, bq, bk,
                scale, chunk_starts, entry_start, entry_slot, dq, dk, dv, pdk, pdv):
    """Fused pass: ``dq``, and ``dk``/``dv`` (zeroed before) or partials (see :func:`_fused_plan`)."""
    for c in prange(chunk_starts.shape[0] - 1):
        _block_fused_tasks(chunk_starts[c], chunk_starts[c + 1], q, k, v, out, lse, dout, indptr,
                           indices, mask_index, masks, lay_heads, bq, bk, scale, entry_start,
                           entry_slot, dq, dk, dv, pdk, pdv)


@njit(parallel=True, cache=True)
def reduce_partials(red_ptr, red_slots, pdk, pdv, bk, scale, dk, dv):
    """Add to each shared key block of ``dk``/``dv`` its chunks' partials, in chunk order, then
    apply ``scale`` to ``dk``."""
    Bk, Hkv, Nk, D = dk.shape
    Dv = dv.shape[3]
    nbk = (Nk + bk - 1) // bk
    for g in prange(Bk * Hkv * nbk):
        bkv = g // (Hkv * nbk)
        r = g - bkv * (Hkv * nbk)
        hk = r // nbk
        k0 = (r - hk * nbk) * bk
        nk = min(bk, Nk - k0)
        for x in range(red_ptr[g], red_ptr[g + 1]):
            sl = red_slots[x]
            for j in range(nk):
                for d in range(D):
                    dk[bkv, hk, k0 + j, d] += pdk[sl, j, d]
                for d in range(Dv):
                    dv[bkv, hk, k0 + j, d] += pdv[sl, j, d]
        for j in range(nk):
            for d in range(D):
                dk[bkv, hk, k0 + j, d] *= scale


# ----------------------------------------------------------------------------- token-CSR kernels


@njit(cache=True)
def _csr_dq_tasks(t0, t1, q, k, v, out, lse, dout, indptr, indices, lay_heads, scale, dq, delta,
                  lse_eff):
    """Tasks ``t0..t1-1`` of pass 1 on a token layout (one per batch, head and query)."""
    B, Hq, Nq, D = q.shape
    Bk, Hkv, Nk, _ = k.shape
    Dv = v.shape[3]
    group = Hq // Hkv
    qrow = np.empty(D, q.dtype)
    acc = np.empty(D, q.dtype)
    for t in range(t0, t1):
        b, h, i, lh, bkv, hk = task_coords(
            t, Nq, Hq, lay_heads, Bk, group)
        dsum = 0.0
        for d in range(Dv):
            dsum += dout[b, h, i, d] * out[b, h, i, d]
        delta[b, h, i] = dsum
        li = lse[b, h, i]
        if li == -np.inf:
            li = np.inf
        lse_eff[b, h, i] = li
        for d in range(D):
            qrow[d] = q[b, h, i, d] * scale
            acc[d] = 0.0
        row = lh * Nq + i
        for p in range(indptr[row], indptr[row + 1]):
            j = indices[p]
            s = 0.0
            for d in range(D):
                s += qrow[d] * k[bkv, hk, j, d]
            dp = 0.0
            for d in range(Dv):
                dp += dout[b, h, i, d] * v[bkv, hk, j, d]
            ds = np.exp(s - li) * (dp - dsum)
            for d in range(D):
                acc[d] += ds * k[bkv, hk, j, d]
        for d in range(D):
            dq[b, h, i, d] = acc[d] * scale


@njit(parallel=True, cache=True)
def csr_dq(q, k, v, out, lse, dout, indptr, indices, lay_heads, scale, chunk_starts, dq, delta,
           lse_eff):
    """Pass 1 on a token layout."""
    for c in prange(chunk_starts.shape[0] - 1):
        _csr_dq_tasks(chunk_starts[c], chunk_starts[c + 1], q, k, v, out, lse, dout, indptr, indices,
                      lay_heads, scale, dq, delta, lse_eff)


@njit(cache=True)
def _csr_dkdv_tasks(t0, t1, q, k, v, dout, lse_eff, delta, indptr, indices, lay_heads, scale, dk, dv):
    """Tasks ``t0..t1-1`` of pass 2 on the transposed token layout (one per kv batch, head, key)."""
    B, Hq, Nq, D = q.shape
    Bk, Hkv, Nk, _ = k.shape
    Dv = v.shape[3]
    group = Hq // Hkv
    nb = B if Bk == 1 else 1
    krow = np.empty(D, k.dtype)
    dk_acc = np.empty(D, k.dtype)
    dv_acc = np.empty(Dv, k.dtype)
    for t in range(t0, t1):
        bkv = t // (Hkv * Nk)
        r = t - bkv * (Hkv * Nk)
        hk = r // Nk
        j = r - hk * Nk
        for d in range(D):
            krow[d] = k[bkv, hk, j, d] * scale
            dk_acc[d] = 0.0
        for d in range(Dv):
            dv_acc[d] = 0.0
        for g in range(group):
            h = hk * group + g
            lh = h if lay_heads > 1 else 0
            row = lh * Nk + j
            for bi in range(nb):
                b = bi if Bk == 1 else bkv
                for p in range(indptr[row], indptr[row + 1]):
                    i = indices[p]
                    s = 0.0
                    for d in range(D):
                        s += krow[d] * q[b, h, i, d]
                    pr = np.exp(s - lse_eff[b, h, i])
                    dp = 0.0
                    for d in range(Dv):
                        dp += v[bkv, hk, j, d] * dout[b, h, i, d]
                        dv_acc[d] += pr * dout[b, h, i, d]
                    ds = pr * (dp - delta[b, h, i])
                    for d in range(D):
                        dk_acc[d] += ds * q[b, h, i, d]
        for d in range(D):
            dk[bkv, hk, j, d] = dk_acc[d] * scale
        for d in range(Dv):
            dv[bkv, hk, j, d] = dv_acc[d]


@njit(parallel=True, cache=True)
def csr_dkdv(q, k, v, dout, lse_eff, delta, indptr, indices, lay_heads, scale, chunk_starts, dk, dv):
    """Pass 2 on the transposed token layout."""
    for c in prange(chunk_starts.shape[0] - 1):
        _csr_dkdv_tasks(chunk_starts[c], chunk_starts[c + 1], q, k, v, dout, lse_eff, delta, indptr,
                        indices, lay_heads, scale, dk, dv)


# ----------------------------------------------------------------------------- wrapper


def _query_costs(row_work, lay_heads, batch, q_heads):
    """Cost of each (batch, head, row) task of pass 1 from per-row work ``(lay_heads, rows)``."""
    per_head = np.broadcast_to(row_work, (q_heads, row_work.shape[1]))
    return np.broadcast_to(per_head, (batch,) + per_head.shape).reshape(-1)


def _key_costs(row_work, lay_heads, kv_batch, batch, q_heads, kv_heads):
    """Cost of each (kv batch, kv head, key row) task of pass 2: the work of every query head in the
    task's group and, for a broadcast k/v, of every batch element."""
    group = q_heads // kv_heads
    if lay_heads == 1:
        per_kv = np.broadcast_to(group * row_work, (kv_heads, row_work.shape[1]))
    else:
        per_kv = row_work.reshape(kv_heads, group, -1).sum(axis=1)
    reps = batch if kv_batch == 1 else 1
    return np.broadcast_to(per_kv * reps, (kv_batch,) + per_kv.shape).reshape(-1)


def _fused_plan(layout, B, Hq, Bk, Hkv, chunk_starts):
    """Where each tile of the fused pass adds its ``dk``/``dv`` contribution.

    A chunk (a run of query-block tasks, one thread at a time) owns the rows of ``dk``/``dv`` of
    every key block no other chunk touches, and one partial slot for each key block it shares, so
    no two threads ever add into the same memory. Returns ``entry_start`` (first entry of each
    task), ``entry_slot`` (slot of each (task, block) entry, -1 for an owned block),
    ``red_ptr``/``red_slots`` (the slots of each key block, in chunk order) and the slot count.
    """
    nbq, nbk = layout.grid
    group = Hq // Hkv
    t = np.arange(B * Hq * nbq, dtype=np.int64)
    b, h, qb = t // (Hq * nbq), (t // nbq) % Hq, t % nbq
    row = (h if layout.heads > 1 else 0) * nbq + qb
    lens = layout.indptr[row + 1] - layout.indptr[row]
    entry_start = np.zeros(t.shape[0] + 1, np.int64)
    np.cumsum(lens, out=entry_start[1:])
    te = np.repeat(t, lens)
    p = layout.indptr[row[te]] + np.arange(te.shape[0], dtype=np.int64) - entry_start[te]
    kv = ((b[te] if Bk > 1 else 0) * Hkv + h[te] // group) * nbk + layout.indices[p]
    n_kv = Bk * Hkv * nbk
    chunk = np.repeat(np.arange(chunk_starts.shape[0] - 1, dtype=np.int64), np.diff(chunk_starts))
    keys, entry_key = np.unique(chunk[te] * n_kv + kv, return_inverse=True)
    key_kv = keys % max(n_kv, 1)
    shared = np.bincount(key_kv, minlength=n_kv)[key_kv] > 1  # key blocks of several chunks
    slot_of_key = np.where(shared, np.cumsum(shared) - 1, -1)  # the others: straight into dk/dv
    entry_slot = slot_of_key[entry_key.ravel()]
    slot_kv = key_kv[shared]
    red_slots = np.argsort(slot_kv, kind="stable")  # keys are chunk-major: chunk order kept
    red_ptr = np.zeros(n_kv + 1, np.int64)
    np.cumsum(np.bincount(slot_kv, minlength=n_kv), out=red_ptr[1:])
    return entry_start, entry_slot, red_ptr, red_slots, slot_kv.shape[0]


def backward(q, k, v, out, lse, dout, layout, scale):
    """Gradients of sparse attention on the CPU (see :meth:`Backend.backward
    <sparseattn.backends.base.Backend.backward>` for the array forms).

    Parameters
    ----------
    q : ndarray, shape (B, Hq, Nq, D)
    k : ndarray, shape (Bk, Hkv, Nk, D), ``Bk`` in ``(1, B)``
    v : ndarray, shape (Bk, Hkv, Nk, Dv)
    out, dout : ndarray, shape (B, Hq, Nq, Dv)
    lse : ndarray, shape (B, Hq, Nq)
    layout : CSRLayout or BlockCSRLayout
        Shape ``(Nq, Nk)``, 1 or ``Hq`` heads; its transpose is cached on it for the next call.
    scale : float

    Returns
    -------
    dq, dk, dv : ndarrays shaped like ``q``, ``k``, ``v``, in their dtype
    """
    B, Hq, Nq, D = q.shape
    Bk, Hkv, Nk, _ = k.shape
    Dv = v.shape[3]
    dtype = q.dtype
    if q.size == 0 or k.size == 0 or B == 0:  # nothing attends: zero gradients
        return np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    dq = np.empty_like(q)  # every kernel path writes every element
    dk = np.empty_like(k)
    dv = np.empty_like(v)
    delta = np.empty((B, Hq, Nq), dtype)
    lse_eff = np.empty((B, Hq, Nq), dtype)
    scale = dtype.type(scale)
    lh = layout.heads
    if isinstance(layout, BlockCSRLayout):
        bq, bk = layout.block_size
        nbq, nbk = layout.grid
        work_q = np.diff(layout.indptr).reshape(lh, nbq) + 1
        chunks_q = balanced_chunks(_query_costs(work_q, lh, B, Hq))
        plan = _fused_plan(layout, B, Hq, Bk, Hkv, chunks_q)
        if plan[4] <= config.CPU_BACKWARD_MAX_PARTIALS * Bk * Hkv * nbk:
            pdk = np.zeros((plan[4], bk, D), dtype)
            pdv = np.zeros((plan[4], bk, Dv), dtype)
            dk[...] = 0
            dv[...] = 0
            with blas_single_thread():
                block_fused(q, k, v, out, lse, dout, layout.indptr, layout.indices,
                            layout.mask_index, layout.masks, lh, bq, bk, scale, chunks_q, plan[0],
                            plan[1], dq, dk, dv, pdk, pdv)
            reduce_partials(plan[2], plan[3], pdk, pdv, bk, scale, dk, dv)
            return dq, dk, dv
        # partial buffers too large (e.g. every chunk touches most key blocks): two passes
        lt = layout.transpose()
        work_k = np.diff(lt.indptr).reshape(lh, nbk) + 1
        chunks_k = balanced_chunks(_key_costs(work_k, lh, Bk, B, Hq, Hkv))
        with blas_single_thread():
            block_dq(q, k, v, out, lse, dout, layout.indptr, layout.indices, layout.mask_index,
                     layout.masks, lh, bq, bk, scale, chunks_q, dq, delta, lse_eff)
            block_dkdv(q, k, v, dout, lse_eff, delta, lt.indptr, lt.indices, lt.mask_index, lt.masks,
                       lh, bq, bk, scale, chunks_k, dk, dv)
    elif isinstance(layout, CSRLayout):
        lt = layout.transpose()
        work_q = layout.row_lengths + 4
        work_k = lt.row_lengths + 4
        chunks_q = balanced_chunks(_query_costs(work_q, lh, B, Hq))
        chunks_k = balanced_chunks(_key_costs(work_k, lh, Bk, B, Hq, Hkv))
        csr_dq(q, k, v, out, lse, dout, layout.indptr, layout.indices, lh, scale, chunks_q, dq, delta,
               lse_eff)
        csr_dkdv(q, k, v, dout, lse_eff, delta, lt.indptr, lt.indices, lh, scale, chunks_k, dk, dv)
    else:  # the API only passes layouts
        raise TypeError(f"layout must be a CSRLayout or BlockCSRLayout, got {type(layout).__name__}")
    return dq, dk, dv
