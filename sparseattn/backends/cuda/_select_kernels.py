"""Content-based selection kernels of the CUDA backend (Numba-CUDA): top-k, LSH, k-means routing.

The hooks of :class:`.select.CUDASelection` call the drivers at the end of this module.

Same results as :mod:`sparseattn.backends.cpu.select` (see the hooks' contracts in
:class:`~sparseattn.backends.base.Backend`); no kernel ever holds an ``Nq x Nk`` array.

* top-k without ``within`` (:func:`_topk_dense_kernel`): one block per (head, tile of ``TQ``
  queries). Scores are computed tile by tile as in the forward kernel (Q and K chunks in shared
  memory, an ``RY x RX`` register tile per thread) and written to a shared ``TQ x TK`` tile; then
  thread ``t`` streams row ``t`` of the tile into its query's heap of ``min(top_k, keys)``
  (score, key) pairs, held in the output row itself (keys) and a scratch of the same length
  (scores). Keys arrive in ascending order, so a key enters only if its score is *strictly*
  above the heap's worst (an equal score with a higher index loses): the tie rule costs nothing.
  Memory ``O(Hq * Nq * top_k)``.
* top-k with ``within`` (:func:`_topk_within_kernel`): one block per (head, query); its threads
  score ``NT`` of the row's keys at a time, one thread feeds them to the heap.
* LSH hashing and k-means assignment (:func:`_argmax_kernel`): a tile product of rows by rotation
  columns (or centroids) and a row argmax, first maximum wins (ties go to the lower column).
* bucketing (:func:`_group_sort_kernel`): a stable counting sort of the keys of every (head,
  round) by bucket, one block per (head, round): an integer histogram, a block scan, then keys
  scattered in chunks, each key's rank among equal buckets of its chunk found in shared memory:
  no float atomics and no host round trip.
* LSH rows (:func:`_lsh_rows_kernel`): one block per (head, query); a key found in several rounds
  is kept in the first only (the inverse of each round's order says where a key sits), so the
  union needs no hash set; the row is then sorted in shared memory (bitonic network).
* k-means update (:func:`_kmeans_update_kernel`): one block per (head, cluster) sums its points in
  ascending order (the sorted groups above) in float64, like the CPU kernel: the same sums bit for
  bit; only the norm's last bit may differ where the GPU fuses a multiply-add.
* routing (:func:`_routing_clusters_kernel`, :func:`_routing_rows_kernel`): per (head, cluster)
  the ``capacity`` keys most similar to the centroid by the same heap, then rows copied from the
  cluster lists.

Rows are counted on the device, their offsets summed on the host (one copy of ``Hq * Nq`` counts,
not one per row), and filled by a second launch. Every kernel runs on the stream it is given
(the backend passes CuPy's current stream) and allocates through the ``alloc`` callable (the
backend's CuPy memory pool). The drivers below take Numba device arrays, so that the tests run
them under Numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``); for that reason no kernel uses
warp shuffles.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from numba import cuda, float64, int64

from ... import config
from ...layout import _index_dtype
from .forward import _NB_TYPES, Geometry

# ----------------------------------------------------------------------------- device helpers

# A (score, key) pair is *worse* than another when its score is lower, or equal with a higher key.
# Heaps below are min-heaps under that order (the root is the worst pair kept), stored as a score
# array and a key array from offset ``p``.


@cuda.jit(device=True, inline=True)
def _worse(s1, j1, s2, j2):
    return s1 < s2 or (s1 == s2 and j1 > j2)


@cuda.jit(device=True)
def _sift_down(hs, hj, p, n, u):
    s = hs[p + u]
    j = hj[p + u]
    while True:
        c = 2 * u + 1
        if c >= n:
            break
        if c + 1 < n and _worse(hs[p + c + 1], hj[p + c + 1], hs[p + c], hj[p + c]):
            c += 1
        if not _worse(hs[p + c], hj[p + c], s, j):
            break
        hs[p + u] = hs[p + c]
        hj[p + u] = hj[p + c]
        u = c
    hs[p + u] = s
    hj[p + u] = j


@cuda.jit(device=True)
def _offer(hs, hj, p, kk, cnt, s, j):
    """Offer ``(s, j)`` (``j`` above every key offered before) to a heap of capacity ``kk`` holding
    ``cnt`` pairs; return the new count. A heap fills unordered and is heapified once full."""
    if cnt < kk:
        hs[p + cnt] = s
        hj[p + cnt] = j
        cnt += 1
        if cnt == kk:
            for u in range(kk // 2 - 1, -1, -1):
                _sift_down(hs, hj, p, kk, u)
        return cnt
    if s > hs[p]:  # strictly: an equal score has a higher key than the root's, and loses
        hs[p] = s
        hj[p] = j
        _sift_down(hs, hj, p, kk, 0)
    return cnt


@cuda.jit(device=True)
def _heapsort_keys(a, p, n):
    """Sort the distinct ints ``a[p:p + n]`` ascending, by one thread (heapsort, in place)."""
    for start in range(n // 2 - 1, -1, -1):
        u = start
        v = a[p + u]
        while True:
            c = 2 * u + 1
            if c >= n:
                break
            if c + 1 < n and a[p + c + 1] > a[p + c]:
                c += 1
            if a[p + c] <= v:
                break
            a[p + u] = a[p + c]
            u = c
        a[p + u] = v
    for end in range(n - 1, 0, -1):
        v = a[p + end]
        a[p + end] = a[p]
        u = 0
        while True:
            c = 2 * u + 1
            if c >= end:
                break
            if c + 1 < end and a[p + c + 1] > a[p + c]:
                c += 1
            if a[p + c] <= v:
                break
            a[p + u] = a[p + c]
            u = c
        a[p + u] = v


@cuda.jit(device=True)
def _block_sort(a, p, n, tid, nt):
    """Sort ``a[p:p + n]`` ascending with the whole block (every thread must call it).

    A bitonic network whose comparators all put the minimum first (each merge opens with the
    reversed partner ``i ^ (size - 1)``): entries past ``n`` then behave as ``+inf`` and every
    comparator touching them is skipped, so ``n`` needs no padding to a power of two.
    """
    size = 2
    while size < 2 * n:
        half = size // 2
        stride = half
        while stride > 0:
            for i in range(tid, n, nt):
                if stride == half:
                    partner = i ^ (size - 1)
                else:
                    partner = i ^ stride
                if partner > i and partner < n:
                    x = a[p + i]
                    y = a[p + partner]
                    if y < x:
                        a[p + i] = y
                        a[p + partner] = x
            cuda.syncthreads()
            stride //= 2
        size *= 2


# ----------------------------------------------------------------------------- top-k


def topk_geometry(dtype):
    """The tile geometry of the dense top-k kernel for ``dtype`` (``config.CUDA_TOPK_TILES``)."""
    key = "float64" if np.dtype(dtype) == np.float64 else "float32"
    return Geometry(*config.CUDA_TOPK_TILES[key])


@functools.lru_cache(maxsize=None)
def _topk_dense_kernel(dtype_name, geom):
    DT = _NB_TYPES[np.dtype(dtype_name)]
    TY, TX, RY, RX, DC = geom
    TQ, TK, NT = TY * RY, TX * RX, TY * TX
    if NT < TQ:
        raise ValueError(f"top-k geometry {geom}: {NT} threads cannot own {TQ} queries")
    QS = DC + 1
    KS = TK + 1  # padded rows: thread t reads row t of the score tile without bank conflicts
    KOFF = TQ * QS
    BUF = max(KOFF + DC * KS, TQ * KS)
    RR = RY * RX

    @cuda.jit
    def kernel(q, k, causal, indptr, hs, out):
        buf = cuda.shared.array(BUF, DT)
        s = cuda.local.array(RR, DT)
        qa = cuda.local.array(RY, DT)
        kv = cuda.local.array(RX, DT)
        Nq = q.shape[1]
        D = q.shape[2]
        Nk = k.shape[1]
        tid = cuda.threadIdx.x
        ty = tid // TX
        tx = tid - ty * TX
        h = cuda.blockIdx.y
        q0 = cuda.blockIdx.x * TQ
        nq = min(TQ, Nq - q0)
        hk = h // (q.shape[0] // k.shape[0])
        off = Nk - Nq
        kend = Nk
        if causal:
            kend = max(0, min(Nk, q0 + nq + off))
        zero = DT(0.0)
        # the query this thread selects for
        mine = tid < nq
        p = 0
        kk = 0
        lim_row = 0
        if mine:
            row = h * Nq + q0 + tid
            p = indptr[row]
            kk = indptr[row + 1] - p  # min(top_k, allowed keys)
            lim_row = q0 + tid + off + 1 if causal else Nk
        cnt = 0
        thr = zero
        for k0 in range(0, kend, TK):
            nk = min(TK, kend - k0)
            for e in range(RR):
                s[e] = zero
            for d0 in range(0, D, DC):
                dc = min(DC, D - d0)
                for e in range(tid, TQ * DC, NT):
                    r = e // DC
                    d = e - r * DC
                    x = zero
                    if r < nq and d < dc:
                        x = q[h, q0 + r, d0 + d]
                    buf[r * QS + d] = x
                for e in range(tid, TK * DC, NT):
                    j = e // DC
                    d = e - j * DC
                    x = zero
                    if j < nk and d < dc:
                        x = k[hk, k0 + j, d0 + d]
                    buf[KOFF + d * KS + j] = x
                cuda.syncthreads()
                for d in range(DC):
                    for a in range(RY):
                        qa[a] = buf[(ty + TY * a) * QS + d]
                    for c in range(RX):
                        kv[c] = buf[KOFF + d * KS + tx + TX * c]
                    for a in range(RY):
                        for c in range(RX):
                            s[a * RX + c] += qa[a] * kv[c]
                cuda.syncthreads()
            for a in range(RY):
                for c in range(RX):
                    buf[(ty + TY * a) * KS + tx + TX * c] = s[a * RX + c]
            cuda.syncthreads()
            if kk > 0:
                lim = min(nk, lim_row - k0)
                for jj in range(lim):
                    v = buf[tid * KS + jj]
                    if cnt < kk or v > thr:
                        cnt = _offer(hs, out, p, kk, cnt, v, k0 + jj)
                        if cnt == kk:
                            thr = hs[p]
            cuda.syncthreads()  # the tile is read before the next one is written
        if kk > 0:
            _heapsort_keys(out, p, kk)

    return kernel


@functools.lru_cache(maxsize=None)
def _topk_within_kernel(dtype_name, nt, maxd):
    DT = _NB_TYPES[np.dtype(dtype_name)]
    NT = nt
    MAXD = maxd

    @cuda.jit
    def kernel(q, k, w_indptr, w_indices, w_heads, causal, indptr, hs, out):
        qs = cuda.shared.array(MAXD, DT)
        ss = cuda.shared.array(NT, DT)
        js = cuda.shared.array(NT, int64)
        Nq = q.shape[1]
        D = q.shape[2]
        Nk = k.shape[1]
        tid = cuda.threadIdx.x
        i = cuda.blockIdx.x
        h = cuda.blockIdx.y
        row = h * Nq + i
        p = indptr[row]
        kk = indptr[row + 1] - p
        if kk == 0:  # uniform over the block
            return
        hk = h // (q.shape[0] // k.shape[0])
        wrow = (h if w_heads > 1 else 0) * Nq + i
        lo = w_indptr[wrow]
        hi = w_indptr[wrow + 1]
        if causal:  # indices ascend: the allowed keys are a prefix of the row
            lim = i + Nk - Nq
            a = lo
            b = hi
            while a < b:
                m = (a + b) // 2
                if w_indices[m] <= lim:
                    a = m + 1
                else:
                    b = m
            hi = a
        for d in range(tid, D, NT):
            qs[d] = q[h, i, d]
        cuda.syncthreads()
        cnt = 0
        thr = DT(0.0)
        for c0 in range(lo, hi, NT):
            n = min(NT, hi - c0)
            if tid < n:
                j = w_indices[c0 + tid]
                x = DT(0.0)
                for d in range(D):
                    x += qs[d] * k[hk, j, d]
                ss[tid] = x
                js[tid] = j
            cuda.syncthreads()
            if tid == 0:
                for t in range(n):
                    v = ss[t]
                    if cnt < kk or v > thr:
                        cnt = _offer(hs, out, p, kk, cnt, v, js[t])
                        if cnt == kk:
                            thr = hs[p]
            cuda.syncthreads()
        _block_sort(out, p, kk, tid, NT)

    return kernel


def topk(q, k, top_k, causal, stream, alloc, within=None, w_dev=None, geometry=None, threads=None):
    """Top-k selection on the device (the :meth:`~sparseattn.backends.base.Backend.topk` hook).

    Parameters
    ----------
    q, k : Numba device arrays ``(Hq, Nq, D)`` and ``(Hkv, Nk, D)``, float32 or float64.
    top_k : int
    causal : bool
    stream : Numba stream or 0
    alloc : callable ``(shape, dtype) -> device array``
    within : CSRLayout, optional
        Host layout restricting the candidates; ``w_dev`` its ``(indptr, indices)`` on the device.
    geometry, threads : optional overrides of ``config.CUDA_TOPK_TILES`` and
        ``config.CUDA_SELECT_THREADS`` (the simulator tests use small ones).

    Returns
    -------
    indptr, indices : NumPy arrays of the layout
    indptr_dev, indices_dev : the same on the device
    """
    Hq, Nq, D = q.shape
    Nk = k.shape[1]
    off = Nk - Nq
    if within is None:
        avail = np.arange(Nq, dtype=np.int64) + off + 1 if causal else np.full(Nq, Nk, np.int64)
        counts = np.tile(np.clip(avail, 0, min(top_k, Nk)), Hq)
    else:
        from ..cpu.select import within_row_counts  # host index arithmetic, O(rows)

        counts = within_row_counts(within.indptr, within.indices, within.heads, Hq, Nq, Nk,
                                   causal, top_k)
    indptr = np.zeros(Hq * Nq + 1, np.int64)
    np.cumsum(counts, out=indptr[1:])
    nnz = int(indptr[-1])
    d_indptr = _to_device(indptr, stream, alloc)
    d_out = alloc((max(nnz, 1),), _index_dtype(Nk, nnz))
    if nnz:
        dtype = np.dtype(q.dtype)
        hs = alloc((nnz,), dtype)
        if within is None:
            geom = geometry or topk_geometry(dtype)
            kern = _topk_dense_kernel(dtype.name, geom)
            kern[(-(-Nq // geom.tq), Hq), geom.threads, stream](q, k, causal, d_indptr, hs, d_out)
        else:
            if D > config.CUDA_CSR_MAX_D:
                raise ValueError(f"head dimension {D} is too large for the CUDA top-k kernel "
                                 f"(at most config.CUDA_CSR_MAX_D = {config.CUDA_CSR_MAX_D})")
            nt = int(threads or config.CUDA_SELECT_THREADS)
            kern = _topk_within_kernel(dtype.name, nt, config.CUDA_CSR_MAX_D)
            kern[(Nq, Hq), nt, stream](q, k, w_dev[0], w_dev[1], within.heads, causal, d_indptr,
                                       hs, d_out)
    out = _to_host(d_out, stream)[:nnz]
    return indptr, out, d_indptr, d_out


# ----------------------------------------------------------------------------- tile product + argmax


def argmax_geometry(dtype):
    key = "float64" if np.dtype(dtype) == np.float64 else "float32"
    return Geometry(*config.CUDA_ARGMAX_TILES[key])


@functools.lru_cache(maxsize=None)
def _argmax_kernel(dtype_name, geom, signed, w_dm, with_sims):
    """``out[a, b, n] = argmax_m x[a // xdiv, n] . W[a * wa + b, m]`` (first maximum wins).

    ``signed``: the candidates are ``[p, -p]`` (LSH), column ``m`` of ``-p`` numbered ``M + m``.
    ``w_dm``: ``W`` is stored ``(G, D, M)`` (rotations) rather than ``(G, M, D)`` (centroids).
    ``with_sims``: also store the winning value in ``sims[a, b, n]``.
    """
    DT = _NB_TYPES[np.dtype(dtype_name)]
    TY, TX, RY, RX, DC = geom
    TN, TM, NT = TY * RY, TX * RX, TY * TX
    XS = DC + 1
    WS = TM + 1
    WOFF = TN * XS
    BUF = WOFF + DC * WS
    RR = RY * RX
    RED = TN * TX

    @cuda.jit
    def kernel(x, w, xdiv, wa, out, sims):
        buf = cuda.shared.array(BUF, DT)
        rv = cuda.shared.array(RED, DT)
        ri = cuda.shared.array(RED, int64)
        bv = cuda.shared.array(TN, DT)
        bi = cuda.shared.array(TN, int64)
        s = cuda.local.array(RR, DT)
        xa = cuda.local.array(RY, DT)
        wv = cuda.local.array(RX, DT)
        N = x.shape[1]
        D = x.shape[2]
        M = w.shape[2] if w_dm else w.shape[1]
        tid = cuda.threadIdx.x
        ty = tid // TX
        tx = tid - ty * TX
        a_ = cuda.blockIdx.y
        b_ = cuda.blockIdx.z
        n0 = cuda.blockIdx.x * TN
        nn = min(TN, N - n0)
        xh = a_ // xdiv
        g = a_ * wa + b_
        zero = DT(0.0)
        ninf = DT(-math.inf)
        big = 2 * M + 1
        for r in range(tid, TN, NT):
            bv[r] = ninf
            bi[r] = big
        for m0 in range(0, M, TM):
            nm = min(TM, M - m0)
            for e in range(RR):
                s[e] = zero
            for d0 in range(0, D, DC):
                dc = min(DC, D - d0)
                for e in range(tid, TN * DC, NT):
                    r = e // DC
                    d = e - r * DC
                    v = zero
                    if r < nn and d < dc:
                        v = x[xh, n0 + r, d0 + d]
                    buf[r * XS + d] = v
                for e in range(tid, TM * DC, NT):
                    if w_dm:  # (G, D, M): consecutive threads read consecutive columns
                        d = e // TM
                        m = e - d * TM
                        v = zero
                        if m < nm and d < dc:
                            v = w[g, d0 + d, m0 + m]
                    else:
                        m = e // DC
                        d = e - m * DC
                        v = zero
                        if m < nm and d < dc:
                            v = w[g, m0 + m, d0 + d]
                    buf[WOFF + d * WS + m] = v
                cuda.syncthreads()
                for d in range(DC):
                    for a in range(RY):
                        xa[a] = buf[(ty + TY * a) * XS + d]
                    for c in range(RX):
                        wv[c] = buf[WOFF + d * WS + tx + TX * c]
                    for a in range(RY):
                        for c in range(RX):
                            s[a * RX + c] += xa[a] * wv[c]
                cuda.syncthreads()
            # per (row, thread): best of its columns, ties to the lower column number
            for a in range(RY):
                r = ty + TY * a
                best = ninf
                arg = big
                for c in range(RX):
                    m = tx + TX * c
                    if m < nm:
                        v = s[a * RX + c]
                        if v > best or (v == best and m0 + m < arg):
                            best = v
                            arg = m0 + m
                        if signed:
                            v = -v
                            if v > best or (v == best and M + m0 + m < arg):
                                best = v
                                arg = M + m0 + m
                rv[r * TX + tx] = best
                ri[r * TX + tx] = arg
            cuda.syncthreads()
            for r in range(tid, TN, NT):
                best = bv[r]
                arg = bi[r]
                for t in range(TX):
                    v = rv[r * TX + t]
                    u = ri[r * TX + t]
                    if v > best or (v == best and u < arg):
                        best = v
                        arg = u
                bv[r] = best
                bi[r] = arg
            cuda.syncthreads()
        for r in range(tid, nn, NT):
            out[a_, b_, n0 + r] = bi[r]
            if with_sims:
                sims[a_, b_, n0 + r] = bv[r]

    return kernel


def lsh_hash(x, rotations, stream, alloc, geometry=None):
    """Angular LSH buckets (the ``lsh_hash`` hook): ``x`` ``(H, N, D)``, ``rotations``
    ``(R, D, nb2)`` device arrays of one dtype; returns int32 ``(H, R, N)`` on the device."""
    H, N, _ = x.shape
    R = rotations.shape[0]
    out = alloc((H, R, N), np.int32)
    if H and R and N:
        dtype = np.dtype(x.dtype)
        geom = geometry or argmax_geometry(dtype)
        kern = _argmax_kernel(dtype.name, geom, True, True, False)
        kern[(-(-N // geom.tq), H, R), geom.threads, stream](x, rotations, 1, 0, out, out)
    return out


def kmeans_assign(x, centroids, stream, alloc, geometry=None):
    """Nearest centroid (the ``kmeans_assign`` hook): ``x`` ``(Hx, N, D)``, ``centroids``
    ``(Hc, C, D)``; returns device ``labels`` int32 ``(Hc, N)`` and ``sims`` ``(Hc, N)``."""
    Hx, N, _ = x.shape
    Hc = centroids.shape[0]
    dtype = np.dtype(x.dtype)
    labels = alloc((Hc, 1, N), np.int32)
    sims = alloc((Hc, 1, N), dtype)
    if Hc and N:
        geom = geometry or argmax_geometry(dtype)
        kern = _argmax_kernel(dtype.name, geom, False, False, True)
        kern[(-(-N // geom.tq), Hc, 1), geom.threads, stream](x, centroids, Hc // Hx, 1, labels,
                                                               sims)
    return labels.reshape((Hc, N)), sims.reshape((Hc, N))


# ----------------------------------------------------------------------------- grouping by label


@functools.lru_cache(maxsize=None)
def _group_sort_kernel(nt):
    NT = nt

    @cuda.jit
    def kernel(labels, n_groups, start, fill, order, inv):
        """Stable counting sort of ``labels[a]`` (one block per ``a``): ``order[a]`` the positions
        sorted by (label, position), ``start[a]`` where each label begins, ``inv[a]`` the inverse
        permutation of ``order[a]``; ``fill``: scratch ``(A, n_groups)``."""
        part = cuda.shared.array(NT, int64)
        lab = cuda.shared.array(NT, int64)
        a = cuda.blockIdx.x
        N = labels.shape[1]
        tid = cuda.threadIdx.x
        for u in range(tid, n_groups + 1, NT):
            start[a, u] = 0
        cuda.syncthreads()
        for j in range(tid, N, NT):
            cuda.atomic.add(start, (a, labels[a, j] + 1), 1)  # integer counts: deterministic
        cuda.syncthreads()
        # inclusive scan of start[a, :]: each thread a contiguous segment, then the partials
        seg = (n_groups + 1 + NT - 1) // NT
        u0 = tid * seg
        u1 = min(u0 + seg, n_groups + 1)
        t_sum = 0
        for u in range(u0, u1):
            t_sum += start[a, u]
        part[tid] = t_sum
        cuda.syncthreads()
        if tid == 0:
            run = 0
            for t in range(NT):
                c = part[t]
                part[t] = run
                run += c
        cuda.syncthreads()
        run = part[tid]
        for u in range(u0, u1):
            run += start[a, u]
            start[a, u] = run
        cuda.syncthreads()
        for u in range(tid, n_groups, NT):
            fill[a, u] = start[a, u]
        cuda.syncthreads()
        # scatter chunk by chunk: a key's rank among the chunk's keys of its label, before it
        for c0 in range(0, N, NT):
            n = min(NT, N - c0)
            b = -1
            if tid < n:
                b = labels[a, c0 + tid]
            lab[tid] = b
            cuda.syncthreads()
            rank = 0
            last = True
            pos = 0
            if tid < n:
                for u in range(n):
                    if lab[u] == b:
                        if u < tid:
                            rank += 1
                        elif u > tid:
                            last = False
                pos = fill[a, b] + rank
                order[a, pos] = c0 + tid
                inv[a, c0 + tid] = pos
            cuda.syncthreads()  # every key of the chunk read fill before it moves on
            if tid < n and last:
                fill[a, b] = pos + 1
            cuda.syncthreads()

    return kernel


def group_sort(labels, n_groups, stream, alloc, threads=None):
    """Stable counting sort of every row of ``labels`` ``(A, N)`` (ints in ``[0, n_groups)``).

    Returns device arrays ``order`` ``(A, N)`` int64, ``start`` ``(A, n_groups + 1)`` int64 and
    ``inv`` ``(A, N)`` int64 (``order[a, inv[a, j]] == j``).
    """
    A, N = labels.shape
    order = alloc((A, max(N, 1)), np.int64)
    inv = alloc((A, max(N, 1)), np.int64)
    start = alloc((A, n_groups + 1), np.int64)
    fill = alloc((A, max(n_groups, 1)), np.int64)
    if A:
        nt = int(threads or config.CUDA_SELECT_THREADS)
        _group_sort_kernel(nt)[A, nt, stream](labels, n_groups, start, fill, order, inv)
    return order, start, inv


# ----------------------------------------------------------------------------- LSH rows


@functools.lru_cache(maxsize=None)
def _lsh_rows_kernel(nt, rounds, cap):
    NT = nt
    R = rounds
    CAP = cap

    @cuda.jit
    def kernel(q_buckets, order, start, inv, bucket_size, causal, counting, indptr, out):
        chs = cuda.shared.array(R, int64)
        prs = cuda.shared.array(R, int64)
        cnt = cuda.shared.array(1, int64)
        srt = cuda.shared.array(CAP, int64)
        Hq = q_buckets.shape[0]
        Nq = q_buckets.shape[2]
        Nk = order.shape[2]
        tid = cuda.threadIdx.x
        row = cuda.blockIdx.x
        h = row // Nq
        i = row - h * Nq
        hk = h // (Hq // order.shape[0])
        pos = i + Nk - Nq
        n_chunks = (Nk + bucket_size - 1) // bucket_size
        for r in range(tid, R, NT):  # where the query sits among the keys sorted by (bucket, pos)
            b = q_buckets[h, r, i]
            lo = start[hk, r, b]
            hi = start[hk, r, b + 1]
            while lo < hi:
                m = (lo + hi) // 2
                if order[hk, r, m] < pos:
                    lo = m + 1
                else:
                    hi = m
            c = min(lo // bucket_size, n_chunks - 1)
            chs[r] = c
            prs[r] = c - 1 if c > 0 else n_chunks - 1  # Reformer's look-one-back wraps
        if tid == 0:
            cnt[0] = 0
        cuda.syncthreads()
        p = 0
        if not counting:
            p = indptr[row]
        span = 2 * bucket_size
        for u in range(tid, span * R, NT):
            r = u // span
            rem = u - r * span
            c = chs[r]
            if rem >= bucket_size:
                if prs[r] == c:
                    continue  # a single chunk: nothing before it
                c = prs[r]
                rem -= bucket_size
            s = c * bucket_size + rem
            if s >= Nk:
                continue
            j = order[hk, r, s]
            if causal and j > pos:
                continue
            dup = False
            for r2 in range(r):  # listed by an earlier round already?
                c2 = inv[hk, r2, j] // bucket_size
                if c2 == chs[r2] or c2 == prs[r2]:
                    dup = True
                    break
            if dup:
                continue
            slot = cuda.atomic.add(cnt, 0, 1)
            if not counting:
                out[p + slot] = j
        cuda.syncthreads()
        n = cnt[0]
        if counting:
            if tid == 0:
                indptr[row + 1] = n
            return
        if n <= CAP:  # sort in shared memory (slots were taken in any order)
            for t in range(tid, n, NT):
                srt[t] = out[p + t]
            cuda.syncthreads()
            _block_sort(srt, 0, n, tid, NT)
            for t in range(tid, n, NT):
                out[p + t] = srt[t]
        else:
            _block_sort(out, p, n, tid, NT)

    return kernel


def _two_pass(launch, n_rows, n_k, stream, alloc, host=None):
    """Count the rows (``launch(True, indptr, dummy)`` writes lengths at ``indptr[row + 1]``), sum
    them on the host, then fill (``launch(False, indptr, out)``). Returns as :func:`topk`.
    ``host``: replaces :func:`_to_host` (the backend's pinned copies on a real GPU)."""
    to_host = host or _to_host_default
    d_indptr = alloc((n_rows + 1,), np.int64)
    launch(True, d_indptr, d_indptr)
    counts = to_host(d_indptr, stream)
    counts[0] = 0
    indptr = np.cumsum(counts)
    nnz = int(indptr[-1])
    d_indptr.copy_to_device(indptr, stream=stream)
    d_out = alloc((max(nnz, 1),), _index_dtype(n_k, nnz))
    if nnz:
        launch(False, d_indptr, d_out)
    out = to_host(d_out, stream)[:nnz]
    return indptr, out, d_indptr, d_out


def lsh_select(q_buckets, k_buckets, n_buckets, bucket_size, causal, stream, alloc, threads=None):
    """Reformer chunking (the ``lsh_select`` hook) from device buckets ``(Hq, R, Nq)`` and
    ``(Hkv, R, Nk)`` int32. Returns as :func:`topk`."""
    Hq, R, Nq = q_buckets.shape
    Hkv, _, Nk = k_buckets.shape
    if Nq == 0 or Nk == 0 or R == 0:
        return _empty(Hq * Nq, Nk, stream, alloc)
    nt = int(threads or config.CUDA_SELECT_THREADS)
    order, start, inv = group_sort(k_buckets.reshape((Hkv * R, Nk)), n_buckets, stream, alloc,
                                   threads=nt)
    order = order.reshape((Hkv, R, Nk))
    start = start.reshape((Hkv, R, n_buckets + 1))
    inv = inv.reshape((Hkv, R, Nk))
    cap = int(min(config.CUDA_SELECT_SORT_CAP, _pow2(2 * bucket_size * R)))
    kern = _lsh_rows_kernel(nt, R, cap)

    def launch(counting, indptr, out):
        kern[Hq * Nq, nt, stream](q_buckets, order, start, inv, bucket_size, causal, counting,
                                  indptr, out)

    return _two_pass(launch, Hq * Nq, Nk, stream, alloc)


# ----------------------------------------------------------------------------- k-means routing


@functools.lru_cache(maxsize=None)
def _kmeans_update_kernel(dtype_name, nt, dp):
    DT = _NB_TYPES[np.dtype(dtype_name)]
    NT = nt
    DP = dp
    SD = nt * dp

    @cuda.jit
    def kernel(q, k, q_order, q_start, k_order, k_start, centroids, new):
        sums = cuda.shared.array(SD, float64)
        inv_s = cuda.shared.array(1, float64)
        acc = cuda.local.array(DP, float64)
        D = q.shape[2]
        tid = cuda.threadIdx.x
        c = cuda.blockIdx.x
        h = cuda.blockIdx.y
        hk = h // (q.shape[0] // k.shape[0])
        for u in range(DP):
            acc[u] = 0.0
        # the cluster's queries, then its keys, each in ascending order: the CPU kernel's sums
        for s in range(q_start[h, c], q_start[h, c + 1]):
            i = q_order[h, s]
            for u in range(DP):
                d = tid + NT * u
                if d < D:
                    acc[u] += q[h, i, d]
        for s in range(k_start[h, c], k_start[h, c + 1]):
            j = k_order[h, s]
            for u in range(DP):
                d = tid + NT * u
                if d < D:
                    acc[u] += k[hk, j, d]
        for u in range(DP):
            sums[tid + NT * u] = acc[u]
        cuda.syncthreads()
        if tid == 0:  # the norm in the CPU's order (one thread: D terms)
            nrm = 0.0
            for d in range(D):
                nrm += sums[d] * sums[d]
            inv_s[0] = 1.0 / math.sqrt(nrm) if nrm > 0.0 else 0.0
        cuda.syncthreads()
        inv = inv_s[0]
        for d in range(tid, D, NT):
            if inv > 0.0:
                new[h, c, d] = DT(sums[d] * inv)
            else:  # no point, or a zero sum: the centroid stays
                new[h, c, d] = centroids[h, c, d]

    return kernel


def kmeans_update(q, k, q_labels, k_labels, centroids, stream, alloc, threads=None, sort=None):
    """One spherical k-means step (the ``kmeans_update`` hook) on device arrays; returns the new
    centroids ``(Hq, C, D)`` on the device. ``sort``: a replacement for :func:`group_sort` (same
    signature and results; the backend passes its CUB sort on a real GPU)."""
    Hq, C, D = centroids.shape
    new = alloc((Hq, C, D), np.dtype(centroids.dtype))
    if Hq == 0 or C == 0 or D == 0:
        return new
    nt = int(threads or min(config.CUDA_SELECT_THREADS, _pow2(D)))
    sort = sort or group_sort
    qo, qs, _ = sort(q_labels, C, stream, alloc, threads=threads)
    ko, ks, _ = sort(k_labels, C, stream, alloc, threads=threads)
    kern = _kmeans_update_kernel(np.dtype(q.dtype).name, nt, -(-D // nt))
    kern[(C, Hq), nt, stream](q, k, qo, qs, ko, ks, centroids, new)
    return new


@functools.lru_cache(maxsize=None)
def _routing_clusters_kernel(nt):
    NT = nt

    @cuda.jit
    def kernel(k_order, k_start, k_sims, cap, hs, keys, start2):
        """Per (cluster, head) block: the cluster's keys (at most ``cap``, the most similar; ties:
        lower key), ascending, to ``keys[h * Nk + start2[h, c]:]``."""
        tot = cuda.shared.array(1, int64)
        tid = cuda.threadIdx.x
        c = cuda.blockIdx.x
        h = cuda.blockIdx.y
        Nk = k_order.shape[1]
        if tid == 0:
            tot[0] = 0
        cuda.syncthreads()
        t_sum = 0
        for c2 in range(tid, c, NT):  # where this cluster's list begins
            t_sum += min(k_start[h, c2 + 1] - k_start[h, c2], cap)
        cuda.atomic.add(tot, 0, t_sum)
        cuda.syncthreads()
        w = tot[0]
        lo = k_start[h, c]
        n = k_start[h, c + 1] - lo
        kept = min(n, cap)
        base = h * Nk + w
        if tid == 0:
            start2[h, c + 1] = w + kept
            if c == 0:
                start2[h, 0] = 0
        if n <= cap:
            for u in range(tid, n, NT):
                keys[base + u] = k_order[h, lo + u]
            return
        if tid == 0:  # keys ascend through the group: the heap's tie rule holds
            cnt = 0
            thr = k_sims[h, 0]
            for u in range(n):
                j = k_order[h, lo + u]
                v = k_sims[h, j]
                if cnt < cap or v > thr:
                    cnt = _offer(hs, keys, base, cap, cnt, v, j)
                    if cnt == cap:
                        thr = hs[base]
        cuda.syncthreads()
        _block_sort(keys, base, cap, tid, NT)

    return kernel


@functools.lru_cache(maxsize=None)
def _routing_rows_kernel(nt):
    NT = nt

    @cuda.jit
    def kernel(q_labels, keys, start2, Nk, causal, counting, indptr, out):
        tid = cuda.threadIdx.x
        row = cuda.blockIdx.x
        Nq = q_labels.shape[1]
        h = row // Nq
        i = row - h * Nq
        cl = q_labels[h, i]
        lo = h * Nk + start2[h, cl]
        hi = h * Nk + start2[h, cl + 1]
        if causal:  # the list ascends: the allowed keys are a prefix
            lim = i + Nk - Nq
            a = lo
            b = hi
            while a < b:
                m = (a + b) // 2
                if keys[m] <= lim:
                    a = m + 1
                else:
                    b = m
            hi = a
        if counting:
            if tid == 0:
                indptr[row + 1] = hi - lo
            return
        p = indptr[row]
        for u in range(tid, hi - lo, NT):
            out[p + u] = keys[lo + u]

    return kernel


def routing_select(q_labels, k_labels, k_sims, n_clusters, capacity, causal, stream, alloc,
                   threads=None, sort=None, host=None):
    """The routing layout (the ``routing_select`` hook) from device labels and similarities.
    Returns as :func:`topk`; ``sort`` as in :func:`kmeans_update`, ``host`` as in
    :func:`_two_pass`."""
    Hq, Nq = q_labels.shape
    Nk = k_labels.shape[1]
    if Nq == 0 or Nk == 0:
        return _empty(Hq * Nq, Nk, stream, alloc)
    nt = int(threads or config.CUDA_SELECT_THREADS)
    k_order, k_start, _ = (sort or group_sort)(k_labels, n_clusters, stream, alloc, threads=nt)
    hs = alloc((Hq * Nk,), np.dtype(k_sims.dtype))
    keys = alloc((Hq * Nk,), np.int64)
    start2 = alloc((Hq, n_clusters + 1), np.int64)
    _routing_clusters_kernel(nt)[(n_clusters, Hq), nt, stream](k_order, k_start, k_sims,
                                                              capacity, hs, keys, start2)
    kern = _routing_rows_kernel(nt)

    def launch(counting, indptr, out):
        kern[Hq * Nq, nt, stream](q_labels, keys, start2, Nk, causal, counting, indptr, out)

    return _two_pass(launch, Hq * Nq, Nk, stream, alloc, host=host)


# ----------------------------------------------------------------------------- host helpers


def _pow2(n):
    return 1 << max(0, int(n) - 1).bit_length()


def _to_host_default(d, stream):
    h = d.copy_to_host(stream=stream)
    if stream:
        stream.synchronize()
    return h


_to_host = _to_host_default


def _to_device(h, stream, alloc):
    d = alloc(h.shape, h.dtype)
    if h.size:
        d.copy_to_device(h, stream=stream)
    return d


def _empty(n_rows, n_k, stream, alloc):
    indptr = np.zeros(n_rows + 1, np.int64)
    out = np.zeros(0, _index_dtype(n_k, 0))
    return indptr, out, _to_device(indptr, stream, alloc), alloc((1,), out.dtype)
