"""Backward kernels of the CUDA backend in Numba-CUDA (float32 and float64), without atomics.

With ``P = exp(scale * q.k - lse)`` recomputed from the forward pass's log-sum-exp and
``delta_i = dout_i . out_i``:

* :func:`block_backward`, block-CSR layouts, tiled: dq query-major over the layout, dk/dv
  key-major over its (block) transpose, each a thread block per tile of rows with register tiles
  of the scores and of ``dP`` and shared-memory tiles of ``P`` and ``dS`` (see ``_block_kernel``).
  No token-level layout is built, so its memory is the block layout's.

Token-level CSR layouts:

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
from .forward import Geometry, _score_tile, _unsigned

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


# ----------------------------------------------------------------------------- block-CSR kernels


def _z_keys(tc, zpad, itemsize):
    """Rows of the accumulated operand staged at once: ``TC`` halved until the tile fits
    ``config.CUDA_BWD_Z_TILE_BYTES``."""
    zk = tc
    while zk > 1 and zk * zpad * itemsize > config.CUDA_BWD_Z_TILE_BYTES:
        zk //= 2
    return zk


@functools.lru_cache(maxsize=None)
def _block_kernel(dtype_name, geom, zpa, zpb, zk, dkdv):
    """The tiled backward over a block-CSR layout, built per (dtype, geometry, mode).

    One thread block owns ``TR = TY * RY`` rows of the *row side* and walks its block row: for
    ``dkdv=False`` the rows are queries and the columns keys (the layout itself): it accumulates
    ``dq = scale * dS K``; for ``dkdv=True`` the rows are keys and the columns queries (the
    transposed layout), summed over the GQA group and a k/v batch broadcast: ``dk = scale * dS^T Q``
    and ``dv = P^T dO``. Per ``TC``-column tile each thread computes an ``RY x RX`` register tile
    of the scores and of ``dP`` (operands staged in shared memory ``DC`` dims at a time, as in the
    forward kernel), writes ``P`` and ``dS = P (dP - delta)`` to shared memory, and accumulates
    ``RY x zp`` output tiles against ``zk`` staged rows at a time.
    """
    DT = _NB_TYPES[np.dtype(dtype_name)]
    TY, TX, RY, RX, DC = geom
    TR, TC, NT = TY * RY, TX * RX, TY * TX
    AS = DC + 1  # padded row stride of the row-side chunk
    CS = TC + 1  # padded row stride of the transposed column chunk, of P and of dS
    COFF = TR * AS
    NTILE = 2 if dkdv else 1  # shared tiles: dS (and P)
    BUF = max(COFF + DC * CS, NTILE * TR * CS)  # staging chunks, later P / dS
    ZPAD = max(zpa, zpb) * TX
    ZSZ = zk * ZPAD
    RR = RY * RX
    RA = RY * zpa
    RB = RY * max(zpb, 1)
    TBSZ = max(RX, zpa, zpb)  # a row of the register tile, or of the staged rows
    TYCS = TY * CS
    PTOFF = TR * CS  # P after dS
    DKDV = dkdv
    U = _unsigned()
    tile_products = _score_tile(dtype_name, geom)

    @cuda.jit(device=True)
    def accumulate(acc, zp, buf, off, zs, z, zb, zh, c0, nc, width, ta, tz):
        """acc[a, c] += sum_j buf[off + row a, j] z[zb, zh, c0 + j, tx + TX c] (zk rows at a time)."""
        tid = cuda.threadIdx.x
        ty = tid // TX
        tx = tid - ty * TX
        zero = DT(0.0)
        prow0 = U(off + ty * CS)
        zcol0 = U(tx)
        zpad = zp * TX
        for z0 in range(0, nc, zk):
            cuda.syncthreads()  # P / dS written, or the previous rows consumed
            for e in range(tid, zk * zpad, NT):
                j = e // zpad
                d = e - j * zpad
                val = zero
                if z0 + j < nc and d < width:
                    val = z[zb, zh, c0 + z0 + j, d]
                zs[e] = val
            cuda.syncthreads()
            for j in range(zk):
                for a in range(RY):
                    ta[a] = buf[prow0 + U(a * TYCS + z0 + j)]
                for c in range(zp):
                    tz[c] = zs[zcol0 + U(j * zpad + TX * c)]
                for a in range(RY):
                    for c in range(zp):
                        acc[a * zp + c] += ta[a] * tz[c]

    @cuda.jit
    def kernel(q, k, v, dout, lse, delta, indptr, indices, mask_index, masks, lay_heads, br, bc,
               tiles, scale, ga, gb):
        buf = cuda.shared.array(BUF, DT)
        zs = cuda.shared.array(ZSZ, DT)
        coll = cuda.shared.array(TC, DT)  # lse / delta of the tile's queries (dk/dv mode)
        cold = cuda.shared.array(TC, DT)
        s = cuda.local.array(RR, DT)
        dp = cuda.local.array(RR, DT)
        acca = cuda.local.array(RA, DT)
        accb = cuda.local.array(RB, DT)
        rowl = cuda.local.array(RY, DT)
        rowd = cuda.local.array(RY, DT)
        ta = cuda.local.array(RY, DT)
        tb = cuda.local.array(TBSZ, DT)

        Hq = q.shape[1]
        group = Hq // k.shape[1]
        D = q.shape[3]
        Dv = v.shape[3]
        if DKDV:
            Nr = k.shape[2]
            Nc = q.shape[2]
        else:
            Nr = q.shape[2]
            Nc = k.shape[2]
        tid = cuda.threadIdx.x
        ty = tid // TX
        tx = tid - ty * TX
        rb = cuda.blockIdx.x // tiles
        rblock0 = rb * br
        r0 = rblock0 + (cuda.blockIdx.x - rb * tiles) * TR
        nr = min(TR, min(rblock0 + br, Nr) - r0)
        if nr <= 0:  # the clipped last block row has fewer tiles (uniform over the block)
            return
        nbr = (Nr + br - 1) // br
        zero = DT(0.0)
        ninf = DT(-math.inf)
        for e in range(RA):
            acca[e] = zero
        for e in range(RB):
            accb[e] = zero
        if DKDV:
            hk = cuda.blockIdx.y
            bkv = cuda.blockIdx.z
            n_pairs = group * (q.shape[0] if k.shape[0] == 1 else 1)  # summed (query head, batch)
        else:
            h = cuda.blockIdx.y
            b = cuda.blockIdx.z
            hk = h // group
            bkv = b if k.shape[0] > 1 else 0
            n_pairs = 1
            for a in range(RY):
                r = ty + TY * a
                rowl[a] = ninf
                rowd[a] = zero
                if r < nr:
                    rowl[a] = lse[b, h, r0 + r]
                    rowd[a] = delta[b, h, r0 + r]
        for pair in range(n_pairs):
            if DKDV:
                h = hk * group + pair % group
                b = bkv
                if k.shape[0] == 1:
                    b = pair // group
            row = (h if lay_heads > 1 else 0) * nbr + rb
            for p in range(indptr[row], indptr[row + 1]):
                cblock0 = indices[p] * bc
                cend = min(cblock0 + bc, Nc)
                mi = mask_index[p]
                for c0 in range(cblock0, cend, TC):
                    nc = min(TC, cend - c0)
                    if DKDV:
                        for j in range(tid, TC, NT):
                            lv = ninf
                            dv_ = zero
                            if j < nc:
                                lv = lse[b, h, c0 + j]
                                dv_ = delta[b, h, c0 + j]
                            coll[j] = lv
                            cold[j] = dv_
                        # S^T = scale K Q^T, dP^T = V dO^T
                        tile_products(s, buf, k, bkv, hk, r0, nr, q, b, h, c0, nc, D, scale, ta, tb)
                        tile_products(dp, buf, v, bkv, hk, r0, nr, dout, b, h, c0, nc, Dv, DT(1.0),
                                      ta, tb)
                    else:
                        # S = scale Q K^T, dP = dO V^T
                        tile_products(s, buf, q, b, h, r0, nr, k, bkv, hk, c0, nc, D, scale, ta, tb)
                        tile_products(dp, buf, dout, b, h, r0, nr, v, bkv, hk, c0, nc, Dv, DT(1.0),
                                      ta, tb)
                    # P and dS (0 outside the mask) into shared memory
                    for a in range(RY):
                        r = ty + TY * a
                        for c in range(RX):
                            j = tx + TX * c
                            ok = r < nr and j < nc
                            if ok and mi >= 0:
                                ok = masks[mi, r0 - rblock0 + r, c0 - cblock0 + j] != 0
                            pv = zero
                            dsv = zero
                            if ok:
                                if DKDV:
                                    lv = coll[j]
                                    dl = cold[j]
                                else:
                                    lv = rowl[a]
                                    dl = rowd[a]
                                if lv != ninf:  # an allowed pair has a finite lse; be safe
                                    pv = math.exp(s[a * RX + c] - lv)
                                    dsv = pv * (dp[a * RX + c] - dl)
                            buf[r * CS + j] = dsv
                            if DKDV:
                                buf[PTOFF + r * CS + j] = pv
                    if DKDV:
                        accumulate(acca, zpa, buf, 0, zs, q, b, h, c0, nc, D, ta, tb)  # dS^T Q
                        accumulate(accb, zpb, buf, PTOFF, zs, dout, b, h, c0, nc, Dv, ta, tb)
                    else:
                        accumulate(acca, zpa, buf, 0, zs, k, bkv, hk, c0, nc, D, ta, tb)  # dS K
                    cuda.syncthreads()  # before the next tile overwrites buf

        for a in range(RY):
            r = ty + TY * a
            if r < nr:
                for c in range(zpa):
                    d = tx + TX * c
                    if d < D:
                        if DKDV:
                            ga[bkv, hk, r0 + r, d] = acca[a * zpa + c] * scale
                        else:
                            ga[b, h, r0 + r, d] = acca[a * zpa + c] * scale
                if DKDV:
                    for c in range(zpb):
                        d = tx + TX * c
                        if d < Dv:
                            gb[bkv, hk, r0 + r, d] = accb[a * zpb + c]

    return kernel


def block_backward(q, k, v, dout, lse, delta, dev, tdev, lay_heads, block_size, scale, dq, dk,
                   dv, stream=0, geometry=None):
    """Launch the tiled backward over a block-CSR layout: dq over the layout (``dev``: its device
    arrays, see ``_device.device_layout``), dk/dv over its transpose (``tdev``).

    Parameters
    ----------
    q, k, v, dout : device arrays ``(B, Hq, Nq, D)``, ``(Bk, Hkv, Nk, D)``, ``(Bk, Hkv, Nk, Dv)``,
        ``(B, Hq, Nq, Dv)``, float32 or float64.
    lse, delta : device arrays ``(B, Hq, Nq)``: the forward's log-sum-exp and ``(dout * out).sum(-1)``.
    dev, tdev : dict of device arrays of the layout and of ``layout.transpose()``.
    lay_heads : int
    block_size : tuple of int
        The layout's ``(bq, bk)``.
    scale : float
    dq, dk, dv : device arrays to fill, shaped like q, k, v.
    stream : Numba stream or 0
    geometry : forward.Geometry, optional
        Overrides ``config.CUDA_BWD_TILES`` (tests use small tiles).
    """
    _check_dims(q, v)
    dtype = np.dtype(q.dtype)
    geom = geometry or Geometry(*config.CUDA_BWD_TILES["float64" if dtype == np.float64 else "float32"])
    B, Hq, Nq, D = q.shape
    Bk, Hkv, Nk, Dv = v.shape
    bq, bk = block_size
    tr, tc, tx = geom[0] * geom[2], geom[1] * geom[3], geom[1]
    zpd, zpv = -(-D // tx), -(-Dv // tx)
    zk = _z_keys(tc, max(zpd, zpv) * tx, dtype.itemsize)
    sc = dtype.type(scale)
    if B and Hq and Nq:
        tiles = -(-bq // tr)
        kern = _block_kernel(dtype.name, geom, zpd, 0, zk, False)
        kern[(-(-Nq // bq) * tiles, Hq, B), geom.threads, stream](
            q, k, v, dout, lse, delta, dev["indptr"], dev["indices"], dev["mask_index"],
            dev["masks"], np.int64(lay_heads), np.int64(bq), np.int64(bk), np.int64(tiles), sc,
            dq, dq)
    if Bk and Hkv and Nk:
        tiles = -(-bk // tr)
        kern = _block_kernel(dtype.name, geom, zpd, zpv, zk, True)
        kern[(-(-Nk // bk) * tiles, Hkv, Bk), geom.threads, stream](
            q, k, v, dout, lse, delta, tdev["indptr"], tdev["indices"], tdev["mask_index"],
            tdev["masks"], np.int64(lay_heads), np.int64(bk), np.int64(bq), np.int64(tiles), sc,
            dk, dv)
