"""Tensor-core (``mma.sync``) block-CSR forward kernel, compiled by CuPy (NVRTC), for float16,
bfloat16 and (opt-in) float32 on TF32 tensor cores: one kernel source, the element type chosen
at compile time (``-DELEM``).

One thread block of ``NW`` warps takes a tile of ``16 * NW`` query rows of one (batch, head);
each warp owns 16 rows and keeps their scores, softmax state and output accumulator in registers
(FlashAttention-2 style). The Q tile sits in shared memory and its fragments are re-read with
``ldmatrix`` (``config.CUDA_TC_Q_IN_SMEM``; 168 registers, 3 blocks per SM on the H200), or is
kept in registers (226 registers, 2 blocks per SM). Key/value tiles of 64 keys are copied into shared memory
with ``cp.async`` (the next K tile streams in while the current tile's softmax and P V run),
stored with an XOR swizzle so that ``ldmatrix`` reads them without bank conflicts. Scores and the
output accumulate in float32 (``mma.m16n8k16.f32.f16.f16.f32``); the probabilities are rounded
to float16 only as the A operand of P V, exactly as FlashAttention does. bfloat16 is the same code
with ``mma.m16n8k16.f32.bf16.bf16.f32`` (its wider exponent, 8 bits of mantissa instead of 11).

TF32 (float32 inputs, ``sparseattn.use_tf32()``): ``mma.m16n8k8.f32.tf32.tf32.f32`` on padded
float tiles (no ``ldmatrix`` for 32-bit transposes; the row padding makes the fragment reads free of
bank conflicts), each K/V tile rounded in shared memory once with ``cvt.rna.tf32.f32`` after it
lands, Q once, P in registers; Q always sits in (dynamic, 103 KiB at D=128) shared memory, 2 blocks
per SM. Operands keep 10 mantissa bits; sums stay float32.

The layout is walked as in the Numba kernel: a layout query block of ``bq`` rows is split into
``ceil(bq / (16 * NW))`` tiles, every key block into ``ceil(bk / 64)`` key tiles; edges and the
element masks of partial blocks are applied to the scores, full blocks read no mask.

Requirements (checked by :func:`supported`): ``D == Dv`` in ``config.CUDA_TC_HEAD_DIMS``.
"""

from __future__ import annotations

import functools
import math
import os

import numpy as np

from ... import _bfloat16, config
from ._device import device_limits

