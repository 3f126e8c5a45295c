"""Fast float32 block-CSR backward kernels on the CUDA cores (exact float32), via CuPy.

The same algorithm as the Numba-CUDA kernels of :mod:`.backward` (``dQ`` query-major over the
layout, ``dK``/``dV`` key-major over its block transpose, summed over GQA groups and a k/v batch
broadcast, no atomics), written like the forward kernel of :mod:`.simt`: 256 threads own a tile
of 64 rows; the row-side operands (Q and dO, or K and V) stay in shared memory for the block's
whole life, the column-side ones are copied in per 64-column tile with ``cp.async``; each thread
computes 4 x 4 register tiles of ``S`` and ``dP`` with ``float4`` reads of padded rows, writes
``dS`` (and ``P``) to shared memory, and accumulates 4 x (D / 16) tiles of its outputs.

Taken for float32 block layouts when ``D == Dv`` is in ``config.CUDA_SIMT_HEAD_DIMS``.
"""

from __future__ import annotations

import functools

import numpy as np

from ... import config
from .simt import _PRELUDE, fits

_BACKWARD = r"""
// P and dS of a pair with scaled score s: exp(s - lse) and P (dP - delta); 0 if not allowed
// (or in a row without keys, lse = -inf)
__device__ __forceinline__ float2 p_ds(float s, float dp, float lv, float dl, bool ok) {
    const float p = (ok && lv != NEG_INF) ? expf(s - lv) : 0.f;
    return make_float2(p, ok ? p * (dp - dl) : 0.f);
}

__device__ __forceinline__ void zero_acc(float acc[4][HD / 16]) {
    #pragma unroll
    for (int a = 0; a < 4; ++a)
        #pragma unroll
        for (int e = 0; e < HD / 16; ++e) acc[a][e] = 0.f;
}

// rows r < n of a (rows, HD) matrix from row r0: acc * mul, float4 stores
__device__ __forceinline__ void store_rows(float* base, int r0, int n, const float acc[4][HD / 16],
                                           float mul, int ty, int tx) {
    #pragma unroll
    for (int a = 0; a < 4; ++a) {
        const int r = ty * 4 + a;
        if (r >= n) continue;
        float* row = base + (long long)(r0 + r) * HD;
        #pragma unroll
        for (int g = 0; g < HD / 64; ++g)
            *reinterpret_cast<float4*>(row + g * 64 + tx * 4) = make_float4(
                acc[a][g * 4] * mul, acc[a][g * 4 + 1] * mul, acc[a][g * 4 + 2] * mul, acc[a][g * 4 + 3] * mul);
    }
}

// dQ = scale * dS K over the layout, one block per (64-query tile, head, batch)
extern "C" __global__ void __launch_bounds__(NT, 1)
bsr_bwd_dq_f32(const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
               const float* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ delta,
               const long long* __restrict__ indptr, const int* __restrict__ indices,
               const int* __restrict__ mask_index, const unsigned char* __restrict__ masks,
               int Hq, int Nq, int Hkv, int Nk, int Bk, int lay_heads, int bq, int bk, int tiles,
               float scale, float* __restrict__ dq)
{
    extern __shared__ __align__(16) float smem[];
    float* qs = smem;
    float* dos = qs + TQ * RS;
    float* ks = dos + TQ * RS;
    float* vs = ks + TK * RS;
    float* dss = vs + TK * RS;
    const int tid = threadIdx.x, ty = tid >> 4, tx = tid & 15;
    const int h = blockIdx.y, b = blockIdx.z;
    const int qb = blockIdx.x / tiles;
    const int qblock0 = qb * bq;
    const int q0 = qblock0 + (blockIdx.x - qb * tiles) * TQ;
    const int qend = min(qblock0 + bq, Nq);
    if (q0 >= qend) return;
    const int nq = min(TQ, qend - q0);
    const int nbq = (Nq + bq - 1) / bq;
    const long long row = (long long)(lay_heads > 1 ? h : 0) * nbq + qb;
    const int hk = h / (Hq / Hkv);
    const int bkv = Bk > 1 ? b : 0;
    const long long head = (long long)b * Hq + h;
    const float* kbase = k + ((long long)bkv * Hkv + hk) * Nk * HD;
    const float* vbase = v + ((long long)bkv * Hkv + hk) * Nk * HD;
    load_rows(qs, q + head * Nq * HD, q0, nq, tid);
    load_rows(dos, dout + head * Nq * HD, q0, nq, tid);
    cp_commit();
    float lr[4], dr[4];
    #pragma unroll
    for (int a = 0; a < 4; ++a) {
        const int r = ty * 4 + a;
        lr[a] = r < nq ? lse[head * Nq + q0 + r] : NEG_INF;
        dr[a] = r < nq ? delta[head * Nq + q0 + r] : 0.f;
    }
    float acc[4][HD / 16];
    zero_acc(acc);

    const long long pstart = indptr[row], pend = indptr[row + 1];
    const int cpb = (bk + TK - 1) / TK;
    const long long nchunks = (pend - pstart) * cpb;
    for (long long t = 0; t < nchunks; ++t) {
        const long long p = pstart + t / cpb;
        const int kb0 = indices[p] * bk;
        const int k0 = kb0 + (int)(t % cpb) * TK;
        const int nk = min(TK, min(kb0 + bk, Nk) - k0);
        const int mi = mask_index[p];
        __syncthreads();  // the previous tile's K, V and dS are consumed
        load_rows(ks, kbase, k0, nk, tid);
        load_rows(vs, vbase, k0, nk, tid);
        cp_commit();
        cp_wait0();
        __syncthreads();
        float s[4][4], dp[4][4];
        tile_dot(s, qs, ks, ty, tx);
        tile_dot(dp, dos, vs, ty, tx);
        const bool edge = nk < TK || nq < TQ || mi >= 0;
        #pragma unroll
        for (int a = 0; a < 4; ++a) {
            const int r = ty * 4 + a;
            #pragma unroll
            for (int c = 0; c < 4; ++c) {
                const int j = tx + 16 * c;
                const bool ok = !edge || allowed(r, nq, j, nk, mi, masks, bq, bk, q0 - qblock0, k0 - kb0);
                dss[r * PS + j] = p_ds(s[a][c] * scale, dp[a][c], lr[a], dr[a], ok).y;
            }
        }
        __syncthreads();
        tile_acc(acc, dss, ks, ty, tx);
    }
    cp_wait0();  // a query tile that sees no key still waits for its own copies
    store_rows(dq + head * Nq * HD, q0, nq, acc, scale, ty, tx);
}

// dK = scale * dS^T Q and dV = P^T dO over the transposed layout, one block per (64-key tile,
// kv head, kv batch), summed over the query heads of the group and a k/v batch broadcast
extern "C" __global__ void __launch_bounds__(NT, 1)
bsr_bwd_dkdv_f32(const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
                 const float* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ delta,
                 const long long* __restrict__ indptr, const int* __restrict__ indices,
                 const int* __restrict__ mask_index, const unsigned char* __restrict__ masks,
                 int B, int Hq, int Nq, int Hkv, int Nk, int Bk, int lay_heads, int bk, int bq, int tiles,
                 float scale, float* __restrict__ dk, float* __restrict__ dv)
{
    extern __shared__ __align__(16) float smem[];
    __shared__ float lse_s[TQ], dl_s[TQ];
    float* ks = smem;
    float* vs = ks + TK * RS;
    float* qs = vs + TK * RS;
    float* dos = qs + TQ * RS;
    float* ps = dos + TQ * RS;
    float* dss = ps + TK * PS;
    const int tid = threadIdx.x, ty = tid >> 4, tx = tid & 15;
    const int hk = blockIdx.y, bkv = blockIdx.z;
    const int kb = blockIdx.x / tiles;
    const int kblock0 = kb * bk;
    const int k0 = kblock0 + (blockIdx.x - kb * tiles) * TK;
    const int kend = min(kblock0 + bk, Nk);
    if (k0 >= kend) return;
    const int nk = min(TK, kend - k0);
    const int nbk = (Nk + bk - 1) / bk;
    const long long kvhead = (long long)bkv * Hkv + hk;
    load_rows(ks, k + kvhead * Nk * HD, k0, nk, tid);
    load_rows(vs, v + kvhead * Nk * HD, k0, nk, tid);
    cp_commit();
    float acck[4][HD / 16], accv[4][HD / 16];
    zero_acc(acck);
    zero_acc(accv);
    const int group = Hq / Hkv;
    const int pairs = group * (Bk == 1 ? B : 1);
    const int cpb = (bq + TQ - 1) / TQ;
    for (int pair = 0; pair < pairs; ++pair) {
        const int h = hk * group + pair % group;
        const int b = Bk == 1 ? pair / group : bkv;
        const long long head = (long long)b * Hq + h;
        const long long row = (long long)(lay_heads > 1 ? h : 0) * nbk + kb;
        const long long pstart = indptr[row], pend = indptr[row + 1];
        const long long nchunks = (pend - pstart) * cpb;
        for (long long t = 0; t < nchunks; ++t) {
            const long long p = pstart + t / cpb;
            const int qb0 = indices[p] * bq;
            const int c0 = qb0 + (int)(t % cpb) * TQ;
            const int nc = min(TQ, min(qb0 + bq, Nq) - c0);
            const int mi = mask_index[p];
            __syncthreads();  // the previous tile's Q, dO, P and dS are consumed
            load_rows(qs, q + head * Nq * HD, c0, nc, tid);
            load_rows(dos, dout + head * Nq * HD, c0, nc, tid);
            cp_commit();
            if (tid < TQ) {
                lse_s[tid] = tid < nc ? lse[head * Nq + c0 + tid] : NEG_INF;
                dl_s[tid] = tid < nc ? delta[head * Nq + c0 + tid] : 0.f;
            }
            cp_wait0();
            __syncthreads();
            float s[4][4], dp[4][4];
            tile_dot(s, ks, qs, ty, tx);
            tile_dot(dp, vs, dos, ty, tx);
            const bool edge = nc < TQ || nk < TK || mi >= 0;
            #pragma unroll
            for (int a = 0; a < 4; ++a) {
                const int r = ty * 4 + a;
                #pragma unroll
                for (int c = 0; c < 4; ++c) {
                    const int j = tx + 16 * c;
                    // the transposed layout's masks are (bk, bq)
                    const bool ok = !edge || allowed(r, nk, j, nc, mi, masks, bk, bq, k0 - kblock0, c0 - qb0);
                    const float2 w = p_ds(s[a][c] * scale, dp[a][c], lse_s[j], dl_s[j], ok);
                    ps[r * PS + j] = w.x;
                    dss[r * PS + j] = w.y;
                }
            }
            __syncthreads();
            tile_acc(accv, ps, dos, ty, tx);
            tile_acc(acck, dss, qs, ty, tx);
        }
    }
    cp_wait0();  // a key tile that no query sees still waits for its own copies
    store_rows(dk + kvhead * Nk * HD, k0, nk, acck, scale, ty, tx);
    store_rows(dv + kvhead * Nk * HD, k0, nk, accv, 1.f, ty, tx);
}
"""


