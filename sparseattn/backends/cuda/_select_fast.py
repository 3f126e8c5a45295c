"""Fast GPU paths of the selectors (CuPy: cuBLAS products, CUB sorts, CUDA C++ row kernels).

:class:`.select.CUDASelection` uses these on a real GPU when ``config.CUDA_SELECT_FAST`` is on;
the Numba-CUDA drivers of :mod:`._select_kernels` stay the fallback and the simulator's path
(CI has no GPU). Results are identical to theirs (and to the CPU backend's):

* top-k without ``within`` (:func:`topk_dense`): the scores of a tile of queries against every key
  they may see are one strided-batched cuBLAS product (``(Hkv, g * rows, D) @ (Hkv, D, keys)``,
  at most ``config.CUDA_TOPK_SCORE_BYTES`` of scores at a time; causal tiles stop at their last
  allowed key); then one block per (head, query) finds the ``top_k``-th largest score exactly by
  a radix select over order-preserving integer keys of the row (held in shared memory when it
  fits), and writes the keys above it, then the first keys equal to it (ties to the lower key),
  in ascending order by an ordered block compaction: no heap and no sort.
* grouping by label (:func:`group_sort`): one device-wide CUB radix sort of the distinct packed
  keys ``(row, label, position)``: stable by construction, any number of rows.
* LSH rows (:func:`lsh_select`): one block per (head, query) marks its candidates in a
  shared-memory bitmap of the keys (a key found in several rounds is marked once), then writes the
  set bits in order: rows come out sorted and without duplicates. Rows are counted by a first
  launch and summed on the device (``cupy.cumsum``); only the total comes to the host before the
  fill.
* LSH hashing and k-means assignment (:func:`lsh_hash`, :func:`kmeans_assign`): cuBLAS products
  and CuPy's first-extreme ``argmax``/``argmin`` (the tie rule of the Numba kernel and the CPU).
* Index arrays come to the host through CuPy's pinned-memory pool (:func:`_host`).

Rows longer than ``config.CUDA_SELECT_SMEM_BYTES`` of scores are read from global memory by the
select kernel (five passes); above 48 KiB the kernel must opt in to more shared memory, which
failed at launch (invalid argument) on the H200 with CuPy 14, hence the 40 KiB default.
"""

from __future__ import annotations

import functools
import os

import numpy as np

from ... import config
from ...layout import _index_dtype

