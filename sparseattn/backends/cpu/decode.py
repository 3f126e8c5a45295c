"""Single-query decode kernel of the CPU backend (Numba, split-K over key/value heads).

Decoding asks one new query per head to attend to every key a cache holds. That is a
matrix-vector product per head, bound by memory bandwidth, and it runs once per generated token,
so it must not pay what a prefill pays: no BLAS call (threadpoolctl's thread cap alone costs
~70 us), no layout, no allocation beyond the output.

The work is split flash-decoding style: one task is one (key/value head, key split). A task
reads its slice of K and V once for all the query heads of its GQA group and keeps an online
softmax (running max ``m``, sum ``l``, un-normalised accumulator) per query head; a second
parallel loop merges the partial results of the splits. Splitting the keys keeps every core busy
even with two key/value heads.

The caller owns every scratch array (see :meth:`CPUBackend.decode`), so a cache can hold them
across tokens.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ... import config
from ._fastmath import FASTMATH, exp_row, zero_of

_FAST = FASTMATH  # vectorised reductions, but infinities kept: -inf marks "no key yet"


#: keys per online-softmax step inside a task (scores scratch is ``group x _TILE`` per task)
TILE = 128


@njit(cache=True, fastmath=_FAST, inline="always")
def _task(task, q, k, v, n, scale, n_split, scores, m_part, l_part, acc_part):
    """Partial softmax of one (key/value head, key split) for the heads of its GQA group.
    """
    D = q.shape[1]
    Dv = v.shape[2]
    group = q.shape[0] // k.shape[0]
    span = (n + n_split - 1) // n_split
    hk = task // n_split
    sp = task - hk * n_split
    j0 = sp * span
    j1 = min(n, j0 + span)
    s = scores[task]
    h0 = hk * group
    zero = zero_of(q)  # a 0.0 literal would make the float32 dot products below float64 sums
    for g in range(group):
        m_part[h0 + g, sp] = -np.inf
        l_part[h0 + g, sp] = 0.0
        for d in range(Dv):
            acc_part[h0 + g, sp, d] = 0.0
    for t0 in range(j0, j1, TILE):
        t1 = min(j1, t0 + TILE)
        for j in range(t0, t1):
            # four query heads per pass over the key row: four dot products in registers
            g = 0
            while g + 4 <= group:
                a0 = zero
                a1 = zero
                a2 = zero
                a3 = zero
                for d in range(D):
                    kd = k[hk, j, d]
                    a0 += q[h0 + g, d] * kd
                    a1 += q[h0 + g + 1, d] * kd
                    a2 += q[h0 + g + 2, d] * kd
                    a3 += q[h0 + g + 3, d] * kd
                s[g, j - t0] = a0 * scale
                s[g + 1, j - t0] = a1 * scale
                s[g + 2, j - t0] = a2 * scale
                s[g + 3, j - t0] = a3 * scale
                g += 4
            while g < group:
                a0 = zero
                for d in range(D):
                    a0 += q[h0 + g, d] * k[hk, j, d]
                s[g, j - t0] = a0 * scale
                g += 1
        for g in range(group):
            h = h0 + g
            mx = m_part[h, sp]
            for j in range(t1 - t0):
                if s[g, j] > mx:
                    mx = s[g, j]
            alpha = np.exp(np.float64(m_part[h, sp] - mx))  # exp(-inf) = 0 on the first tile
            l_part[h, sp] = l_part[h, sp] * alpha + exp_row(s[g], t1 - t0, mx)
            m_part[h, sp] = mx
            if alpha != 1.0:
                for d in range(Dv):
                    acc_part[h, sp, d] *= alpha
        for j in range(t0, t1):
            for g in range(group):
                e = s[g, j - t0]
                for d in range(Dv):
                    acc_part[h0 + g, sp, d] += e * v[hk, j, d]


@njit(cache=True, fastmath=_FAST, inline="always")
def _merge(h, n_split, m_part, l_part, acc_part, out, lse):
    """Combine the splits of query head ``h`` into its output and log-sum-exp."""
    Dv = out.shape[1]
    mx = -np.inf
    for sp in range(n_split):
        if l_part[h, sp] != l_part[h, sp] or m_part[h, sp] != m_part[h, sp]:
            # a split met a NaN or +inf score (NaN/inf in q or k): the row is NaN, as in the
            # reference; skipping the split would drop the bad key silently
            for d in range(Dv):
                out[h, d] = np.nan
            lse[h] = np.nan
            return
        if l_part[h, sp] > 0.0 and m_part[h, sp] > mx:
            mx = m_part[h, sp]
    for d in range(Dv):
        out[h, d] = 0.0
    if mx == -np.inf:
        lse[h] = -np.inf
        return
    tot = 0.0
    for sp in range(n_split):
        if l_part[h, sp] > 0.0:
            w = np.exp(np.float64(m_part[h, sp] - mx))
            tot += w * l_part[h, sp]
            for d in range(Dv):
                out[h, d] += w * acc_part[h, sp, d]
    inv = 1.0 / tot
    for d in range(Dv):
        out[h, d] *= inv
    lse[h] = mx + np.log(tot)


@njit(parallel=True, cache=True, fastmath=_FAST)
def decode_forward(q, k, v, n, scale, n_split, scores, m_part, l_part, acc_part,
                   out, lse):
    """Attend ``q`` ``(Hq, D)`` to keys ``k[:, :n]`` ``(Hkv, C, D)`` and values ``v[:, :n]``.

    Scratch (caller-owned, sizes at least): ``scores`` ``(Hkv * n_split, group, TILE)``,
    ``m_part``/``l_part`` ``(Hq, n_split)``, ``acc_part`` ``(Hq, n_split, Dv)``. Results go to
    ``out`` ``(Hq, Dv)`` and ``lse`` ``(Hq,)``.
    """
    group = q.shape[0] // k.shape[0]
    for task in prange(k.shape[0] * n_split):
        _task(task, q, k, v, n, scale, n_split, scores, m_part, l_part, acc_part)
        if n_split == 1:  # the task owns its heads: finish them here, one parallel region in all
            for h in range(task * group, (task + 1) * group):
                _merge(h, 1, m_part, l_part, acc_part, out, lse)
    if n_split > 1:
        for h in prange(q.shape[0]):
            _merge(h, n_split, m_part, l_part, acc_part, out, lse)


@njit(cache=True, fastmath=_FAST)
def decode_serial(q, k, v, n, scale, n_split, scores, m_part, l_part, acc_part,
                  out, lse):
    """:func:`decode_forward` on the calling thread: for small caches, where waking the thread
    pool costs more than the work."""
    for task in range(k.shape[0] * n_split):
        _task(task, q, k, v, n, scale, n_split, scores, m_part, l_part, acc_part)
    for h in range(q.shape[0]):
        _merge(h, n_split, m_part, l_part, acc_part, out, lse)


#: each split gets at least this many keys, so short caches are not split into slivers
_MIN_SPLIT_KEYS = 256


def _max_split(hkv, threads):
    # tasks are equal-sized, so one per thread balances; no split at all when the key/value heads
    # already cover the threads (then the kernel is one parallel region, no merge pass)
    return -(-threads // hkv)


def decode(q, k, v, n, scale, workspace, threads):
    """Run :func:`decode_forward` with scratch kept in ``workspace`` (a dict) across calls.

    Parameters
    ----------
    q : ndarray, shape (Hq, D), C-contiguous
    k, v : ndarray, shapes (Hkv, C, D) and (Hkv, C, Dv), C-contiguous, ``q``'s dtype
        Only the first ``n`` positions are read.
    n : int
    scale : float
    workspace : dict or None
        Scratch arrays are created on first use and reused while shapes allow.
    threads : int
        Numba thread count (decides the key split).

    Returns
    -------
    out : ndarray, shape (Hq, Dv)
    lse : ndarray, shape (Hq,)
    """
    hq = q.shape[0]
    hkv = k.shape[0]
    dv = v.shape[2]
    most = _max_split(hkv, threads)
    n_split = max(1, min(most, -(-n // _MIN_SPLIT_KEYS)))
    ws = {} if workspace is None else workspace
    key = (hq, hkv, dv, most, q.dtype)
    if ws.get("key") != key:  # first call, or the thread count or shapes changed
        ws["key"] = key
        ws["scores"] = np.empty((hkv * most, hq // hkv, TILE), q.dtype)
        ws["m"] = np.empty((hq, most), q.dtype)
        ws["l"] = np.empty((hq, most), q.dtype)
        ws["acc"] = np.empty((hq, most, dv), q.dtype)
    out = np.empty((hq, dv), q.dtype)
    lse = np.empty(hq, q.dtype)
    serial = threads == 1 or n * hq * (k.shape[2] + dv) < config.DECODE_PARALLEL_WORK
    kernel = decode_serial if serial else decode_forward
    kernel(q, k, v, n, q.dtype.type(scale), n_split, ws["scores"], ws["m"], ws["l"], ws["acc"],
           out, lse)
    return out, lse


def workspace_nbytes(workspace):
    """Bytes held by a workspace dict."""
    return sum(a.nbytes for a in workspace.values() if isinstance(a, np.ndarray))