def supported(q, v):
    """Whether these kernels take a block layout's backward: float32, ``D == Dv`` in the list, on
    a device with ``cp.async`` and room for their shared memory (the dk/dv kernel needs 170 KB
    at D=128: an H100/H200 gives 227 KB, an A100 167 KB, consumer GPUs 99 KB; where it does not
    fit, the Numba kernels run)."""
    return (q.dtype == np.float32 and q.shape[3] == v.shape[3]
            and q.shape[3] in config.CUDA_SIMT_HEAD_DIMS and fits(*shared_bytes(q.shape[3])))


def shared_bytes(hd):
    """Dynamic shared memory of the dq and the dk/dv kernels: four padded 64-row operand tiles,
    and one (dq) or two (dk/dv) 64 x 64 tiles of dS / P."""
    rows = 64 * (hd + 4)
    tile = 64 * 68
    return 4 * (4 * rows + tile), 4 * (4 * rows + 2 * tile)


@functools.lru_cache(maxsize=None)
def _kernels(hd):
    import cupy as cp

    mod = cp.RawModule(code=_PRELUDE + _BACKWARD, options=("-std=c++17", f"-DHD={hd}"))
    out = []
    for name, smem in zip(("bsr_bwd_dq_f32", "bsr_bwd_dkdv_f32"), shared_bytes(hd)):
        fn = mod.get_function(name)
        fn.max_dynamic_shared_size_bytes = smem
        out.append((fn, smem))
    return out


