"""Forward kernels of the CUDA backend in Numba-CUDA (float32 and float64).

* :func:`block_forward`: block-CSR. One thread block per (batch, head, query tile of ``TQ`` rows);
  a layout query block of ``bq`` rows is split into ``ceil(bq / TQ)`` tiles and every key block of
  ``bk`` columns into ``ceil(bk / TK)`` key tiles. Q and K are staged in shared memory in chunks
  of ``DC`` head dimensions (K transposed, rows padded by one word against bank conflicts), each
  thread computes an ``RY x RX`` register tile of the scores, keeps an online (flash-style)
  softmax per row and an ``RY x DVP`` register tile of the output, and V is staged ``VK`` keys at
  a time. Full blocks never read an element mask.
* :func:`csr_forward`: token-level CSR with scattered keys. One thread block per (batch, head,
  query); its threads take one key each per step, share the scores through shared memory and
  then own ``Dv / threads`` output columns, reading V rows coalesced.

No warp shuffles: the kernels also run under Numba's CUDA simulator
(``NUMBA_ENABLE_CUDASIM=1``), which CI uses without a GPU. Row reductions go through shared
memory instead; the row sums of the softmax are only reduced once, at the end.

Kernels are built per (dtype, tile geometry) by small factories, so that every shared and local
array has a compile-time size, and cached. Kernels trust their inputs: the API validated shapes and
the layout its indices.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from numba import cuda, float32, float64, int64, uint64

from ... import config

_NB_TYPES = {np.dtype(np.float32): float32, np.dtype(np.float64): float64}


def _unsigned():
    """Cast to an unsigned index inside kernels; a no-op under the CUDA simulator, where the cast
    would only cost Python time in the hottest loops."""
    import numba

    if getattr(numba.config, "ENABLE_CUDASIM", 0):
        return int
    return uint64


@cuda.jit(device=True)
def _nan_max(a, b):
    """``max`` that keeps NaN: a row whose scores are all NaN (a NaN in its query) must come out
    NaN, not look like a row without keys."""
    return a if (a >= b or a != a) else b


# ----------------------------------------------------------------------------- geometry


class Geometry(tuple):
    """``(TY, TX, RY, RX, DC)``: thread grid ``TY x TX``, register tile ``RY x RX`` of scores per
    thread (query tile ``TQ = TY * RY``, key tile ``TK = TX * RX``), ``DC`` head dims per Q/K chunk."""

    __slots__ = ()

    def __new__(cls, ty, tx, ry, rx, dc):
        return super().__new__(cls, (int(ty), int(tx), int(ry), int(rx), int(dc)))

    @property
    def tq(self):
        return self[0] * self[2]

    @property
    def tk(self):
        return self[1] * self[3]

    @property
    def threads(self):
        return self[0] * self[1]


def block_geometry(dtype):
    """The tile geometry of :func:`block_forward` for ``dtype`` (from :mod:`sparseattn.config`)."""
    key = "float64" if np.dtype(dtype) == np.float64 else "float32"
    return Geometry(*config.CUDA_TILES[key])


def _v_keys(geom, dvp, itemsize):
    """Keys of V staged at once: the largest power of two <= TK whose tile fits the V budget."""
    vk = geom.tk
    while vk > 1 and vk * dvp * geom[1] * itemsize > config.CUDA_V_TILE_BYTES:
        vk //= 2
    return vk


@functools.lru_cache(maxsize=None)
def _score_tile(dtype_name, geom):
    """Device function ``tile_products(out, buf, x, xb, xh, r0, nr, y, yb, yh, c0, nc, width, mul,
    ta, tb)``: the ``RY x RX`` register tile of ``mul * X Y^T`` over ``width`` dims, for rows
    ``r0 + ty + TY a`` of ``x[xb, xh]`` and columns ``c0 + tx + TX c`` of ``y[yb, yh]`` (``nr``,
    ``nc`` valid; the rest read as 0), staged ``DC`` dims at a time through ``buf`` (the row chunk
    with stride ``DC + 1``, then the transposed column chunk with stride ``TX * RX + 1``).
    Shared by the forward and backward block kernels."""
    DT = _NB_TYPES[np.dtype(dtype_name)]
    TY, TX, RY, RX, DC = geom
    TR, TC, NT = TY * RY, TX * RX, TY * TX
    AS = DC + 1
    CS = TC + 1
    COFF = TR * AS
    RR = RY * RX
    TYAS = TY * AS
    U = _unsigned()

    @cuda.jit(device=True)
    def tile_products(out, buf, x, xb, xh, r0, nr, y, yb, yh, c0, nc, width, mul, ta, tb):
        """out[a, c] = mul * x[xb, xh, r0 + row a] . y[yb, yh, c0 + col c] over ``width`` dims."""
        tid = cuda.threadIdx.x
        ty = tid // TX
        tx = tid - ty * TX
        zero = DT(0.0)
        for e in range(RR):
            out[e] = zero
        arow0 = U(ty * AS)
        ccol0 = U(COFF + tx)
        for d0 in range(0, width, DC):
            dc = min(DC, width - d0)
            for e in range(tid, TR * DC, NT):
                r = e // DC
                d = e - r * DC
                val = zero
                if r < nr and d < dc:
                    val = x[xb, xh, r0 + r, d0 + d] * mul
                buf[r * AS + d] = val
            for e in range(tid, TC * DC, NT):
                j = e // DC
                d = e - j * DC
                val = zero
                if j < nc and d < dc:
                    val = y[yb, yh, c0 + j, d0 + d]
                buf[COFF + d * CS + j] = val
            cuda.syncthreads()
            for d in range(DC):
                for a in range(RY):
                    ta[a] = buf[arow0 + U(a * TYAS + d)]
                for c in range(RX):
                    tb[c] = buf[ccol0 + U(d * CS + TX * c)]
                for a in range(RY):
                    for c in range(RX):
                        out[a * RX + c] += ta[a] * tb[c]
            cuda.syncthreads()

    return tile_products


# ----------------------------------------------------------------------------- block-CSR kernel


@functools.lru_cache(maxsize=None)
def _block_kernel(dtype_name, geom, dvp, vk):
    DT = _NB_TYPES[np.dtype(dtype_name)]
    TY, TX, RY, RX, DC = geom
    TQ, TK, NT = TY * RY, TX * RX, TY * TX
    QS = DC + 1  # padded row stride of the Q chunk
    KS = TK + 1  # padded row stride of the transposed K chunk and of P
    KOFF = TQ * QS
    BUF = max(KOFF + DC * KS, TQ * KS)  # Q/K chunks, later reused for P
    DVPAD = dvp * TX
    VK = vk
    RR = RY * RX
    RD = RY * dvp
    VSZ = VK * DVPAD  # shared/local array sizes must be compile-time constants: precompute them
    REDSZ = TQ * TX
    TYKS = TY * KS
    U = _unsigned()
    tile_products = _score_tile(dtype_name, geom)

    @cuda.jit
    def kernel(q, k, v, indptr, indices, mask_index, masks, lay_heads, bq, bk, tiles, scale,
               out, lse):
        buf = cuda.shared.array(BUF, DT)
        vs = cuda.shared.array(VSZ, DT)
        red = cuda.shared.array(REDSZ, DT)
        rowv = cuda.shared.array(TQ, DT)
        s = cuda.local.array(RR, DT)
        acc = cuda.local.array(RD, DT)
        m = cuda.local.array(RY, DT)
        l = cuda.local.array(RY, DT)
        qa = cuda.local.array(RY, DT)
        kv = cuda.local.array(RX, DT)
        vv = cuda.local.array(dvp, DT)

        Nq = q.shape[2]
        D = q.shape[3]
        Nk = k.shape[2]
        Dv = v.shape[3]
        tid = cuda.threadIdx.x
        ty = tid // TX
        tx = tid - ty * TX
        h = cuda.blockIdx.y
        b = cuda.blockIdx.z
        qb = cuda.blockIdx.x // tiles
        qblock0 = qb * bq
        q0 = qblock0 + (cuda.blockIdx.x - qb * tiles) * TQ
        nq = min(TQ, min(qblock0 + bq, Nq) - q0)
        if nq <= 0:  # the clipped last query block has fewer tiles (uniform over the block)
            return
        nbq = (Nq + bq - 1) // bq
        row = (h if lay_heads > 1 else 0) * nbq + qb
        hk = h // (q.shape[1] // k.shape[1])
        bkv = b if k.shape[0] > 1 else 0
        zero = DT(0.0)
        ninf = DT(-math.inf)
        # unsigned base offsets of this thread's operands in shared memory: indexing with unsigned
        # integers spares the hot loops Numba's negative-index wraparound code
        prow0 = U(ty * KS)
        vcol0 = U(tx)

        for a in range(RY):
            m[a] = ninf
            l[a] = zero
            for c in range(dvp):
                acc[a * dvp + c] = zero

        for p in range(indptr[row], indptr[row + 1]):
            kblock0 = indices[p] * bk
            kend = min(kblock0 + bk, Nk)
            mi = mask_index[p]
            for k0 in range(kblock0, kend, TK):
                nk = min(TK, kend - k0)
                # ---- scores: s = (scale * Q) K^T over DC-wide chunks of the head dimension
                tile_products(s, buf, q, b, h, q0, nq, k, bkv, hk, k0, nk, D, scale, qa, kv)
                # ---- mask (edges always, element masks only on partial blocks); tile row max
                for a in range(RY):
                    r = ty + TY * a
                    mx = ninf
                    for c in range(RX):
                        j = tx + TX * c
                        ok = r < nq and j < nk
                        if ok and mi >= 0:
                            ok = masks[mi, q0 - qblock0 + r, k0 - kblock0 + j] != 0
                        if not ok:
                            s[a * RX + c] = ninf
                        mx = _nan_max(mx, s[a * RX + c])
                    red[r * TX + tx] = mx
                cuda.syncthreads()
                for r in range(tid, TQ, NT):
                    mx = ninf
                    for t in range(TX):
                        mx = _nan_max(mx, red[r * TX + t])
                    rowv[r] = mx
                cuda.syncthreads()
                # ---- online softmax: P = exp(s - m_new) into shared memory, rescale state
                for a in range(RY):
                    r = ty + TY * a
                    mnew = _nan_max(m[a], rowv[r])
                    if mnew == ninf:  # nothing allowed in this row yet: P = 0, state unchanged
                        for c in range(RX):
                            buf[r * KS + tx + TX * c] = zero
                        continue
                    alpha = math.exp(m[a] - mnew)
                    rs = zero
                    for c in range(RX):
                        e = math.exp(s[a * RX + c] - mnew)
                        rs += e
                        buf[r * KS + tx + TX * c] = e
                    l[a] = l[a] * alpha + rs
                    for c in range(dvp):
                        acc[a * dvp + c] *= alpha
                    m[a] = mnew
                # ---- O += P V, VK keys of V at a time
                for v0 in range(0, nk, VK):
                    cuda.syncthreads()  # P written / previous V tile consumed
                    for e in range(tid, VK * DVPAD, NT):
                        j = e // DVPAD
                        d = e - j * DVPAD
                        x = zero
                        if v0 + j < nk and d < Dv:
                            x = v[bkv, hk, k0 + v0 + j, d]
                        vs[e] = x
                    cuda.syncthreads()
                    for j in range(VK):
                        for a in range(RY):
                            qa[a] = buf[prow0 + U(a * TYKS + v0 + j)]
                        for c in range(dvp):
                            vv[c] = vs[vcol0 + U(j * DVPAD + TX * c)]
                        for a in range(RY):
                            for c in range(dvp):
                                acc[a * dvp + c] += qa[a] * vv[c]
                cuda.syncthreads()  # before the next tile overwrites buf

        # ---- row sums (reduced once), normalise, store
        for a in range(RY):
            red[(ty + TY * a) * TX + tx] = l[a]
        cuda.syncthreads()
        for r in range(tid, TQ, NT):
            t_sum = zero
            for t in range(TX):
                t_sum += red[r * TX + t]
            rowv[r] = t_sum
        cuda.syncthreads()
        for a in range(RY):
            r = ty + TY * a
            if r < nq:
                lsum = rowv[r]
                seen = lsum > zero or lsum != lsum  # NaN: the row saw a NaN score, stays NaN
                inv = zero
                if seen:
                    inv = DT(1.0) / lsum
                for c in range(dvp):
                    d = tx + TX * c
                    if d < Dv:
                        out[b, h, q0 + r, d] = acc[a * dvp + c] * inv
                if tx == 0:
                    if seen:
                        lse[b, h, q0 + r] = m[a] + math.log(lsum)
                    else:
                        lse[b, h, q0 + r] = ninf

    return kernel


def block_forward(q, k, v, indptr, indices, mask_index, masks, lay_heads, block_size, scale,
                  out, lse, stream=0, geometry=None):
    """Launch the block-CSR forward kernel.

    Parameters
    ----------
    q, k, v : device arrays (anything Numba-CUDA accepts), ``(B, Hq, Nq, D)``,
        ``(Bk, Hkv, Nk, D)``, ``(Bk, Hkv, Nk, Dv)``, float32 or float64, C-contiguous.
    indptr, indices, mask_index, masks : device arrays of the block-CSR layout
        (``masks`` as uint8 ``(n_masks, bq, bk)``; at least one mask, zeros if the layout has none).
    lay_heads : int
    block_size : tuple of int
    scale : float
    out, lse : device arrays ``(B, Hq, Nq, Dv)`` and ``(B, Hq, Nq)`` to fill.
    stream : Numba stream or 0
    geometry : Geometry, optional
        Overrides :func:`block_geometry` (tests use small tiles).
    """
    dtype = np.dtype(q.dtype)
    geom = geometry or block_geometry(dtype)
    B, Hq, Nq, _ = q.shape
    Dv = v.shape[3]
    bq, bk = block_size
    dvp = -(-Dv // geom[1])
    vk = _v_keys(geom, dvp, dtype.itemsize)
    tiles = -(-bq // geom.tq)
    nbq = -(-Nq // bq)
    if B == 0 or Hq == 0 or nbq == 0:
        return
    kern = _block_kernel(dtype.name, geom, dvp, vk)
    kern[(nbq * tiles, Hq, B), geom.threads, stream](
        q, k, v, indptr, indices, mask_index, masks, np.int64(lay_heads), np.int64(bq),
        np.int64(bk), np.int64(tiles), dtype.type(scale), out, lse)


# ----------------------------------------------------------------------------- CSR kernel


@functools.lru_cache(maxsize=None)
def _csr_kernel(dtype_name, nt, dvp, maxd):
    DT = _NB_TYPES[np.dtype(dtype_name)]
    NT = nt
    MAXD = maxd

    @cuda.jit
    def kernel(q, k, v, indptr, indices, lay_heads, scale, out, lse):
        qs = cuda.shared.array(MAXD, DT)
        ps = cuda.shared.array(NT, DT)
        js = cuda.shared.array(NT, int64)
        acc = cuda.local.array(dvp, DT)
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
        ninf = DT(-math.inf)
        for d in range(tid, D, NT):
            qs[d] = q[b, h, i, d] * scale
        for c in range(dvp):
            acc[c] = zero
        m = ninf
        l = zero
        start = indptr[row]
        end = indptr[row + 1]
        cuda.syncthreads()
        for p0 in range(start, end, NT):
            n = min(NT, end - p0)
            x = ninf
            if tid < n:
                j = indices[p0 + tid]
                js[tid] = j
                x = zero
                for d in range(D):
                    x += qs[d] * k[bkv, hk, j, d]
            ps[tid] = x
            cuda.syncthreads()
            mnew = m
            for t in range(n):
                mnew = max(mnew, ps[t])
            # every score is finite here (no masking inside a CSR row), so mnew > -inf
            alpha = math.exp(m - mnew)
            l *= alpha
            for c in range(dvp):
                acc[c] *= alpha
            for t in range(n):
                e = math.exp(ps[t] - mnew)
                l += e
                j = js[t]
                for c in range(dvp):
                    d = tid + NT * c
                    if d < Dv:
                        acc[c] += e * v[bkv, hk, j, d]
            m = mnew
            cuda.syncthreads()  # before the next step overwrites ps / js
        # l is NaN when a score was (max() passes over NaN): the row is NaN, out and lse, as on
        # the CPU; l == 0: no keys, out 0 and lse -inf
        seen = l > zero or l != l
        inv = zero
        if seen:
            inv = DT(1.0) / l
        for c in range(dvp):
            d = tid + NT * c
            if d < Dv:
                out[b, h, i, d] = acc[c] * inv
        if tid == 0:
            if seen:
                lse[b, h, i] = m + math.log(l)
            else:
                lse[b, h, i] = ninf

    return kernel


def csr_forward(q, k, v, indptr, indices, lay_heads, scale, out, lse, stream=0, threads=None):
    """Launch the token-level CSR forward kernel (arguments as :func:`block_forward`;
    ``threads`` overrides ``config.CUDA_CSR_THREADS``)."""
    dtype = np.dtype(q.dtype)
    nt = int(threads or config.CUDA_CSR_THREADS)
    B, Hq, Nq, D = q.shape
    Dv = v.shape[3]
    if D > config.CUDA_CSR_MAX_D:
        raise ValueError(f"head dimension {D} is too large for the CUDA CSR kernel "
                         f"(at most config.CUDA_CSR_MAX_D = {config.CUDA_CSR_MAX_D})")
    if B == 0 or Hq == 0 or Nq == 0:
        return
    dvp = -(-Dv // nt)
    kern = _csr_kernel(dtype.name, nt, dvp, config.CUDA_CSR_MAX_D)
    kern[(Nq, Hq, B), nt, stream](q, k, v, indptr, indices, np.int64(lay_heads),
                                  dtype.type(scale), out, lse)
