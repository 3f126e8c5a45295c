"""Fast float32 block-CSR forward kernel on the CUDA cores (exact float32, no TF32), via CuPy.

The Numba-CUDA kernel (:mod:`.forward`) is the general float32/float64 path and the one the CUDA
simulator checks; Numba's 64-bit index arithmetic and array descriptors cost it registers and
instructions in the hot loops, though. This kernel is the same algorithm written for the
compiler: 256 threads take a tile of 64 query rows; per 64-key tile, Q, K and V are copied into
shared memory with ``cp.async`` (rows padded by 16 bytes, so the ``float4`` reads below are free
of bank conflicts), each thread computes a 4 x 4 register tile of scores (rows ``4 ty + a``, keys
``tx + 16 c``) with ``float4`` loads, the online softmax reduces rows with warp shuffles, P goes
back to shared memory over Q, and each thread accumulates a 4 x (D / 16) tile of the output.

Taken when ``D == Dv`` is in ``config.CUDA_SIMT_HEAD_DIMS``; otherwise the Numba kernel runs.
"""

from __future__ import annotations

import functools

import numpy as np

from ... import config

#: Macros and device helpers (tile copies, the 4 x 4 score tile, the P V-style accumulation, the
#: mask test) shared with the backward kernels of :mod:`.simt_backward`.
_PRELUDE = r"""
#define TQ 64
#define TK 64
#define NT 256
#define RS (HD + 4)      // padded row stride (floats) of the Q, K and V tiles
#define PS (TK + 4)      // padded row stride of P (stored over Q)
#define NEG_INF (-__int_as_float(0x7f800000))

__device__ __forceinline__ unsigned smem_u32(const void* p) {
    return static_cast<unsigned>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void cp_async16(float* dst, const float* src, bool ok) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
                 :: "r"(smem_u32(dst)), "l"(src), "r"(ok ? 16 : 0));
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_wait0() { asm volatile("cp.async.wait_group 0;\n" ::); }
__device__ __forceinline__ void cp_wait1() { asm volatile("cp.async.wait_group 1;\n" ::); }

// rows [r0, r0 + 64) of a (rows, HD) float32 matrix into a padded tile; rows >= n become zeros
__device__ __forceinline__ void load_rows(float* dst, const float* base, int r0, int n, int tid) {
    #pragma unroll
    for (int e = tid; e < TQ * (HD / 4); e += NT) {
        int r = e / (HD / 4), c = (e % (HD / 4)) * 4;
        bool ok = r < n;
        cp_async16(dst + r * RS + c, base + (long long)(ok ? r0 + r : 0) * HD + c, ok);
    }
}


// s[a][c] = A row (4 ty + a) . B row (tx + 16 c), rows of two padded 64-row tiles
__device__ __forceinline__ void tile_dot(float s[4][4], const float* as, const float* bs, int ty, int tx) {
    #pragma unroll
    for (int a = 0; a < 4; ++a)
        #pragma unroll
        for (int c = 0; c < 4; ++c) s[a][c] = 0.f;
    #pragma unroll 4
    for (int d = 0; d < HD; d += 4) {
        float4 av[4], bv[4];
        #pragma unroll
        for (int a = 0; a < 4; ++a) av[a] = *reinterpret_cast<const float4*>(as + (ty * 4 + a) * RS + d);
        #pragma unroll
        for (int c = 0; c < 4; ++c) bv[c] = *reinterpret_cast<const float4*>(bs + (tx + 16 * c) * RS + d);
        #pragma unroll
        for (int a = 0; a < 4; ++a)
            #pragma unroll
            for (int c = 0; c < 4; ++c) {
                s[a][c] = fmaf(av[a].x, bv[c].x, s[a][c]);
                s[a][c] = fmaf(av[a].y, bv[c].y, s[a][c]);
                s[a][c] = fmaf(av[a].z, bv[c].z, s[a][c]);
                s[a][c] = fmaf(av[a].w, bv[c].w, s[a][c]);
            }
    }
}

// acc[a][4 g + e] += sum_j w[4 ty + a][j] z[j][64 g + 4 tx + e]: w a (64, PS) tile, z a padded one
__device__ __forceinline__ void tile_acc(float acc[4][HD / 16], const float* w, const float* z, int ty, int tx) {
    #pragma unroll 2
    for (int j = 0; j < TK; j += 4) {
        float4 wv[4];
        #pragma unroll
        for (int a = 0; a < 4; ++a) wv[a] = *reinterpret_cast<const float4*>(w + (ty * 4 + a) * PS + j);
        #pragma unroll
        for (int i = 0; i < 4; ++i) {
            #pragma unroll
            for (int g = 0; g < HD / 64; ++g) {
                const float4 zv = *reinterpret_cast<const float4*>(z + (j + i) * RS + g * 64 + tx * 4);
                #pragma unroll
                for (int a = 0; a < 4; ++a) {
                    const float wa = i == 0 ? wv[a].x : i == 1 ? wv[a].y : i == 2 ? wv[a].z : wv[a].w;
                    acc[a][g * 4 + 0] = fmaf(wa, zv.x, acc[a][g * 4 + 0]);
                    acc[a][g * 4 + 1] = fmaf(wa, zv.y, acc[a][g * 4 + 1]);
                    acc[a][g * 4 + 2] = fmaf(wa, zv.z, acc[a][g * 4 + 2]);
                    acc[a][g * 4 + 3] = fmaf(wa, zv.w, acc[a][g * 4 + 3]);
                }
            }
        }
    }
}

// pair (row r, column j) of a tile that starts (roff, coff) into its block of (br, bc): inside
// the clipped tile (nr x nc) and, for a partial block (mask mi >= 0), set in the mask
__device__ __forceinline__ bool allowed(int r, int nr, int j, int nc, int mi, const unsigned char* masks,
                                        int br, int bc, int roff, int coff) {
    bool ok = r < nr && j < nc;
    if (ok && mi >= 0) ok = masks[((long long)mi * br + (roff + r)) * bc + (coff + j)] != 0;
    return ok;
}
"""