def block_backward_f32(q, k, v, dout, lse, delta, dev, tdev, lay_heads, block_size, scale, dq,
                       dk, dv):
    """Launch both kernels on CuPy arrays (float32, C-contiguous, ``D == Dv``).

    Parameters
    ----------
    q, k, v, dout, lse, delta : cupy.ndarray
        As in :func:`.backward.block_backward`.
    dev, tdev : dict
        Device arrays of the layout and of its transpose (``_device.device_layout``).
    lay_heads : int
    block_size : tuple of int
    scale : float
    dq, dk, dv : cupy.ndarray
        Filled; every row is written (rows no pair reaches get 0).
    """
    B, Hq, Nq, D = q.shape
    Bk, Hkv, Nk, _ = k.shape
    bq, bk = block_size
    (dq_fn, dq_smem), (dkdv_fn, dkdv_smem) = _kernels(int(D))
    i32 = np.int32
    if B and Hq and Nq:
        tiles = -(-bq // 64)
        dq_fn((-(-Nq // bq) * tiles, Hq, B), (256,), (
            q, k, v, dout, lse, delta, dev["indptr"], dev["indices"], dev["mask_index"],
            dev["masks"], i32(Hq), i32(Nq), i32(Hkv), i32(Nk), i32(Bk), i32(lay_heads), i32(bq),
            i32(bk), i32(tiles), np.float32(scale), dq), shared_mem=dq_smem)
    if Bk and Hkv and Nk:
        tiles = -(-bk // 64)
        dkdv_fn((-(-Nk // bk) * tiles, Hkv, Bk), (256,), (
            q, k, v, dout, lse, delta, tdev["indptr"], tdev["indices"], tdev["mask_index"],
            tdev["masks"], i32(B), i32(Hq), i32(Nq), i32(Hkv), i32(Nk), i32(Bk), i32(lay_heads),
            i32(bk), i32(bq), i32(tiles), np.float32(scale), dk, dv), shared_mem=dkdv_smem)
