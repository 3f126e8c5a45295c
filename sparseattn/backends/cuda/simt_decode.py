"""Fast float32 split-K decode kernel on the CUDA cores (exact float32), via CuPy.

The partial pass of :func:`.decode.decode` written for bandwidth: one query per head against the
first ``n`` keys of the cache is a matrix-vector product per head, so what counts is how many
bytes of K and V are in flight. Each key row is read by ``D / 4`` lanes of a warp, one ``float4``
each (coalesced 16-byte loads, two keys per iteration in flight per warp, through the read-only
cache), scored against every query head of the block's GQA group with a warp-shuffle reduction,
and folded into per-lane online-softmax states; at the end the block merges its warps' states in
shared memory and writes ``(m, l, acc)`` partials, which a second kernel combines across splits
(the same NaN rules as :mod:`.decode`: a NaN or +inf score makes its head's row NaN). Everything
is launched from CuPy: a decode step costs two kernel launches and two small allocations.

Taken for float32 caches with ``D == Dv`` in ``config.CUDA_SIMT_HEAD_DIMS`` whose rows are
16-byte aligned; otherwise the Numba kernel runs.
"""

from __future__ import annotations

import functools

import numpy as np

from ... import config

_SOURCE = r"""
#define NT 256
#define NW (NT / 32)
#define LPK (HD / 4)      // lanes per key row: one float4 each
#define KPW (32 / LPK)    // key rows per warp per step
#define NS (NW * KPW)     // online-softmax states per query head in a block
#define U 2               // steps whose loads are issued before any is used
#define NEG_INF (-__int_as_float(0x7f800000))

extern "C" __global__ void __launch_bounds__(NT)
decode_partial_f32(const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
                   long long k_head, long long k_row, long long v_head, long long v_row,
                   int n, float scale, int span, int group, int chunks, int n_split,
                   float* __restrict__ m_part, float* __restrict__ l_part, float* __restrict__ acc_part)
{
    __shared__ float sm_m[G][NS], sm_l[G][NS];
    __shared__ __align__(16) float sm_acc[G][NS][HD];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int sub = lane / LPK, sl = lane - (lane / LPK) * LPK;
    const int sp = blockIdx.y;
    const int hk = blockIdx.x / chunks;
    const int g0 = (blockIdx.x - hk * chunks) * G;
    const int gn = min(G, group - g0);  // query heads of this block (uniform over the block)
    const int h0 = hk * group + g0;
    float4 qv[G], acc[G];
    float m[G], l[G];
    #pragma unroll
    for (int g = 0; g < G; ++g) {
        qv[g] = make_float4(0.f, 0.f, 0.f, 0.f);
        if (g < gn) {
            const float4 x = *reinterpret_cast<const float4*>(q + (long long)(h0 + g) * HD + sl * 4);
            qv[g] = make_float4(x.x * scale, x.y * scale, x.z * scale, x.w * scale);
        }
        acc[g] = make_float4(0.f, 0.f, 0.f, 0.f);
        m[g] = NEG_INF;
        l[g] = 0.f;
    }
    const float* kb = k + hk * k_head + sl * 4;
    const float* vb = v + hk * v_head + sl * 4;
    const int j0 = sp * span, j1 = min(n, j0 + span);
    // the loop bound is the warp's (its lanes reduce together); a lane's own row may be past j1
    for (int jw = j0 + warp * KPW; jw < j1; jw += U * NS) {
        const int jb = jw + sub;
        float4 kv[U], vv[U];
        #pragma unroll
        for (int u = 0; u < U; ++u) {  // all loads first: U rows of K and V in flight per lane
            const int j = jb + u * NS;
            kv[u] = make_float4(0.f, 0.f, 0.f, 0.f);
            vv[u] = kv[u];
            if (j < j1) {
                kv[u] = __ldg(reinterpret_cast<const float4*>(kb + j * k_row));
                vv[u] = __ldg(reinterpret_cast<const float4*>(vb + j * v_row));
            }
        }
        #pragma unroll
        for (int u = 0; u < U; ++u) {
            const bool ok = jb + u * NS < j1;
            #pragma unroll
            for (int g = 0; g < G; ++g) {
                if (g >= gn) break;
                float s = qv[g].x * kv[u].x + qv[g].y * kv[u].y + qv[g].z * kv[u].z + qv[g].w * kv[u].w;
                #pragma unroll
                for (int off = LPK / 2; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
                if (ok && s != NEG_INF) {  // NaN goes on: it makes l NaN, and the row NaN
                    if (s > m[g]) {
                        const float alpha = expf(m[g] - s);  // 0 for the first key
                        l[g] *= alpha;
                        acc[g].x *= alpha; acc[g].y *= alpha; acc[g].z *= alpha; acc[g].w *= alpha;
                        m[g] = s;
                    }
                    const float e = expf(s - m[g]);
                    l[g] += e;
                    acc[g].x = fmaf(e, vv[u].x, acc[g].x);
                    acc[g].y = fmaf(e, vv[u].y, acc[g].y);
                    acc[g].z = fmaf(e, vv[u].z, acc[g].z);
                    acc[g].w = fmaf(e, vv[u].w, acc[g].w);
                }
            }
        }
    }
    // merge the block's NS states per query head
    const int st = warp * KPW + sub;
    #pragma unroll
    for (int g = 0; g < G; ++g) {
        if (g >= gn) break;
        if (sl == 0) { sm_m[g][st] = m[g]; sm_l[g][st] = l[g]; }
        *reinterpret_cast<float4*>(&sm_acc[g][st][sl * 4]) = acc[g];
    }
    __syncthreads();
    for (int e = tid; e < gn * HD; e += NT) {
        const int g = e / HD, d = e - (e / HD) * HD;
        float mx = NEG_INF;
        bool bad = false;
        for (int t = 0; t < NS; ++t) {
            const float mt = sm_m[g][t], lt = sm_l[g][t];
            if (mt != mt || lt != lt) bad = true;
            else if (lt > 0.f && mt > mx) mx = mt;
        }
        float tot = 0.f, o = 0.f;
        if (bad) {
            tot = __int_as_float(0x7fc00000);
            o = tot;
        } else if (mx != NEG_INF) {
            for (int t = 0; t < NS; ++t) {
                const float lt = sm_l[g][t];
                if (lt > 0.f) {
                    const float w = expf(sm_m[g][t] - mx);
                    tot += w * lt;
                    o = fmaf(w, sm_acc[g][t][d], o);
                }
            }
        }
        const long long part = (long long)(h0 + g) * n_split + sp;
        acc_part[part * HD + d] = o;
        if (d == 0) {
            m_part[part] = bad ? tot : mx;
            l_part[part] = tot;
        }
    }
}

extern "C" __global__ void decode_merge_f32(const float* __restrict__ m_part, const float* __restrict__ l_part,
                                            const float* __restrict__ acc_part, int n_split,
                                            float* __restrict__ out, float* __restrict__ lse)
{
    const int h = blockIdx.x;
    const float* mp = m_part + (long long)h * n_split;
    const float* lp = l_part + (long long)h * n_split;
    float mx = NEG_INF;
    bool bad = false;
    for (int t = 0; t < n_split; ++t) {
        if (mp[t] != mp[t] || lp[t] != lp[t]) bad = true;  // a split saw a NaN or +inf score
        else if (lp[t] > 0.f && mp[t] > mx) mx = mp[t];
    }
    const float nan = __int_as_float(0x7fc00000);
    float tot = 0.f;
    if (!bad && mx != NEG_INF)
        for (int t = 0; t < n_split; ++t)
            if (lp[t] > 0.f) tot += expf(mp[t] - mx) * lp[t];
    for (int d = threadIdx.x; d < HD; d += blockDim.x) {
        float o = 0.f;
        if (bad) o = nan;
        else if (mx != NEG_INF) {
            for (int t = 0; t < n_split; ++t)
                if (lp[t] > 0.f) o = fmaf(expf(mp[t] - mx), acc_part[((long long)h * n_split + t) * HD + d], o);
            o /= tot;
        }
        out[(long long)h * HD + d] = o;
    }
    if (threadIdx.x == 0) lse[h] = bad ? nan : (mx != NEG_INF ? mx + logf(tot) : NEG_INF);
}
"""