_SOURCE = r"""
#define FULL 0xffffffffu

#if ISF64
typedef double T;
typedef unsigned long long U;
#define NBITS 64
__device__ __forceinline__ U okey(T x) {
    if (x == 0.0) x = 0.0;  // -0 == +0: equal scores tie by index
    U u = (U)__double_as_longlong(x);
    return (u >> 63) ? ~u : (u | 0x8000000000000000ull);
}
#else
typedef float T;
typedef unsigned int U;
#define NBITS 32
__device__ __forceinline__ U okey(T x) {
    if (x == 0.0f) x = 0.0f;
    U u = __float_as_uint(x);
    return (u >> 31) ? ~u : (u | 0x80000000u);
}
#endif

// Exclusive block scan of v (blockDim.x a multiple of 32, at most 1024); total over the block.
__device__ __forceinline__ long long block_scan(long long v, long long* sh, long long& total) {
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    long long x = v;
    for (int o = 1; o < 32; o <<= 1) {
        long long y = __shfl_up_sync(FULL, x, o);
        if (lane >= o) x += y;
    }
    if (lane == 31) sh[w] = x;
    __syncthreads();
    if (w == 0) {
        long long s = lane < nw ? sh[lane] : 0;
        for (int o = 1; o < 32; o <<= 1) {
            long long y = __shfl_up_sync(FULL, s, o);
            if (lane >= o) s += y;
        }
        if (lane < nw) sh[lane] = s;
    }
    __syncthreads();
    long long before = w > 0 ? sh[w - 1] : 0;
    total = sh[nw - 1];
    __syncthreads();  // sh is reused by the next call
    return before + x - v;
}

// One block per (query of the tile, head): the kk largest of S's row among its first lim keys,
// ties to the lower key, written ascending to out[indptr[row]:].
extern "C" __global__ void topk_select(const T* __restrict__ S, long long ld, int tq, int q0,
                                       int Nq, int off, int causal, int kend, int use_smem,
                                       const long long* __restrict__ indptr, IDX* __restrict__ out) {
    extern __shared__ unsigned long long dyn[];
    U* keys = (U*)dyn;
    __shared__ unsigned int hist[256];
    __shared__ long long scan_sh[32];
    __shared__ int pick[2];
    const int r = blockIdx.x, h = blockIdx.y;
    const int tid = threadIdx.x, lane = tid & 31, NT = blockDim.x;
    const long long row = (long long)h * Nq + q0 + r;
    const long long p = indptr[row];
    const int kk = (int)(indptr[row + 1] - p);
    if (kk <= 0) return;
    int lim = kend;
    if (causal) lim = min(kend, q0 + r + off + 1);
    if (kk >= lim) {  // every allowed key
        for (int j = tid; j < lim; j += NT) out[p + j] = (IDX)j;
        return;
    }
    const T* s = S + ((long long)h * tq + r) * ld;
    // radix select of the kk-th largest key, 8 bits a pass from the top
    U prefix = 0, mask = 0;
    int want = kk;  // rank wanted among the keys that match prefix under mask
    for (int shift = NBITS - 8; shift >= 0; shift -= 8) {
        for (int u = tid; u < 256; u += NT) hist[u] = 0;
        __syncthreads();
        for (int j0 = 0; j0 < lim; j0 += NT) {
            const int j = j0 + tid;
            const bool valid = j < lim;
            U key = 0;
            if (valid) {
                if (shift == NBITS - 8) {
                    key = okey(s[j]);
                    if (use_smem) keys[j] = key;
                } else {
                    key = use_smem ? keys[j] : okey(s[j]);
                }
            }
            const bool match = valid && ((key & mask) == prefix);
            const unsigned digit = (unsigned)(key >> shift) & 255u;
            const unsigned active = __ballot_sync(FULL, match);
            if (match) {  // one atomic per distinct digit of the warp
                const unsigned peers = __match_any_sync(active, digit);
                if (lane == __ffs(peers) - 1) atomicAdd(&hist[digit], (unsigned)__popc(peers));
            }
        }
        __syncthreads();
        if (tid < 32) {  // lane l holds bins 255 - 8l down to 248 - 8l
            unsigned c[8];
            unsigned sum = 0;
            for (int e = 0; e < 8; ++e) { c[e] = hist[255 - 8 * lane - e]; sum += c[e]; }
            unsigned inc = sum;
            for (int o = 1; o < 32; o <<= 1) {
                unsigned y = __shfl_up_sync(FULL, inc, o);
                if (lane >= o) inc += y;
            }
            const unsigned exc = inc - sum;
            if (exc < (unsigned)want && inc >= (unsigned)want) {  // exactly one lane
                unsigned run = exc;
                for (int e = 0; e < 8; ++e) {
                    if (run + c[e] >= (unsigned)want) {
                        pick[0] = 255 - 8 * lane - e;
                        pick[1] = (int)run;
                        break;
                    }
                    run += c[e];
                }
            }
        }
        __syncthreads();
        prefix |= ((U)pick[0]) << shift;
        mask |= ((U)255) << shift;
        want -= pick[1];
        __syncthreads();  // pick and hist are rewritten by the next pass
    }
    // the threshold is prefix; take every key above it and the first `want` equal to it
    long long base_out = 0, base_eq = 0;
    for (int j0 = 0; j0 < lim && base_out < kk; j0 += NT) {
        const int j = j0 + tid;
        U key = 0;
        const bool valid = j < lim;
        if (valid) key = use_smem ? keys[j] : okey(s[j]);
        const bool gt = valid && key > prefix;
        const bool eq = valid && key == prefix;
        long long tot_gt, tot_eq;
        const long long gt_before = block_scan(gt ? 1 : 0, scan_sh, tot_gt);
        const long long eq_before = block_scan(eq ? 1 : 0, scan_sh, tot_eq);
        const long long e_glob = base_eq + eq_before;
        const long long taken_eq0 = min(base_eq, (long long)want);
        if (gt || (eq && e_glob < want)) {
            const long long pos = base_out + gt_before + min(e_glob, (long long)want) - taken_eq0;
            out[p + pos] = (IDX)j;
        }
        base_out += tot_gt + min(base_eq + tot_eq, (long long)want) - taken_eq0;
        base_eq += tot_eq;
    }
    (void)lane;
}

// LSH rows: one block per (head, query); candidates marked in a bitmap of the keys.
// counting: writes the row's length at indptr[row + 1]; else writes the row at out[indptr[row]:].
extern "C" __global__ void lsh_rows(const int* __restrict__ qb, const long long* __restrict__ order,
                                    const long long* __restrict__ start, int Hq, int Hkv, int R,
                                    int Nq, int Nk, int nbk, int bs, int causal, int counting,
                                    long long* __restrict__ indptr, IDX* __restrict__ out) {
    extern __shared__ unsigned long long dyn[];
    const int W = (Nk + 31) >> 5;
    unsigned int* bm = (unsigned int*)dyn;
    int* chs = (int*)(bm + W);
    int* prs = chs + R;
    __shared__ long long scan_sh[32];
    const long long row = blockIdx.x;
    const int h = (int)(row / Nq), i = (int)(row - (long long)h * Nq);
    const int hk = h / (Hq / Hkv);
    const int tid = threadIdx.x, NT = blockDim.x;
    const long long pos = (long long)i + Nk - Nq;
    const int n_chunks = (Nk + bs - 1) / bs;
    for (int u = tid; u < W; u += NT) bm[u] = 0;
    for (int r = tid; r < R; r += NT) {  // where the query sits among keys sorted by (bucket, pos)
        const long long* ord = order + ((long long)hk * R + r) * Nk;
        const long long* st = start + ((long long)hk * R + r) * (nbk + 1);
        const int b = qb[((long long)h * R + r) * Nq + i];
        long long lo = st[b], hi = st[b + 1];
        while (lo < hi) {
            const long long m = (lo + hi) >> 1;
            if (ord[m] < pos) lo = m + 1; else hi = m;
        }
        const int c = (int)min(lo / bs, (long long)(n_chunks - 1));
        chs[r] = c;
        prs[r] = c > 0 ? c - 1 : n_chunks - 1;  // Reformer's look-one-back wraps
    }
    __syncthreads();
    const int span = 2 * bs;
    for (long long u = tid; u < (long long)span * R; u += NT) {
        const int r = (int)(u / span);
        int rem = (int)(u - (long long)r * span);
        int c = chs[r];
        if (rem >= bs) {
            if (prs[r] == c) continue;  // a single chunk: nothing before it
            c = prs[r];
            rem -= bs;
        }
        const long long sidx = (long long)c * bs + rem;
        if (sidx >= Nk) continue;
        const long long j = order[((long long)hk * R + r) * Nk + sidx];
        if (causal && j > pos) continue;
        atomicOr(&bm[j >> 5], 1u << (j & 31));
    }
    __syncthreads();
    // each thread a contiguous run of words, in order
    const int wpt = (W + NT - 1) / NT;
    const int w0 = min(tid * wpt, W), w1 = min(w0 + wpt, W);
    long long cnt = 0;
    for (int u = w0; u < w1; ++u) cnt += __popc(bm[u]);
    long long total;
    const long long before = block_scan(cnt, scan_sh, total);
    if (counting) {
        if (tid == 0) indptr[row + 1] = total;
        return;
    }
    long long o = indptr[row] + before;
    for (int u = w0; u < w1; ++u) {
        unsigned int bits = bm[u];
        while (bits) {
            const int b = __ffs(bits) - 1;
            out[o++] = (IDX)(u * 32 + b);
            bits &= bits - 1;
        }
    }
}
"""