_SOURCE = r"""
// ELEM: 0 float16, 1 bfloat16 (16-bit storage, ldmatrix + m16n8k16), 2 float32 on TF32 tensor
// cores (m16n8k8; operands rounded once with cvt.rna.tf32.f32). No header: types and conversions
// are plain integers and PTX, so NVRTC needs no include path for them.
#if ELEM == 2
#define TF32 1
typedef float elem_t;
#define EPC 4                  // elements per 16-byte chunk
#define KS (HD + 8)            // row stride (floats) of the Q and K tiles: float2 fragment reads hit 32 banks
#define VS (HD + 4)            // of the V tile: the two scalar reads of a B fragment hit 32 banks
#else
#define TF32 0
typedef unsigned short elem_t;
#define EPC 8
#if ELEM == 1
#define MMA_AB "bf16"
#define CVT_X2 "cvt.rn.bf16x2.f32"
#else
#define MMA_AB "f16"
#define CVT_X2 "cvt.rn.f16x2.f32"
#endif
#endif

#define BQ (NW * 16)
#define BK 64
#define CH (HD / EPC)
#define NEG_INF (-__int_as_float(0x7f800000))  // NVRTC has no math.h INFINITY

__device__ __forceinline__ unsigned smem_u32(const void* p) {
    return static_cast<unsigned>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void cp_async16(unsigned dst, const void* src, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" :: "r"(dst), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_wait1() { asm volatile("cp.async.wait_group 1;\n" ::); }
#if TF32
__device__ __forceinline__ void mma1688(float* c, const unsigned* a, unsigned b0, unsigned b1) {
    asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ unsigned tf32_bits(float x) {
    unsigned r;
    asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
    return r;
}
// round a [rows][stride] float tile in shared memory to TF32 in place, once, after it has landed
// (each K/V element is then read by every warp without a conversion per read)
template <int ROWS, int STRIDE>
__device__ __forceinline__ void tf32_tile(float* t, int tid) {
    #pragma unroll 4
    for (int e = tid; e < ROWS * (HD / 4); e += NW * 32) {
        float4* p = reinterpret_cast<float4*>(t + (e / (HD / 4)) * STRIDE + (e % (HD / 4)) * 4);
        float4 x = *p;
        x.x = __uint_as_float(tf32_bits(x.x)); x.y = __uint_as_float(tf32_bits(x.y));
        x.z = __uint_as_float(tf32_bits(x.z)); x.w = __uint_as_float(tf32_bits(x.w));
        *p = x;
    }
}
__device__ __forceinline__ int koff(int r, int c) { return r * KS + c * EPC; }  // Q and K tiles
__device__ __forceinline__ int voff(int r, int c) { return r * VS + c * EPC; }
__device__ __forceinline__ void store2(float* p, float a, float b) {
    *reinterpret_cast<float2*>(p) = make_float2(a, b);
}
#else
__device__ __forceinline__ void ldsm_x4(unsigned addr, unsigned& r0, unsigned& r1, unsigned& r2, unsigned& r3) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_t(unsigned addr, unsigned& r0, unsigned& r1, unsigned& r2, unsigned& r3) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(addr));
}
__device__ __forceinline__ void mma16816(float* c, const unsigned* a, unsigned b0, unsigned b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." MMA_AB "." MMA_AB ".f32 "
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
// two floats rounded (to nearest even) into one register, lo in the low half as mma expects
__device__ __forceinline__ unsigned pack2(float lo, float hi) {
    unsigned r;
    asm(CVT_X2 " %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
// offset (in elements) of 16-byte chunk c of row r in a [rows][HD] tile, XOR-swizzled
__device__ __forceinline__ int swz(int r, int c) { return r * HD + ((c ^ (r & 7)) << 3); }
__device__ __forceinline__ int koff(int r, int c) { return swz(r, c); }
__device__ __forceinline__ int voff(int r, int c) { return swz(r, c); }
__device__ __forceinline__ void store2(elem_t* p, float a, float b) {
    *reinterpret_cast<unsigned*>(p) = pack2(a, b);
}
#endif

struct Chunk { int k0, nk, kb0, mi; };

__device__ __forceinline__ Chunk chunk_of(long long t, long long pstart, int cpb,
                                          const int* indices, const int* mask_index, int bk, int Nk) {
    long long p = pstart + t / cpb;
    int sub = (int)(t % cpb);
    Chunk c;
    c.kb0 = indices[p] * bk;
    c.k0 = c.kb0 + sub * BK;
    c.nk = min(BK, min(c.kb0 + bk, Nk) - c.k0);
    c.mi = mask_index[p];
    return c;
}

template <bool V>
__device__ __forceinline__ void load_tile(elem_t* dst, const elem_t* base, int k0, int nk, int tid) {
    #pragma unroll
    for (int e = tid; e < BK * CH; e += NW * 32) {
        int r = e / CH, c = e % CH;
        bool ok = r < nk;
        const elem_t* src = base + (long long)(ok ? k0 + r : 0) * HD + c * EPC;
        cp_async16(smem_u32(dst + (V ? voff(r, c) : koff(r, c))), src, ok ? 16 : 0);
    }
}

extern "C" __global__ void __launch_bounds__(NW * 32, MINB)
bsr_fwd(const elem_t* __restrict__ q, const elem_t* __restrict__ k, const elem_t* __restrict__ v,
        const long long* __restrict__ indptr, const int* __restrict__ indices,
        const int* __restrict__ mask_index, const unsigned char* __restrict__ masks,
        int Hq, int Nq, int Hkv, int Nk, int Bk, int lay_heads, int bq, int bk, int tiles,
        float scale_log2, elem_t* __restrict__ out, float* __restrict__ lse)
{
#if TF32
    // padded float tiles (103 KiB at HD = 128, 4 warps): dynamic shared memory
    extern __shared__ __align__(16) float smem_tc[];
    float* ks = smem_tc;
    float* vs = ks + BK * KS;
    float* qs = vs + BK * VS;
#else
    __shared__ __align__(128) elem_t ks[BK * HD];
    __shared__ __align__(128) elem_t vs[BK * HD];
#endif
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, tig = lane & 3;
    const int h = blockIdx.y, b = blockIdx.z;
    const int qb = blockIdx.x / tiles;
    const int qblock0 = qb * bq;
    const int q0 = qblock0 + (blockIdx.x - qb * tiles) * BQ;
    const int qend = min(qblock0 + bq, Nq);
    if (q0 >= qend) return;
    const int nbq = (Nq + bq - 1) / bq;
    const long long row = (long long)(lay_heads > 1 ? h : 0) * nbq + qb;
    const int hk = h / (Hq / Hkv);
    const int bkv = Bk > 1 ? b : 0;
    const elem_t* kbase = k + ((long long)bkv * Hkv + hk) * Nk * HD;
    const elem_t* vbase = v + ((long long)bkv * Hkv + hk) * Nk * HD;
    const long long qrow0 = ((long long)b * Hq + h) * Nq;

    const int ra = q0 + warp * 16 + g, rb = ra + 8;   // this thread's two query rows
#if QSMEM || TF32
    // Q tile in shared memory (A fragments re-read from it): frees 32 registers per thread
#if !TF32
    __shared__ __align__(128) elem_t qs[BQ * HD];
#endif
    for (int e = tid; e < BQ * CH; e += NW * 32) {
        int r = e / CH, c = e % CH;
        bool ok = q0 + r < qend;
        cp_async16(smem_u32(qs + koff(r, c)), q + (qrow0 + (ok ? q0 + r : q0)) * HD + c * EPC, ok ? 16 : 0);
    }
#else
    unsigned qf[HD / 16][4];
    #pragma unroll
    for (int kk = 0; kk < HD / 16; ++kk) {
        int col = kk * 16 + tig * 2;
        qf[kk][0] = ra < qend ? *reinterpret_cast<const unsigned*>(q + (qrow0 + ra) * HD + col) : 0u;
        qf[kk][1] = rb < qend ? *reinterpret_cast<const unsigned*>(q + (qrow0 + rb) * HD + col) : 0u;
        qf[kk][2] = ra < qend ? *reinterpret_cast<const unsigned*>(q + (qrow0 + ra) * HD + col + 8) : 0u;
        qf[kk][3] = rb < qend ? *reinterpret_cast<const unsigned*>(q + (qrow0 + rb) * HD + col + 8) : 0u;
    }
#endif

    float o[HD / 8][4];
    #pragma unroll
    for (int n = 0; n < HD / 8; ++n) { o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f; }
    float ma = NEG_INF, mb = NEG_INF, la = 0.f, lb = 0.f;

    const long long pstart = indptr[row], pend = indptr[row + 1];
    const int cpb = (bk + BK - 1) / BK;
    const long long nchunks = (pend - pstart) * cpb;

    if (nchunks > 0) {
        Chunk c0 = chunk_of(0, pstart, cpb, indices, mask_index, bk, Nk);
        load_tile<false>(ks, kbase, c0.k0, c0.nk, tid);
    }
    cp_commit();
    for (long long t = 0; t < nchunks; ++t) {
        const Chunk cu = chunk_of(t, pstart, cpb, indices, mask_index, bk, Nk);
        load_tile<true>(vs, vbase, cu.k0, cu.nk, tid);
        cp_commit();
        cp_wait1();
        __syncthreads();

        float s[BK / 8][4];
        #pragma unroll
        for (int n = 0; n < BK / 8; ++n) { s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f; }
#if TF32
        if (t == 0) tf32_tile<BQ, KS>(qs, tid);
        tf32_tile<BK, KS>(ks, tid);
        __syncthreads();
        // m16n8k8: the k index of both operands is permuted (k = tig <-> dim 2 tig, k = tig + 4 <->
        // dim 2 tig + 1), which leaves the dot products unchanged and makes each fragment pair one
        // float2 read
        #pragma unroll
        for (int kk = 0; kk < HD / 8; ++kk) {
            const float2 x0 = *reinterpret_cast<const float2*>(qs + (warp * 16 + g) * KS + 8 * kk + 2 * tig);
            const float2 x1 = *reinterpret_cast<const float2*>(qs + (warp * 16 + g + 8) * KS + 8 * kk + 2 * tig);
            const unsigned qa[4] = {__float_as_uint(x0.x), __float_as_uint(x1.x),
                                    __float_as_uint(x0.y), __float_as_uint(x1.y)};
            #pragma unroll
            for (int n = 0; n < BK / 8; ++n) {
                const float2 y = *reinterpret_cast<const float2*>(ks + (8 * n + g) * KS + 8 * kk + 2 * tig);
                mma1688(s[n], qa, __float_as_uint(y.x), __float_as_uint(y.y));
            }
        }
#else
        #pragma unroll
        for (int kk = 0; kk < HD / 16; ++kk) {
#if QSMEM
            unsigned qa[4];
            ldsm_x4(smem_u32(qs + swz(warp * 16 + (lane & 7) + ((lane >> 3) & 1) * 8, 2 * kk + (lane >> 4))),
                    qa[0], qa[1], qa[2], qa[3]);
#else
            const unsigned* qa = qf[kk];
#endif
            #pragma unroll
            for (int n = 0; n < BK / 8; n += 2) {
                unsigned b0, b1, b2, b3;
                int kr = 8 * (n + (lane >> 4)) + (lane & 7);
                int kc = 2 * kk + ((lane >> 3) & 1);
                ldsm_x4(smem_u32(ks + swz(kr, kc)), b0, b1, b2, b3);
                mma16816(s[n], qa, b0, b1);
                mma16816(s[n + 1], qa, b2, b3);
            }
        }
#endif
        __syncthreads();  // every warp is done with ks: stream the next K tile in
        if (t + 1 < nchunks) {
            Chunk cn = chunk_of(t + 1, pstart, cpb, indices, mask_index, bk, Nk);
            load_tile<false>(ks, kbase, cn.k0, cn.nk, tid);
        }
        cp_commit();

        // scale into the log2 domain; clip edges; element mask only on partial blocks
        const bool edge = cu.nk < BK || q0 + BQ > qend;
        if (cu.mi >= 0 || edge) {
            #pragma unroll
            for (int n = 0; n < BK / 8; ++n) {
                #pragma unroll
                for (int e = 0; e < 4; ++e) {
                    int r = e < 2 ? ra : rb;
                    int c = n * 8 + tig * 2 + (e & 1);
                    bool ok = r < qend && c < cu.nk;
                    if (ok && cu.mi >= 0)
                        ok = masks[((long long)cu.mi * bq + (r - qblock0)) * bk + (cu.k0 - cu.kb0 + c)] != 0;
                    s[n][e] = ok ? s[n][e] * scale_log2 : NEG_INF;
                }
            }
        } else {
            #pragma unroll
            for (int n = 0; n < BK / 8; ++n) {
                s[n][0] *= scale_log2; s[n][1] *= scale_log2; s[n][2] *= scale_log2; s[n][3] *= scale_log2;
            }
        }
        float mxa = ma, mxb = mb;
        #pragma unroll
        for (int n = 0; n < BK / 8; ++n) {
            mxa = fmaxf(mxa, fmaxf(s[n][0], s[n][1]));
            mxb = fmaxf(mxb, fmaxf(s[n][2], s[n][3]));
        }
        mxa = fmaxf(mxa, __shfl_xor_sync(0xffffffffu, mxa, 1));
        mxa = fmaxf(mxa, __shfl_xor_sync(0xffffffffu, mxa, 2));
        mxb = fmaxf(mxb, __shfl_xor_sync(0xffffffffu, mxb, 1));
        mxb = fmaxf(mxb, __shfl_xor_sync(0xffffffffu, mxb, 2));
        const float basea = mxa == NEG_INF ? 0.f : mxa;   // a row with nothing allowed yet
        const float baseb = mxb == NEG_INF ? 0.f : mxb;
        const float alpha_a = exp2f(ma - basea), alpha_b = exp2f(mb - baseb);
        ma = mxa; mb = mxb;
        float sa = 0.f, sb = 0.f;
        #pragma unroll
        for (int n = 0; n < BK / 8; ++n) {
            s[n][0] = exp2f(s[n][0] - basea); s[n][1] = exp2f(s[n][1] - basea);
            s[n][2] = exp2f(s[n][2] - baseb); s[n][3] = exp2f(s[n][3] - baseb);
            sa += s[n][0] + s[n][1];
            sb += s[n][2] + s[n][3];
        }
        la = la * alpha_a + sa;
        lb = lb * alpha_b + sb;
        #pragma unroll
        for (int n = 0; n < HD / 8; ++n) {
            o[n][0] *= alpha_a; o[n][1] *= alpha_a; o[n][2] *= alpha_b; o[n][3] *= alpha_b;
        }

        cp_wait1();       // V tile of this step has landed (the next K may still be in flight)
        __syncthreads();
#if TF32
        tf32_tile<BK, VS>(vs, tid);
        __syncthreads();
        // P as the A operand with the same k permutation: keys 2 tig and 2 tig + 1 of each 8 are
        // k = tig and tig + 4, so the score fragment is the A fragment; V rows follow
        #pragma unroll
        for (int kk = 0; kk < BK / 8; ++kk) {
            const unsigned a[4] = {tf32_bits(s[kk][0]), tf32_bits(s[kk][2]),
                                   tf32_bits(s[kk][1]), tf32_bits(s[kk][3])};
            #pragma unroll
            for (int n = 0; n < HD / 8; ++n) {
                const float* vp = vs + (8 * kk + 2 * tig) * VS + 8 * n + g;
                mma1688(o[n], a, __float_as_uint(vp[0]), __float_as_uint(vp[VS]));
            }
        }
#else
        #pragma unroll
        for (int kk = 0; kk < BK / 16; ++kk) {
            unsigned a[4];
            a[0] = pack2(s[2 * kk][0], s[2 * kk][1]);
            a[1] = pack2(s[2 * kk][2], s[2 * kk][3]);
            a[2] = pack2(s[2 * kk + 1][0], s[2 * kk + 1][1]);
            a[3] = pack2(s[2 * kk + 1][2], s[2 * kk + 1][3]);
            #pragma unroll
            for (int n = 0; n < HD / 8; n += 2) {
                unsigned b0, b1, b2, b3;
                int vr = 16 * kk + (lane & 7) + ((lane >> 3) & 1) * 8;
                int vc = n + (lane >> 4);
                ldsm_x4_t(smem_u32(vs + swz(vr, vc)), b0, b1, b2, b3);
                mma16816(o[n], a, b0, b1);
                mma16816(o[n + 1], a, b2, b3);
            }
        }
#endif
        __syncthreads();  // every warp is done with vs before the next V tile lands
    }

    la += __shfl_xor_sync(0xffffffffu, la, 1);
    la += __shfl_xor_sync(0xffffffffu, la, 2);
    lb += __shfl_xor_sync(0xffffffffu, lb, 1);
    lb += __shfl_xor_sync(0xffffffffu, lb, 2);
    const float ia = la > 0.f ? 1.f / la : 0.f, ib = lb > 0.f ? 1.f / lb : 0.f;
    #pragma unroll
    for (int n = 0; n < HD / 8; ++n) {
        int col = n * 8 + tig * 2;
        if (ra < qend) store2(out + (qrow0 + ra) * HD + col, o[n][0] * ia, o[n][1] * ia);
        if (rb < qend) store2(out + (qrow0 + rb) * HD + col, o[n][2] * ib, o[n][3] * ib);
    }
    if (tig == 0) {
        const float ln2 = 0.6931471805599453f;
        if (ra < qend) lse[qrow0 + ra] = la > 0.f ? (ma + log2f(la)) * ln2 : NEG_INF;
        if (rb < qend) lse[qrow0 + rb] = lb > 0.f ? (mb + log2f(lb)) * ln2 : NEG_INF;
    }
}
"""