_FORWARD = r"""
extern "C" __global__ void __launch_bounds__(NT, 2)
bsr_fwd_f32(const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
            const long long* __restrict__ indptr, const int* __restrict__ indices,
            const int* __restrict__ mask_index, const unsigned char* __restrict__ masks,
            int Hq, int Nq, int Hkv, int Nk, int Bk, int lay_heads, int bq, int bk, int tiles,
            float scale, float* __restrict__ out, float* __restrict__ lse)
{
    extern __shared__ __align__(16) float smem[];
    float* qp = smem;                 // Q tile, then P
    float* ks = smem + TQ * RS;
    float* vs = ks + TK * RS;
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
    const float* qbase = q + ((long long)b * Hq + h) * Nq * HD;
    const float* kbase = k + ((long long)bkv * Hkv + hk) * Nk * HD;
    const float* vbase = v + ((long long)bkv * Hkv + hk) * Nk * HD;

    float o[4][HD / 16];
    #pragma unroll
    for (int a = 0; a < 4; ++a)
        #pragma unroll
        for (int e = 0; e < HD / 16; ++e) o[a][e] = 0.f;
    float m[4], l[4];
    #pragma unroll
    for (int a = 0; a < 4; ++a) { m[a] = NEG_INF; l[a] = 0.f; }

    const long long pstart = indptr[row], pend = indptr[row + 1];
    const int cpb = (bk + TK - 1) / TK;
    const long long nchunks = (pend - pstart) * cpb;
    for (long long t = 0; t < nchunks; ++t) {
        const long long p = pstart + t / cpb;
        const int kb0 = indices[p] * bk;
        const int k0 = kb0 + (int)(t % cpb) * TK;
        const int nk = min(TK, min(kb0 + bk, Nk) - k0);
        const int mi = mask_index[p];
        load_rows(qp, qbase, q0, nq, tid);
        load_rows(ks, kbase, k0, nk, tid);
        cp_commit();
        load_rows(vs, vbase, k0, nk, tid);
        cp_commit();
        cp_wait1();
        __syncthreads();

        float s[4][4];
        tile_dot(s, qp, ks, ty, tx);
        __syncthreads();  // Q is consumed: P goes over it

        const bool edge = nk < TK || nq < TQ || mi >= 0;
        #pragma unroll
        for (int a = 0; a < 4; ++a) {
            const int r = ty * 4 + a;
            float mx = m[a];
            #pragma unroll
            for (int c = 0; c < 4; ++c) {
                const int j = tx + 16 * c;
                float x = s[a][c] * scale;
                if (edge && !allowed(r, nq, j, nk, mi, masks, bq, bk, q0 - qblock0, k0 - kb0)) x = NEG_INF;
                s[a][c] = x;
                mx = fmaxf(mx, x);
            }
            #pragma unroll
            for (int off = 8; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
            const float base = mx == NEG_INF ? 0.f : mx;  // nothing allowed in this row yet
            const float alpha = expf(m[a] - base);
            m[a] = mx;
            float rs = 0.f;
            #pragma unroll
            for (int c = 0; c < 4; ++c) {
                const float e = expf(s[a][c] - base);
                rs += e;
                qp[r * PS + tx + 16 * c] = e;
            }
            l[a] = l[a] * alpha + rs;
            #pragma unroll
            for (int e = 0; e < HD / 16; ++e) o[a][e] *= alpha;
        }
        cp_wait0();
        __syncthreads();  // P written, V landed

        tile_acc(o, qp, vs, ty, tx);
        __syncthreads();  // P and V consumed before the next tile's copies land
    }

    #pragma unroll
    for (int a = 0; a < 4; ++a) {
        float la = l[a];
        #pragma unroll
        for (int off = 8; off > 0; off >>= 1) la += __shfl_xor_sync(0xffffffffu, la, off);
        const int r = ty * 4 + a;
        if (r >= nq) continue;
        const float inv = la > 0.f ? 1.f / la : 0.f;
        float* orow = out + (((long long)b * Hq + h) * Nq + q0 + r) * HD;
        #pragma unroll
        for (int g = 0; g < HD / 64; ++g) {
            float4 w = make_float4(o[a][g * 4] * inv, o[a][g * 4 + 1] * inv, o[a][g * 4 + 2] * inv,
                                   o[a][g * 4 + 3] * inv);
            *reinterpret_cast<float4*>(orow + g * 64 + tx * 4) = w;
        }
        if (tx == 0)
            lse[((long long)b * Hq + h) * Nq + q0 + r] = la > 0.f ? m[a] + logf(la) : NEG_INF;
    }
}
"""