@functools.lru_cache(maxsize=None)
def _kernel(name, f64, idx64):
    import cupy as cp

    options = ["-std=c++17", f"-DISF64={int(f64)}",
               "-DIDX=" + ("long long" if idx64 else "int")]
    if os.path.isdir("/usr/local/cuda/include"):
        options.append("-I/usr/local/cuda/include")
    return cp.RawKernel(_SOURCE, name, options=tuple(options))


def _smem_limit():
    return int(config.CUDA_SELECT_SMEM_BYTES)


def _set_smem(fn, nbytes):
    """Allow ``nbytes`` of dynamic shared memory (above 48 KiB needs an opt-in); False if refused."""
    if nbytes <= 48 * 1024:
        return True
    try:
        if fn.max_dynamic_shared_size_bytes < nbytes:
            fn.max_dynamic_shared_size_bytes = nbytes
        return fn.max_dynamic_shared_size_bytes >= nbytes
    except Exception:  # an older CuPy or a smaller device: the global-memory variant
        return False


def _host(x):
    """A contiguous device array's contents on the host (CuPy's current stream, synchronised).

    Large arrays land in page-locked memory from CuPy's pinned pool (``config.CUDA_SELECT_PINNED``):
    a pageable copy of 128 MiB took 37-63 ms on the H200's host, a pinned one 2.6 ms. The
    NumPy array holds its block, which goes back to the pool when the array is freed; the pool's
    free blocks are released before each new one, so what stays page-locked is what live
    layouts hold.
    """
    import cupy as cp

    if not config.CUDA_SELECT_PINNED or x.nbytes < 2**20:
        return cp.asnumpy(x)
    pool = cp.get_default_pinned_memory_pool()
    pool.free_all_blocks()  # blocks of layouts since freed: page-locked RAM must not pile up
    mem = cp.cuda.alloc_pinned_memory(x.nbytes)
    h = np.frombuffer(mem, x.dtype, x.size).reshape(x.shape)
    x.get(out=h)  # blocking: synchronises CuPy's current stream
    return h