def supported(q, v, layout):
    """Whether the tensor-core kernel takes these operands on this GPU (else the exact float32
    path runs): a block layout, ``D == Dv`` in ``config.CUDA_TC_HEAD_DIMS``, a GPU of compute
    capability 8.0 or newer (``mma`` on bf16/tf32, ``cp.async``) and, for TF32, enough opt-in
    shared memory per block (sm_86/sm_89 have 99 KiB, less than D=128 with 4 warps asks)."""
    if not (hasattr(layout, "mask_index") and q.shape[3] == v.shape[3]
            and q.shape[3] in config.CUDA_TC_HEAD_DIMS):
        return False
    cc, smem_optin = device_limits()
    if cc < 80:
        return False
    if q.dtype == np.float32:
        return _tf32_smem(int(q.shape[3]), _warps(layout.block_size[0])) <= smem_optin
    return True


def _warps(bq):
    """Warps per block: the largest configured tile height that divides the layout's ``bq``."""
    for nw in config.CUDA_TC_WARPS:
        if bq % (16 * nw) == 0:
            return nw
    return config.CUDA_TC_WARPS[-1]


def _elem(dtype):
    """The kernel's ``ELEM``: 0 float16, 1 bfloat16, 2 float32 (TF32 tensor cores)."""
    if dtype == np.float16:
        return 0
    if _bfloat16.is_bfloat16(dtype):
        return 1
    if dtype == np.float32:
        return 2
    raise TypeError(f"the tensor-core kernel takes float16, bfloat16 or float32 (TF32), got {dtype}")