def supported(q, v, layout):
    """Whether this kernel takes the call: block layout, float32, ``D == Dv`` in the list, and a
    device with ``cp.async`` (compute capability 8.0) and room for its shared memory."""
    return (hasattr(layout, "mask_index") and q.dtype == np.float32 and q.shape[3] == v.shape[3]
            and q.shape[3] in config.CUDA_SIMT_HEAD_DIMS and fits(shared_bytes(q.shape[3])))


def shared_bytes(hd):
    """Dynamic shared memory of the forward kernel: Q (then P), K and V tiles of 64 padded rows."""
    return 3 * 64 * (hd + 4) * 4


def fits(*smem):
    """Whether the current device runs ``cp.async`` (compute capability >= 8.0) and gives each of
    these shared-memory sizes (bytes, plus 1 KiB of static arrays) to a block."""
    from ._device import device_limits

    cc, optin = device_limits()
    return cc >= 80 and all(b + 1024 <= optin for b in smem)


@functools.lru_cache(maxsize=None)
def _kernel(hd):
    import cupy as cp

    fn = cp.RawModule(code=_PRELUDE + _FORWARD, options=("-std=c++17", f"-DHD={hd}")).get_function("bsr_fwd_f32")
    smem = shared_bytes(hd)
    fn.max_dynamic_shared_size_bytes = smem
    return fn, smem


def block_forward_f32(q, k, v, dev, lay_heads, block_size, scale, out, lse):
    """Launch on CuPy arrays (float32, C-contiguous); ``dev`` the layout's device arrays."""
    B, Hq, Nq, D = q.shape
    Bk, Hkv, Nk, _ = k.shape
    bq, bk = block_size
    tiles = -(-bq // 64)
    nbq = -(-Nq // bq)
    if B == 0 or Hq == 0 or nbq == 0:
        return
    kern, smem = _kernel(int(D))
    kern((nbq * tiles, Hq, B), (256,), (
        q, k, v, dev["indptr"], dev["indices"], dev["mask_index"], dev["masks"],
        np.int32(Hq), np.int32(Nq), np.int32(Hkv), np.int32(Nk), np.int32(Bk),
        np.int32(lay_heads), np.int32(bq), np.int32(bk), np.int32(tiles),
        np.float32(scale), out, lse), shared_mem=smem)