def supported(q, k, v):
    """Whether the fast kernel takes a decode step: float32, ``D == Dv`` in
    ``config.CUDA_SIMT_HEAD_DIMS``, unit stride along the head dimension, 16-byte aligned rows
    (CuPy arrays ``(Hq, D)``, ``(Hkv, C, D)``, ``(Hkv, C, Dv)``)."""
    if not (q.dtype == k.dtype == v.dtype == np.float32 and q.shape[1] == k.shape[2] == v.shape[2]
            and q.shape[1] in config.CUDA_SIMT_HEAD_DIMS):
        return False
    if not q.flags.c_contiguous or k.strides[2] != 4 or v.strides[2] != 4:
        return False
    return all(x.data.ptr % 16 == 0 and all(s % 16 == 0 for s in x.strides[:-1]) for x in (q, k, v))


@functools.lru_cache(maxsize=None)
def _kernels(hd, heads_per_block):
    import cupy as cp

    mod = cp.RawModule(code=_SOURCE, options=("-std=c++17", f"-DHD={hd}", f"-DG={heads_per_block}"))
    return mod.get_function("decode_partial_f32"), mod.get_function("decode_merge_f32")


def decode(q, k, v, n, scale, workspace, sms):
    """Attend ``q`` ``(Hq, D)`` to the first ``n`` rows of ``k``/``v`` ``(Hkv, C, D)`` (CuPy
    float32 arrays that :func:`supported` accepts).

    Parameters
    ----------
    q, k, v : cupy.ndarray
    n : int
        Positions read, ``0 <= n <= C``.
    scale : float
    workspace : dict
        Scratch kept across calls: the partial buffers, while the shapes and stream stay.
    sms : int
        Streaming multiprocessors of the device (decides the key split).

    Returns
    -------
    out : cupy.ndarray, shape (Hq, D)
    lse : cupy.ndarray, shape (Hq,)
    """
    import cupy as cp

    from .decode import splits

    Hq, D = q.shape
    Hkv = k.shape[0]
    if n == 0:  # nothing cached: zeros, lse = -inf, as every backend
        return cp.zeros((Hq, D), np.float32), cp.full((Hq,), -np.inf, np.float32)
    group = Hq // Hkv
    # at most 8: the block's merge buffer (heads x states x D floats) is static shared memory
    heads = max(1, min(group, config.CUDA_DECODE_HEADS_PER_BLOCK, 8))
    chunks = -(-group // heads)
    n_split = splits(Hkv * chunks, n, sms, config.CUDA_DECODE_FAST_BLOCKS_PER_SM)
    span = -(-n // n_split)
    n_split = -(-n // span)  # no empty split
    # keyed by stream too: a merge queued on another stream could still be reading the buffers
    key = (Hq, D, n_split, cp.cuda.get_current_stream().ptr)
    parts = workspace.get("cuda_fast_decode")
    if parts is None or parts[0] != key:
        parts = (key, cp.empty((Hq, n_split), np.float32), cp.empty((Hq, n_split), np.float32),
                 cp.empty((Hq, n_split, D), np.float32))
        workspace["cuda_fast_decode"] = parts
    _, m_part, l_part, acc_part = parts
    out = cp.empty((Hq, D), np.float32)
    lse = cp.empty((Hq,), np.float32)
    partial, merge = _kernels(int(D), int(heads))
    item = 4
    partial((Hkv * chunks, n_split), (256,), (
        q, k, v, np.int64(k.strides[0] // item), np.int64(k.strides[1] // item),
        np.int64(v.strides[0] // item), np.int64(v.strides[1] // item), np.int32(n),
        np.float32(scale), np.int32(span), np.int32(group), np.int32(chunks), np.int32(n_split),
        m_part, l_part, acc_part))
    merge((Hq,), (min(128, D),), (m_part, l_part, acc_part, np.int32(n_split), out, lse))
    return out, lse