def _tf32_smem(hd, nw):
    """Dynamic shared memory of the TF32 kernel: K and Q tiles padded by 8 floats a row, V by 4."""
    return 4 * (64 * (hd + 8) + 64 * (hd + 4) + 16 * nw * (hd + 8))


@functools.lru_cache(maxsize=None)
def _kernel(hd, nw, minb, qsmem, elem=0):
    import cupy as cp

    options = ["-std=c++17", "--use_fast_math", f"-DHD={hd}", f"-DNW={nw}", f"-DMINB={minb}",
               f"-DQSMEM={int(bool(qsmem))}", f"-DELEM={elem}"]
    if os.path.isdir("/usr/local/cuda/include"):
        options.append("-I/usr/local/cuda/include")
    fn = cp.RawModule(code=_SOURCE, options=tuple(options)).get_function("bsr_fwd")
    if elem == 2:
        fn.max_dynamic_shared_size_bytes = _tf32_smem(hd, nw)
    return fn


def block_forward(q, k, v, dev, lay_heads, block_size, scale, out, lse, warps=None, minb=None,
                  qsmem=None):
    """Launch the tensor-core kernel on CuPy arrays of one dtype: float16, bfloat16, or float32
    (TF32: the caller has opted in); ``out`` in that dtype, ``lse`` float32.

    Parameters
    ----------
    q, k, v : cupy.ndarray, C-contiguous ``(B, Hq, Nq, D)``, ``(Bk, Hkv, Nk, D)``,
        ``(Bk, Hkv, Nk, D)``; 16-byte aligned.
    dev : dict
        The layout's device arrays (see :func:`~sparseattn.backends.cuda._device.device_layout`).
    lay_heads : int
    block_size : tuple of int
    scale : float
    out, lse : cupy.ndarray to fill.
    warps, minb : int, optional
        Override ``config.CUDA_TC_WARPS`` choice and the ``__launch_bounds__`` blocks per SM
        (TF32: at most 2, its shared memory allows no more).
    qsmem : bool, optional
        Keep Q in shared memory instead of registers (``config.CUDA_TC_Q_IN_SMEM``; TF32 always).
    """
    B, Hq, Nq, D = q.shape
    Bk, Hkv, Nk, _ = k.shape
    bq, bk = block_size
    elem = _elem(q.dtype)
    nw = int(warps or _warps(bq))
    tiles = -(-bq // (16 * nw))
    nbq = -(-Nq // bq)
    if B == 0 or Hq == 0 or nbq == 0:
        return
    minb = int(minb or config.CUDA_TC_MIN_BLOCKS)
    if elem == 2:
        qsmem, minb, smem = True, min(minb, 2), _tf32_smem(int(D), nw)
    else:
        qsmem = (config.CUDA_TC_Q_IN_SMEM if qsmem is None else qsmem) and nw <= 4  # 48 KiB static
        smem = 0
    kern = _kernel(int(D), nw, minb, bool(qsmem), elem)
    if elem == 1:  # the kernel sees 16-bit patterns; CuPy need not know bfloat16 to pass them
        q, k, v, out = (x.view(np.uint16) for x in (q, k, v, out))
    kern((nbq * tiles, Hq, B), (32 * nw,), (
        q, k, v, dev["indptr"], dev["indices"], dev["mask_index"], dev["masks"],
        np.int32(Hq), np.int32(Nq), np.int32(Hkv), np.int32(Nk), np.int32(Bk),
        np.int32(lay_heads), np.int32(bq), np.int32(bk), np.int32(tiles),
        np.float32(scale / math.log(2.0)), out, lse), shared_mem=smem)


#: The float16 entry point's old name (benchmarks and tests call it); any tensor-core dtype.
block_forward_f16 = block_forward