def numba_host(d, stream=None):
    """:func:`_host` for the Numba drivers' ``host`` argument (a Numba device array in)."""
    import cupy as cp

    return _host(cp.asarray(d))


def _result(d_indptr, d_out, nnz, indptr=None):
    """``(indptr, indices, indptr_dev, indices_dev)`` as the Numba drivers return them."""
    if indptr is None:
        indptr = _host(d_indptr)
    return indptr, _host(d_out[:nnz]), d_indptr, d_out


def topk_dense(q, k, top_k, causal):
    """Top-k without ``within`` on CuPy arrays ``q`` ``(Hq, Nq, D)``, ``k`` ``(Hkv, Nk, D)``
    (float32 or float64, C-contiguous). Returns as :func:`._select_kernels.topk`."""
    import cupy as cp

    Hq, Nq, D = q.shape
    Hkv, Nk, _ = k.shape
    g = Hq // Hkv
    off = Nk - Nq
    avail = np.arange(Nq, dtype=np.int64) + off + 1 if causal else np.full(Nq, Nk, np.int64)
    counts = np.tile(np.clip(avail, 0, min(top_k, Nk)), Hq)
    indptr = np.zeros(Hq * Nq + 1, np.int64)
    np.cumsum(counts, out=indptr[1:])
    nnz = int(indptr[-1])
    d_indptr = cp.asarray(indptr)
    idt = _index_dtype(Nk, nnz)
    d_out = cp.empty(max(nnz, 1), idt)
    if nnz == 0:
        return _result(d_indptr, d_out, 0, indptr)
    f64 = q.dtype == np.float64
    fn = _kernel("topk_select", f64, idt == np.int64)
    elt = q.dtype.itemsize
    rows = max(1, min(Nq, int(config.CUDA_TOPK_SCORE_BYTES) // max(1, Hq * Nk * elt)))
    nt = int(config.CUDA_TOPK_SELECT_THREADS)
    first = 0  # causal: queries before the first with a key select nothing
    if causal and off < 0:
        first = -off
    for q0 in range(first, Nq, rows):
        nq = min(rows, Nq - q0)
        kend = min(Nk, q0 + nq + off) if causal else Nk
        if kend <= 0:
            continue
        qt = cp.ascontiguousarray(q[:, q0:q0 + nq]).reshape(Hkv, g * nq, D)
        scores = cp.matmul(qt, k[:, :kend].transpose(0, 2, 1))  # (Hkv, g * nq, kend)
        smem = kend * elt
        use_smem = smem <= _smem_limit() and _set_smem(fn, smem)
        fn((nq, Hq), (nt,), (scores, np.int64(kend), np.int32(nq), np.int32(q0), np.int32(Nq),
                             np.int32(off), np.int32(causal), np.int32(kend), np.int32(use_smem),
                             d_indptr, d_out),
           shared_mem=smem if use_smem else 0)
    return _result(d_indptr, d_out, nnz, indptr)


def group_sort(labels, n_groups, with_inv=True):
    """Stable sort of every row of CuPy ``labels`` ``(A, N)`` (ints in ``[0, n_groups)``) by label.

    Returns CuPy ``order`` ``(A, N)`` int64 (positions sorted by (label, position)), ``start``
    ``(A, n_groups + 1)`` int64 and, with ``with_inv``, ``inv`` ``(A, N)`` int64
    (``order[a, inv[a, j]] == j``), else None. One radix sort of the distinct keys
    ``(a * n_groups + label) * N + position``.
    """
    import cupy as cp

    A, N = labels.shape
    start = cp.zeros((A, n_groups + 1), np.int64)
    if A == 0 or N == 0:
        return cp.zeros((A, max(N, 1)), np.int64), start, cp.zeros((A, max(N, 1)), np.int64)
    grp = cp.arange(A, dtype=np.int64)[:, None] * n_groups + labels.astype(np.int64)
    wide = A * n_groups * N >= 2 ** 31
    kt = np.int64 if wide else np.int32
    key = (grp.astype(kt) * kt(N) + cp.arange(N, dtype=kt)[None, :]).ravel()
    key = cp.sort(key)
    order = (key % kt(N)).astype(np.int64).reshape(A, N)
    counts = cp.bincount(grp.ravel(), minlength=A * n_groups).reshape(A, n_groups)
    start[:, 1:] = cp.cumsum(counts, axis=1)
    inv = None
    if with_inv:
        inv = cp.empty((A, N), np.int64)
        inv[cp.arange(A)[:, None], order] = cp.arange(N, dtype=np.int64)[None, :]
    return order, start, inv


def numba_group_sort(labels, n_groups, stream, alloc, threads=None):
    """:func:`group_sort` with the signature of :func:`._select_kernels.group_sort` (Numba views
    in and out, no inverse), for the ``sort`` argument of the k-means and routing drivers."""
    import cupy as cp

    from ._device import numba_array

    order, start, _ = group_sort(cp.asarray(labels), n_groups, with_inv=False)
    return numba_array(order), numba_array(start), None  # the k-means and routing drivers need no inverse


def lsh_select(q_buckets, k_buckets, n_buckets, bucket_size, causal):
    """The ``lsh_select`` hook on CuPy buckets ``(Hq, R, Nq)`` / ``(Hkv, R, Nk)`` int32; None when
    the key bitmap would not fit in shared memory (the caller falls back to the Numba driver)."""
    import cupy as cp

    Hq, R, Nq = q_buckets.shape
    Hkv, _, Nk = k_buckets.shape
    smem = 4 * ((Nk + 31) // 32) + 8 * R
    if Nq == 0 or Nk == 0 or R == 0 or smem > _smem_limit():
        return None
    order, start, _ = group_sort(k_buckets.reshape(Hkv * R, Nk), n_buckets, with_inv=False)
    nnz_max = Hq * Nq * min(Nk, 2 * bucket_size * R)
    idt = _index_dtype(Nk, nnz_max)
    fn = _kernel("lsh_rows", False, idt == np.int64)
    if not _set_smem(fn, smem):
        return None
    qb = cp.ascontiguousarray(q_buckets, dtype=np.int32)
    nt = int(config.CUDA_SELECT_THREADS)
    d_indptr = cp.zeros(Hq * Nq + 1, np.int64)
    d_out = cp.empty(1, idt)

    def launch(counting, out):
        fn((Hq * Nq,), (nt,), (qb, order, start, np.int32(Hq), np.int32(Hkv), np.int32(R),
                               np.int32(Nq), np.int32(Nk), np.int32(n_buckets),
                               np.int32(bucket_size), np.int32(causal), np.int32(counting),
                               d_indptr, out), shared_mem=smem)

    launch(1, d_out)
    d_indptr = cp.cumsum(d_indptr)  # lengths at [row + 1], 0 at [0]: the offsets
    indptr = _host(d_indptr)
    nnz = int(indptr[-1])
    d_out = cp.empty(max(nnz, 1), _index_dtype(Nk, nnz))
    if d_out.dtype != idt:
        fn = _kernel("lsh_rows", False, d_out.dtype == np.int64)
        _set_smem(fn, smem)
    if nnz:
        launch(0, d_out)
    return _result(d_indptr, d_out, nnz, indptr)


def _chunks(n_rows, row_bytes):
    """Row ranges whose products stay within ``config.CUDA_TOPK_SCORE_BYTES``."""
    step = max(1, int(config.CUDA_TOPK_SCORE_BYTES) // max(1, row_bytes))
    return [(a, min(a + step, n_rows)) for a in range(0, n_rows, step)]


def lsh_hash(x, rotations):
    """Angular LSH buckets (the ``lsh_hash`` hook) by cuBLAS products: for ``p = x . R_r``,
    ``argmax([p, -p])``, first maximum wins: ``argmax(p)`` when ``max(p) >= -min(p)`` (an equal
    ``-p`` entry comes later), else ``M + argmin(p)`` (``cupy.argmax``/``argmin`` return the first
    extreme). ``x`` ``(H, N, D)``, ``rotations`` ``(R, D, M)``; returns int32 ``(H, R, N)``."""
    import cupy as cp

    H, N, _ = x.shape
    R, _, M = rotations.shape
    out = cp.empty((H, R, N), np.int32)
    if out.size == 0:
        return out
    for r in range(R):
        for a, b in _chunks(H, N * M * x.dtype.itemsize):
            p = cp.matmul(x[a:b], rotations[r])  # (h, N, M)
            hi, lo = p.max(axis=-1), p.min(axis=-1)
            out[a:b, r] = cp.where(hi >= -lo, p.argmax(axis=-1), M + p.argmin(axis=-1))
    return out


def kmeans_assign(x, centroids):
    """Nearest centroid (the ``kmeans_assign`` hook) by one cuBLAS product per key head and group:
    ``x`` ``(Hx, N, D)``, ``centroids`` ``(Hc, C, D)``; returns ``labels`` int32 ``(Hc, N)`` (first
    maximum wins) and ``sims`` ``(Hc, N)``."""
    import cupy as cp

    Hx, N, D = x.shape
    Hc, C, _ = centroids.shape
    g = Hc // Hx
    labels = cp.empty((Hc, N), np.int32)
    sims = cp.empty((Hc, N), x.dtype)
    if labels.size == 0 or C == 0:
        return labels, sims
    cent = centroids.reshape(Hx, g * C, D)
    for a, b in _chunks(Hx, N * g * C * x.dtype.itemsize):
        s = cp.matmul(x[a:b], cent[a:b].transpose(0, 2, 1))  # (h, N, g * C)
        s = s.reshape(b - a, N, g, C).transpose(0, 2, 1, 3)  # (h, g, N, C)
        labels[a * g:b * g] = s.argmax(axis=-1).reshape((b - a) * g, N)
        sims[a * g:b * g] = s.max(axis=-1).reshape((b - a) * g, N)
    return labels, sims
