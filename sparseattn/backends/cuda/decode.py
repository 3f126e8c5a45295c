"""Single-query decode kernels of the CUDA backend (Numba-CUDA, split-K, float32 and float64).

Decoding asks one new query per head to attend to the first ``n`` keys of a cache, once per
generated token: a matrix-vector product per head, bound by memory bandwidth. The generic
:meth:`Backend.decode` would build a one-row layout and copy its ``n`` indices to the GPU for
every token; these kernels read the cache buffers as they are and allocate nothing per token but
the output.

Flash-decoding: :func:`_partial_kernel` runs one thread block per (key/value head, key split).
Its threads take one key each per step (K staged through shared memory in chunks of head
dimensions, so that global reads are coalesced), score it against every query head of the GQA
group (the K row is read once for the group), and keep an online softmax per head; each thread owns
``Dv / threads`` output columns and reads V rows coalesced. Row maxima go through a shared-memory
tree (no warp shuffles: the kernels run under the CUDA simulator in CI), and each thread's share
of the row sums is reduced once, at the end. :func:`_merge_kernel` combines the splits of each
query head. Splitting the keys keeps every SM busy even with one or two key/value heads.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from numba import cuda, float32, float64

from ... import config

_NB_TYPES = {np.dtype(np.float32): float32, np.dtype(np.float64): float64}

@functools.lru_cache(maxsize=None)
def _partial_kernel(dtype_name, group, dvp, maxd, nt, dc):
    DT = _NB_TYPES[np.dtype(dtype_name)]
    NT, G, MAXD, DC = nt, group, maxd, dc
    GNT = G * NT
    GD = G * MAXD
    GDV = G * dvp
    KS = DC + 1  # padded row stride of the staged K chunk: no bank conflicts
    KSZ = NT * KS

    @cuda.jit
    def kernel(q, k, v, n, scale, span, m_part, l_part, acc_part):
        qs = cuda.shared.array(GD, DT)  # the block's query heads, pre-scaled
        red = cuda.shared.array(GNT, DT)  # scores, then the max tree, per query head
        ks = cuda.shared.array(KSZ, DT)  # NT keys x DC dims of K, loaded coalesced
        sacc = cuda.local.array(G, DT)
        acc = cuda.local.array(GDV, DT)
        m = cuda.local.array(G, DT)  # running maximum (identical in every thread)
        l = cuda.local.array(G, DT)  # this thread's share of the row sum
        mine = cuda.local.array(G, DT)
        tid = cuda.threadIdx.x
        sp = cuda.blockIdx.y
        D = q.shape[1]
        Dv = v.shape[2]
        group = q.shape[0] // k.shape[0]
        chunks = (group + G - 1) // G  # blocks per key/value head (G query heads each)
        hk = cuda.blockIdx.x // chunks
        g0 = (cuda.blockIdx.x - hk * chunks) * G
        h0 = hk * group + g0
        gn = min(G, group - g0)  # query heads of this block; unused slots score -inf
        zero = DT(0.0)
        ninf = DT(-math.inf)
        for e in range(tid, G * MAXD, NT):
            g = e // MAXD
            d = e - g * MAXD
            x = zero
            if g < gn and d < D:
                x = q[h0 + g, d] * scale
            qs[e] = x
        for g in range(G):
            m[g] = ninf
            l[g] = zero
            for c in range(dvp):
                acc[g * dvp + c] = zero
        cuda.syncthreads()
        j0 = sp * span
        j1 = min(n, j0 + span)
        for t0 in range(j0, j1, NT):
            nt = min(NT, j1 - t0)
            for g in range(G):
                sacc[g] = zero
            # K in chunks of DC dims: the block reads each row's chunk as consecutive words
            # (a thread per key reading its own row would touch a cache line per thread)
            for d0 in range(0, D, DC):
                dc = min(DC, D - d0)
                for e in range(tid, NT * DC, NT):
                    r = e // DC
                    c = e - r * DC
                    x = zero
                    if r < nt and c < dc:
                        x = k[hk, t0 + r, d0 + c]
                    ks[r * KS + c] = x
                cuda.syncthreads()
                for c in range(dc):
                    kv = ks[tid * KS + c]
                    for g in range(G):
                        sacc[g] += qs[g * MAXD + d0 + c] * kv
                cuda.syncthreads()
            for g in range(G):
                s = ninf
                if tid < nt and g < gn:
                    s = sacc[g]
                red[g * NT + tid] = s
            cuda.syncthreads()
            # every thread keeps its own score; the tree below overwrites red with maxima
            for g in range(G):
                mine[g] = red[g * NT + tid]
            stride = NT // 2
            while stride > 0:
                if tid < stride:
                    for g in range(G):
                        a = red[g * NT + tid]
                        b = red[g * NT + tid + stride]
                        red[g * NT + tid] = a if (a >= b or a != a) else b  # NaN sticks
                cuda.syncthreads()
                stride //= 2
            for g in range(G):
                mx = red[g * NT]
                if mx > m[g] or mx != mx:  # a NaN score makes the head's row NaN, as the reference
                    alpha = math.exp(m[g] - mx)  # 0 on the first tile with a key
                    l[g] *= alpha
                    for c in range(dvp):
                        acc[g * dvp + c] *= alpha
                    m[g] = mx
            cuda.syncthreads()  # every thread has read the maxima before p overwrites them
            for g in range(G):
                p = zero
                if mine[g] != ninf:  # (-inf: no key here; NaN stays NaN)
                    p = math.exp(mine[g] - m[g])
                l[g] += p
                red[g * NT + tid] = p  # the probabilities replace the maxima
            cuda.syncthreads()
            nt = min(NT, j1 - t0)
            for c in range(dvp):
                d = tid + c * NT
                if d < Dv:
                    for t in range(nt):
                        vj = v[hk, t0 + t, d]
                        for g in range(G):
                            acc[g * dvp + c] += red[g * NT + t] * vj
            cuda.syncthreads()
        # the row sums: one tree at the end
        for g in range(G):
            red[g * NT + tid] = l[g]
        cuda.syncthreads()
        stride = NT // 2
        while stride > 0:
            if tid < stride:
                for g in range(G):
                    red[g * NT + tid] += red[g * NT + tid + stride]
            cuda.syncthreads()
            stride //= 2
        for g in range(gn):
            h = h0 + g
            if tid == 0:
                m_part[h, sp] = m[g]
                l_part[h, sp] = red[g * NT]
            for c in range(dvp):
                d = tid + c * NT
                if d < Dv:
                    acc_part[h, sp, d] = acc[g * dvp + c]

    return kernel


@functools.lru_cache(maxsize=None)
def _merge_kernel(dtype_name):
    DT = _NB_TYPES[np.dtype(dtype_name)]

    @cuda.jit
    def kernel(m_part, l_part, acc_part, out, lse):
        h = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        n_split = m_part.shape[1]
        Dv = out.shape[1]
        ninf = DT(-math.inf)
        mx = ninf
        bad = False
        for sp in range(n_split):
            if l_part[h, sp] != l_part[h, sp] or m_part[h, sp] != m_part[h, sp]:
                bad = True  # a split saw a NaN (or +inf) score: the row is NaN
            elif l_part[h, sp] > 0 and m_part[h, sp] > mx:
                mx = m_part[h, sp]
        if bad:
            for d in range(tid, out.shape[1], cuda.blockDim.x):
                out[h, d] = math.nan
            if tid == 0:
                lse[h] = math.nan
            return
        tot = DT(0.0)
        for sp in range(n_split):
            if l_part[h, sp] > 0:
                tot += math.exp(m_part[h, sp] - mx) * l_part[h, sp]
        for d in range(tid, Dv, cuda.blockDim.x):
            o = DT(0.0)
            if mx > ninf:
                for sp in range(n_split):
                    if l_part[h, sp] > 0:
                        o += math.exp(m_part[h, sp] - mx) * acc_part[h, sp, d]
                o /= tot
            out[h, d] = o
        if tid == 0:
            lse[h] = mx + math.log(tot) if mx > ninf else ninf

    return kernel


@cuda.jit
def _fill_empty(out, lse):
    h = cuda.blockIdx.x
    if h < out.shape[0]:
        for d in range(cuda.threadIdx.x, out.shape[1], cuda.blockDim.x):
            out[h, d] = 0
        if cuda.threadIdx.x == 0:
            lse[h] = -math.inf


def splits(hkv, n, sms, blocks_per_sm=None):
    """Key splits per key/value head: about ``blocks_per_sm`` (default
    ``config.CUDA_DECODE_BLOCKS_PER_SM``) blocks per SM in all, each with at least
    ``config.CUDA_DECODE_MIN_SPLIT_KEYS`` keys."""
    want = max(1, -(-(blocks_per_sm or config.CUDA_DECODE_BLOCKS_PER_SM) * sms // hkv))
    return max(1, min(want, -(-n // config.CUDA_DECODE_MIN_SPLIT_KEYS)))


def decode(q, k, v, n, scale, workspace, sms, stream=0, threads=None, stream_key=None):
    """Attend ``q`` ``(Hq, D)`` to ``k[:, :n]`` ``(Hkv, C, D)`` and ``v[:, :n]`` (Numba device arrays).

    Parameters
    ----------
    q, k, v : Numba device arrays, one float dtype (float32 or float64)
    n : int
        Positions read, ``1 <= n <= C``.
    scale : float
    workspace : dict
        Scratch kept across calls: the partial ``(m, l, acc)`` buffers while shapes allow.
    sms : int
        Streaming multiprocessors of the device (decides the key split).
    stream : numba stream
    threads : int, optional
        Threads per block (one key each per step), a power of two for the reduction trees;
        default ``config.CUDA_DECODE_THREADS`` (tests under the simulator use few).
    stream_key : hashable, optional
        Identifies ``stream`` (e.g. the CuPy stream pointer): scratch is not shared across streams.

    Returns
    -------
    out : device array, shape (Hq, Dv)
    lse : device array, shape (Hq,)
    """
    Hq, D = q.shape
    Hkv, _, Dv = v.shape
    group = Hq // Hkv
    dt = np.dtype(q.dtype)
    threads = threads or config.CUDA_DECODE_THREADS
    if n == 0:  # nothing cached: zeros, lse = -inf, as every backend
        out = cuda.device_array((Hq, Dv), dt, stream=stream)
        lse = cuda.device_array((Hq,), dt, stream=stream)
        _fill_empty[max(Hq, 1), 32, stream](out, lse)
        return out, lse
    n_split = splits(Hkv, n, sms)
    span = -(-n // n_split)
    n_split = -(-n // span)  # no empty split
    # keyed by stream too: a merge queued on another stream could still be reading the buffers
    key = (dt.str, Hq, Dv, n_split, stream_key)
    parts = workspace.get("cuda_decode")
    if parts is None or parts[0] != key:
        parts = (key, cuda.device_array((Hq, n_split), dt, stream=stream),
                 cuda.device_array((Hq, n_split), dt, stream=stream),
                 cuda.device_array((Hq, n_split, Dv), dt, stream=stream))
        workspace["cuda_decode"] = parts
    _, m_part, l_part, acc_part = parts
    out = cuda.device_array((Hq, Dv), dt, stream=stream)
    lse = cuda.device_array((Hq,), dt, stream=stream)
    # shared memory: a K chunk of threads x (dc + 1) values, and (D + threads) values per query
    # head of the block; kept under 44 KiB (the 48 KiB static limit less the kernel's own)
    dc = 32 if dt.itemsize == 4 else 16
    per_head = (D + threads) * dt.itemsize
    room = 45056 - threads * (dc + 1) * dt.itemsize
    gb = max(1, min(group, config.CUDA_DECODE_HEADS_PER_BLOCK, room // per_head))
    dvp = max(1, -(-Dv // threads))
    grid = (Hkv * -(-group // gb), n_split)
    _partial_kernel(dt.name, gb, dvp, max(1, D), threads, dc)[grid, threads, stream](
        q, k, v, n, dt.type(scale), span, m_part, l_part, acc_part)
    _merge_kernel(dt.name)[Hq, min(threads, max(32, Dv)), stream](m_part, l_part, acc_part, out, lse)
    return out, lse
