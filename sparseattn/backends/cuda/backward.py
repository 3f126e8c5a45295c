"""Backward kernels of the CUDA backend in Numba-CUDA (float32 and float64), without atomics.

With ``P = exp(scale * q.k - lse)`` recomputed from the forward pass's log-sum-exp and
``delta_i = dout_i . out_i``:

* :func:`dq_backward`, query-major over the token-level CSR layout: one thread block per (batch,
  head, query); its threads take one key each per step, recompute ``p`` and
  ``ds = p * (dout_i . v_j - delta_i)`` and then own ``D / threads`` columns of
  ``dq_i = scale * sum_j ds_ij k_j``.
* :func:`dkdv_backward`, key-major over the *transposed* layout (``layout.transpose()``, row
  ``h * Nk + j`` lists the queries that see key ``j``): one thread block per (kv batch, kv head,
  key) accumulates ``dv_j = sum p_ij dout_i`` and ``dk_j = scale * sum ds_ij q_i`` over every
  query head of its GQA group and, when k/v were broadcast, over the batch. Each output element
  has exactly one writer, so no atomics and deterministic sums.

Like the forward kernels they use no warp shuffles and run under the CUDA simulator.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from numba import cuda, float32, float64, int64

from ... import config

_NB_TYPES = {np.dtype(np.float32): float32, np.dtype(np.float64): float64}


@functools.lru_cache(maxsize=None)
def _dq_kernel(dtype_name, nt, dp, maxd):
    DT = _NB_TYPES[np.dtype(dtype_name)]
    NT, MAXD = nt, maxd

    @cuda.jit
    def kernel(q, k, v, dout, lse, delta, indptr, indices, lay_heads, scale, dq):
        qs = cuda.shared.array(MAXD, DT)
        dos = cuda.shared.array(MAXD, DT)
        ps = cuda.shared.array(NT, DT)
        js = cuda.shared.array(NT, int64)
        acc = cuda.local.array(dp, DT)
        Nq = q.shape[2]
        D = q.shape[3]
        Dv = v.shape[3]
        tid = cuda.threadIdx.x
        i = cuda.blockIdx.x
        h = cuda.blockIdx.y
        b = cuda.blockIdx.z
        hk = h // (q.shape[1] // k.shape[1])
        bkv = b if k.shape[0] > 1 else 0
        row = (h if lay_heads > 1 else 0) * Nq + i
        zero = DT(0.0)
        for d in range(tid, D, NT):
            qs[d] = q[b, h, i, d]
        for d in range(tid, Dv, NT):
            dos[d] = dout[b, h, i, d]
        for c in range(dp):
            acc[c] = zero
        li = lse[b, h, i]
        di = delta[b, h, i]
        start = indptr[row]
        end = indptr[row + 1]
        cuda.syncthreads()
        for p0 in range(start, end, NT):
            n = min(NT, end - p0)
            if tid < n:
                j = indices[p0 + tid]
                js[tid] = j
                s = zero
                for d in range(D):
                    s += qs[d] * k[bkv, hk, j, d]
                dpv = zero
                for d in range(Dv):
                    dpv += dos[d] * v[bkv, hk, j, d]
                ps[tid] = math.exp(s * scale - li) * (dpv - di)
            cuda.syncthreads()
            for t in range(n):
                ds = ps[t]
                j = js[t]
                for c in range(dp):
                    d = tid + NT * c
                    if d < D:
                        acc[c] += ds * k[bkv, hk, j, d]
            cuda.syncthreads()
        for c in range(dp):
            d = tid + NT * c
            if d < D:
                dq[b, h, i, d] = acc[c] * scale

    return kernel


@functools.lru_cache(maxsize=None)
def _dkdv_kernel(dtype_name, nt, dp, dvp, maxd):
    DT = _NB_TYPES[np.dtype(dtype_name)]
    NT, MAXD = nt, maxd

    @cuda.jit
    def kernel(q, k, v, dout, lse, delta, tindptr, tindices, lay_heads, scale, dk, dv):
        ks = cuda.shared.array(MAXD, DT)
        vs = cuda.shared.array(MAXD, DT)
        ps = cuda.shared.array(NT, DT)
        dss = cuda.shared.array(NT, DT)
        iis = cuda.shared.array(NT, int64)
        acck = cuda.local.array(dp, DT)
        accv = cuda.local.array(dvp, DT)
        B = q.shape[0]
        Hq = q.shape[1]
        D = q.shape[3]
        Nk = k.shape[2]
        Dv = v.shape[3]
        tid = cuda.threadIdx.x
        j = cuda.blockIdx.x
        hk = cuda.blockIdx.y
        bkv = cuda.blockIdx.z
        group = Hq // k.shape[1]
        zero = DT(0.0)
        for d in range(tid, D, NT):
            ks[d] = k[bkv, hk, j, d]
        for d in range(tid, Dv, NT):
            vs[d] = v[bkv, hk, j, d]
        for c in range(dp):
            acck[c] = zero
        for c in range(dvp):
            accv[c] = zero
        cuda.syncthreads()
        b_lo = bkv
        b_hi = bkv + 1
        if k.shape[0] == 1:  # k/v broadcast over the batch: their gradient sums over it
            b_lo = 0
            b_hi = B
        for b in range(b_lo, b_hi):
            for h in range(hk * group, hk * group + group):
                row = (h if lay_heads > 1 else 0) * Nk + j
                start = tindptr[row]
                end = tindptr[row + 1]
                for p0 in range(start, end, NT):
                    n = min(NT, end - p0)
                    if tid < n:
                        i = tindices[p0 + tid]
                        iis[tid] = i
                        s = zero
                        for d in range(D):
                            s += q[b, h, i, d] * ks[d]
                        dpv = zero
                        for d in range(Dv):
                            dpv += dout[b, h, i, d] * vs[d]
                        p = math.exp(s * scale - lse[b, h, i])
                        ps[tid] = p
                        dss[tid] = p * (dpv - delta[b, h, i])
                    cuda.syncthreads()
                    for t in range(n):
                        i = iis[t]
                        p = ps[t]
                        ds = dss[t]
                        for c in range(dvp):
                            d = tid + NT * c
                            if d < Dv:
                                accv[c] += p * dout[b, h, i, d]
                        for c in range(dp):
                            d = tid + NT * c
                            if d < D:
                                acck[c] += ds * q[b, h, i, d]
                    cuda.syncthreads()
        for c in range(dp):
            d = tid + NT * c
            if d < D:
                dk[bkv, hk, j, d] = acck[c] * scale
        for c in range(dvp):
            d = tid + NT * c
            if d < Dv:
                dv[bkv, hk, j, d] = accv[c]

    return kernel


def _check_dims(q, v):
    if max(q.shape[3], v.shape[3]) > config.CUDA_CSR_MAX_D:
        raise ValueError(f"head dimensions {q.shape[3]}, {v.shape[3]} are too large for the CUDA "
                         f"backward kernels (at most config.CUDA_CSR_MAX_D = {config.CUDA_CSR_MAX_D})")


def dq_backward(q, k, v, dout, lse, delta, indptr, indices, lay_heads, scale, dq, stream=0,
                threads=None):
    """Launch the query-major dq kernel over a token-level CSR layout (device arrays; ``delta``
    is ``(dout * out).sum(-1)``, shaped like ``lse``)."""
    _check_dims(q, v)
    nt = int(threads or config.CUDA_CSR_THREADS)
    B, Hq, Nq, D = q.shape
    if B == 0 or Hq == 0 or Nq == 0:
        return
    kern = _dq_kernel(np.dtype(q.dtype).name, nt, -(-D // nt), config.CUDA_CSR_MAX_D)
    kern[(Nq, Hq, B), nt, stream](q, k, v, dout, lse, delta, indptr, indices, np.int64(lay_heads),
                                  np.dtype(q.dtype).type(scale), dq)


def dkdv_backward(q, k, v, dout, lse, delta, tindptr, tindices, lay_heads, scale, dk, dv, stream=0,
                  threads=None):
    """Launch the key-major dk/dv kernel over the transposed token-level layout."""
    _check_dims(q, v)
    nt = int(threads or config.CUDA_CSR_THREADS)
    Bk, Hkv, Nk, D = k.shape
    if Bk == 0 or Hkv == 0 or Nk == 0:
        return
    kern = _dkdv_kernel(np.dtype(q.dtype).name, nt, -(-D // nt), -(-v.shape[3] // nt),
                        config.CUDA_CSR_MAX_D)
    kern[(Nk, Hkv, Bk), nt, stream](q, k, v, dout, lse, delta, tindptr, tindices,
                                    np.int64(lay_heads), np.dtype(q.dtype).type(scale), dk, dv)
