"""Backward kernels of the CPU backend (Numba, parallel over work-balanced task chunks).

Flash-style: nothing of the forward pass is kept but ``out`` and the log-sum-exp ``lse``. Per
tile the probabilities are recomputed as ``P = exp(scale * q.k - lse)``, and with
``delta = rowsum(dout * out)``::

    dP = dout . v^T          dS = P * (dP - delta)
    dq = scale * dS . k      dk = scale * dS^T . q      dv = P^T . dout

Threads never race and nothing is atomic, so results are deterministic. Two strategies:

* two passes (token CSR, and block-CSR layouts whose key blocks are shared by many work chunks):

  1. query-major, over the layout (one task: one batch, head and query block / query): ``dq``,
     and ``delta`` on the way;
  2. key-major, over ``layout.transpose()`` (cached on the layout; one task: one kv-batch, kv-head
     and key block / key): ``dk`` and ``dv``, summed over the query heads of the task's GQA group
     and, when ``k``/``v`` are broadcast along the batch, over the batch. Each task owns its rows.

  Seven tile products per tile (scores and ``dP`` are computed in both passes); bit-identical
  whatever the thread count.
* fused (block-CSR, local patterns such as sliding windows): one query-major pass with five tile
  products per tile. Each work chunk (run by one thread at a time) adds its ``dk``/``dv``
  contributions straight into the key blocks only it touches, and into partial buffers of its own
  for the key blocks it shares with other chunks (:func:`_fused_plan`; a sliding window shares
  only the few blocks at chunk boundaries); :func:`reduce_partials` then sums those per key block
  in chunk order. Used while those buffers stay below ``config.CPU_BACKWARD_MAX_PARTIALS`` times
  ``dk``/``dv``; bit-identical for a given thread count.

In the block kernels, as in the forward's, a run of consecutive blocks (up to
``config.CPU_MAX_KEY_TILE`` keys, or queries in the key-major pass) is one wide tile: every tile
product is one BLAS call over the whole run, made by :func:`_gemm`, which writes straight into
``dq``/``dk``/``dv`` or the partials: the first product into a row overwrites it (``beta = 0``),
later ones accumulate (``beta = 1``): no temporary product, no add loop, no zeroing pass.
``scale`` is folded into ``dS``. Full blocks skip the element mask; the exponential is the
vectorised :func:`~._fastmath.fast_exp`.

No tile of probabilities outlives its step. A query row with no key (``lse = -inf``) recomputes
``exp(s - inf) = 0``: it contributes nothing and never produces NaN. A NaN in an input is never
turned into 0: it reaches the gradients of the pairs that use it (and, through the tile products,
of the rows and keys sharing a tile with it).

Logits so large that ``s - lse`` cannot be formed in the input dtype (``|lse|`` beyond
``_EXACT_LSE_ULP / eps``; e.g. ~1e37 in float32, where one ulp of ``lse`` is 1e30) would give
meaningless probabilities: such calls run :func:`exact_backward` instead, a token-level float64
kernel that recomputes each row's maximum and sum itself and trusts neither ``lse`` nor ``out``.

Kernels trust their inputs: :mod:`sparseattn.api` validated shapes and the layout's constructor
validated every index, so every read below is in bounds.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic
from numba.np import linalg as _la

from ... import config
from ...layout import BlockCSRLayout, CSRLayout
from ._fastmath import FASTMATH, fast_exp, zero_of
from ._prefetch import CACHE_LINE, scattered
from ._rows import axpy1, axpy4, dot1, dot4, one_head_at_a_time, prefetch_rows
from ._rows import piece_rows as _piece_rows
from ._safety import exact_score as _exact_score
from ._tasks import task_coords
from ._threads import balanced_chunks, blas_single_thread, num_threads

__all__ = ["backward", "exact_backward"]

#: Calls with a finite ``|lse| * eps`` above this run :func:`exact_backward`: one ulp of ``lse``
#: would move every probability of the row by more than 0.1 %. (float32: ``|lse| > 8192``;
#: float64: ``|lse| > 2**42``; ordinary attention stays below 100.)
_EXACT_LSE_ULP = 2.0**-10


# ----------------------------------------------------------------------------- BLAS


@intrinsic
def _xgemm(typingctx, ta, tb, m, n, kk, a, a_off, lda, b, b_off, ldb, beta, c, c_off, ldc):
    """Numba's own ``numba_xxgemm`` (the BLAS of scipy.linalg.cython_blas, as ``np.dot`` uses it)
    with a ``beta``: cacheable, unlike a ctypes pointer. Row-major operands given as an array,
    element offset and leading dimension; see :func:`_gemm`."""
    if not all(isinstance(x, types.Array) and x.layout == "C" for x in (a, b, c)):
        return None
    if not (a.dtype == b.dtype == c.dtype) or a.dtype not in (types.float32, types.float64):
        return None
    dt = a.dtype
    sig = types.void(ta, tb, m, n, kk, a, a_off, lda, b, b_off, ldb, beta, c, c_off, ldc)

    def codegen(context, builder, signature, args):
        _la.ensure_blas()
        st = signature.args
        intp = context.get_value_type(types.intp)
        vp = _la.ll_void_p

        def as_intp(i):
            return context.cast(builder, args[i], st[i], types.intp)

        def pointer(i):  # data pointer of argument i plus the element offset in argument i + 1
            ary = context.make_array(st[i])(context, builder, args[i])
            return builder.bitcast(builder.gep(ary.data, [as_intp(i + 1)]), vp)

        fnty = ir.FunctionType(ir.IntType(32), [_la.ll_char] * 3 + [intp] * 3
                               + [vp, vp, intp, vp, intp, vp, vp, intp])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "numba_xxgemm")
        alpha = cgutils.alloca_once_value(builder, context.get_constant(dt, 1.0))
        betav = cgutils.alloca_once_value(builder, context.cast(builder, args[11], st[11], dt))
        t_ch = ir.Constant(_la.ll_char, ord("t"))
        n_ch = ir.Constant(_la.ll_char, ord("n"))

        def flag(i):
            return builder.select(builder.icmp_signed("!=", args[i], ir.Constant(args[i].type, 0)),
                                  t_ch, n_ch)

        # row-major C = op(A) op(B) is, read column-major, C^T = op(B)^T op(A)^T
        res = builder.call(fn, (ir.Constant(_la.ll_char, ord(_la.get_blas_kind(dt))),
                                flag(1), flag(0), as_intp(3), as_intp(2), as_intp(4),
                                builder.bitcast(alpha, vp), pointer(8), as_intp(10),
                                pointer(5), as_intp(7), builder.bitcast(betav, vp),
                                pointer(12), as_intp(14)))
        _la.check_blas_return(context, builder, res)
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=True)
def _gemm(ta, tb, m, n, kk, a, a_off, lda, b, b_off, ldb, beta, c, c_off, ldc):
    """``C = op(A) op(B) + beta C`` on row-major sub-matrices of C-contiguous arrays.

    ``A`` starts at element ``a_off`` of ``a`` with rows ``lda`` elements apart (likewise ``B``,
    ``C``); ``op(A)`` is ``A`` (``ta == 0``, then ``A`` is ``m x kk``) or ``A^T`` (``A`` is
    ``kk x m``). ``C`` is ``m x n``. ``beta`` is 0 (overwrite) or 1 (accumulate).
    """
    if m <= 0 or n <= 0:
        return
    if kk <= 0:  # empty product (e.g. Dv = 0): BLAS would refuse the leading dimensions
        if beta == 0:
            cf = c.reshape(c.size)
            for i in range(m):
                for j in range(n):
                    cf[c_off + i * ldc + j] = 0
        return
    _xgemm(ta, tb, m, n, kk, a, a_off, lda, b, b_off, ldb, beta, c, c_off, ldc)


# ----------------------------------------------------------------------------- block-CSR kernels


@njit(cache=True, fastmath=FASTMATH)
def _tile_ds(s, dp, nr, w, lrow, drow, keep_p, scale):
    """Query-major tile ``(nr, w)`` in flat buffers: ``s`` (scores) becomes
    ``scale * dS = scale * P * (dP - delta)`` (so that ``dq = (scale dS) k``, ``dk = (scale dS)^T q``
    need no scaling pass), and ``dp`` becomes ``P`` when ``keep_p``.

    ``lrow``/``drow`` hold lse (``-inf`` made ``+inf``, so an empty row gives ``P = 0``) and delta
    of the tile's rows. One vectorised pass over the whole tile, masks applied after it.
    """
    for r in range(nr):
        li = lrow[r]
        di = drow[r]
        o = r * w
        if keep_p:
            for c in range(w):
                p = fast_exp(s[o + c] - li)
                s[o + c] = p * (dp[o + c] - di) * scale
                dp[o + c] = p
        else:
            for c in range(w):
                s[o + c] = fast_exp(s[o + c] - li) * (dp[o + c] - di) * scale


@njit(cache=True, fastmath=FASTMATH)
def _tile_ds_t(s, dp, nr, w, lcol, dcol, scale):
    """Key-major tile ``(nr keys, w queries)``: ``s`` becomes ``scale * dS^T`` and ``dp`` becomes
    ``P^T``; ``lcol``/``dcol`` hold lse and delta of the tile's queries (its columns)."""
    for r in range(nr):
        o = r * w
        for c in range(w):
            p = fast_exp(s[o + c] - lcol[c])
            s[o + c] = p * (dp[o + c] - dcol[c]) * scale
            dp[o + c] = p


@njit(cache=True)
def _mask_tile(s, dp, mk, nr, w, col0, width, zero):
    """Zero the pairs a partial block's element mask ``mk`` forbids, in columns
    ``col0 .. col0 + width`` of a tile of row length ``w``. A select, not a multiply: a NaN of a
    masked-out pair stays out."""
    for r in range(nr):
        o = r * w + col0
        for c in range(width):
            if not mk[r, c]:
                s[o + c] = zero
                dp[o + c] = zero


@njit(cache=True)
def _run_end(indices, p, pend, max_run):
    """End of the run of consecutive blocks starting at entry ``p`` (at most ``max_run``)."""
    pr = p + 1
    while pr < pend and pr - p < max_run and indices[pr] == indices[pr - 1] + 1:
        pr += 1
    return pr


@njit(cache=True)
def _row_prologue(b, h, q0, nq, q, out, lse, dout, scale, qs, lrow, drow):
    """Per query block: ``qs = scale * q``, lse (``-inf`` made ``+inf``) and delta of its rows."""
    D = q.shape[3]
    Dv = out.shape[3]
    for i in range(nq):
        # delta once per row, in float64: it cancels against dP in dS = P (dP - delta)
        dsum = np.float64(0.0)
        for d in range(Dv):
            dsum += np.float64(dout[b, h, q0 + i, d]) * np.float64(out[b, h, q0 + i, d])
        drow[i] = dsum
        li = lse[b, h, q0 + i]
        lrow[i] = -li if li == -np.inf else li
        for d in range(D):
            qs[i * D + d] = q[b, h, q0 + i, d] * scale


@njit(cache=True)
def _run_ds_dq(qs, k, v, dout, indices, mask_index, masks, p, pr, bk, qrow0, krow0, k0, nq, w,
               s_buf, dp_buf, lrow, drow, keep_p, scale, first, dq):
    """One run ``indices[p:pr]`` of consecutive key blocks, shared by pass 1 and the fused pass:
    ``S = qs K^T`` and ``dP = dout V^T`` as one product each, ``s_buf`` <- ``scale dS`` (and
    ``dp_buf`` <- ``P`` when ``keep_p``), partial blocks masked, then ``dq (+)= (scale dS) K``
    (overwritten on the row's ``first`` run)."""
    D = k.shape[3]
    Dv = v.shape[3]
    Nk = k.shape[2]
    _gemm(0, 1, nq, w, D, qs, 0, D, k, krow0 * D, D, 0, s_buf, 0, w)
    _gemm(0, 1, nq, w, Dv, dout, qrow0 * Dv, Dv, v, krow0 * Dv, Dv, 0, dp_buf, 0, w)
    _tile_ds(s_buf, dp_buf, nq, w, lrow, drow, keep_p, scale)
    for pp in range(p, pr):
        mi = mask_index[pp]
        if mi >= 0:
            _mask_tile(s_buf, dp_buf, masks[mi], nq, w, indices[pp] * bk - k0,
                       min(bk, Nk - indices[pp] * bk), zero_of(qs))
    _gemm(0, 0, nq, D, w, s_buf, 0, w, k, krow0 * D, D, 0 if first else 1, dq, qrow0 * D, D)


@njit(cache=True)
def _block_dq_tasks(t0, t1, q, k, v, out, lse, dout, indptr, indices, mask_index, masks, lay_heads,
                    bq, bk, scale, max_run, dq, delta, lse_eff):
    """Tasks ``t0..t1-1`` of pass 1 (one per batch, head and query block), with their scratch."""
    B, Hq, Nq, D = q.shape
    Bk, Hkv, Nk, _ = k.shape
    nbq = (Nq + bq - 1) // bq
    group = Hq // Hkv
    zero = zero_of(q)
    qs = np.empty(bq * D, q.dtype)
    s_buf = np.empty(bq * bk * max_run, q.dtype)
    dp_buf = np.empty(bq * bk * max_run, q.dtype)
    lrow = np.empty(bq, q.dtype)
    drow = np.empty(bq, q.dtype)
    for t in range(t0, t1):
        b, h, qb, lh, bkv, hk = task_coords(t, nbq, Hq, lay_heads, Bk, group)
        q0 = qb * bq
        nq = min(bq, Nq - q0)
        qrow0 = (b * Hq + h) * Nq + q0  # first row of the block in q, dq, dout
        _row_prologue(b, h, q0, nq, q, out, lse, dout, scale, qs, lrow, drow)
        for i in range(nq):
            delta[b, h, q0 + i] = drow[i]
            lse_eff[b, h, q0 + i] = lrow[i]
        row = lh * nbq + qb
        p = indptr[row]
        pend = indptr[row + 1]
        while p < pend:
            pr = _run_end(indices, p, pend, max_run)
            k0 = indices[p] * bk
            w = min(Nk, (indices[pr - 1] + 1) * bk) - k0
            krow0 = (bkv * Hkv + hk) * Nk + k0
            _run_ds_dq(qs, k, v, dout, indices, mask_index, masks, p, pr, bk, qrow0, krow0, k0, nq,
                       w, s_buf, dp_buf, lrow, drow, False, scale, p == indptr[row], dq)
            p = pr
        if indptr[row] == pend:  # a query block without keys
            for i in range(nq):
                for d in range(D):
                    dq[b, h, q0 + i, d] = zero


@njit(parallel=True, cache=True)
def block_dq(q, k, v, out, lse, dout, indptr, indices, mask_index, masks, lay_heads, bq, bk, scale,
             max_run, chunk_starts, dq, delta, lse_eff):
    """Pass 1: ``dq``, ``delta`` and ``lse_eff`` (lse with -inf made +inf)."""
    # the parallel body only dispatches: a small parfor compiles fast, the task code once
    for c in prange(chunk_starts.shape[0] - 1):
        _block_dq_tasks(chunk_starts[c], chunk_starts[c + 1], q, k, v, out, lse, dout, indptr,
                        indices, mask_index, masks, lay_heads, bq, bk, scale, max_run, dq, delta,
                        lse_eff)


@njit(cache=True)
def _block_dkdv_tasks(t0, t1, q, k, v, dout, lse_eff, delta, indptr, indices, mask_index, masks,
                      lay_heads, bq, bk, scale, max_run, dk, dv):
    """Tasks ``t0..t1-1`` of pass 2 (one per kv batch, kv head and key block)."""
    B, Hq, Nq, D = q.shape
    Bk, Hkv, Nk, _ = k.shape
    Dv = v.shape[3]
    nbk = (Nk + bk - 1) // bk
    group = Hq // Hkv
    nb = B if Bk == 1 else 1
    zero = zero_of(q)
    ks = np.empty(bk * D, k.dtype)
    s_buf = np.empty(bk * bq * max_run, k.dtype)
    dp_buf = np.empty(bk * bq * max_run, k.dtype)
    lcol = np.empty(bq * max_run, k.dtype)
    dcol = np.empty(bq * max_run, k.dtype)
    for t in range(t0, t1):
        bkv = t // (Hkv * nbk)
        r = t - bkv * (Hkv * nbk)
        hk = r // nbk
        kb = r - hk * nbk
        k0 = kb * bk
        nk = min(bk, Nk - k0)
        krow0 = (bkv * Hkv + hk) * Nk + k0
        for j in range(nk):
            for d in range(D):
                ks[j * D + d] = k[bkv, hk, k0 + j, d] * scale
                dk[bkv, hk, k0 + j, d] = zero
            for d in range(Dv):
                dv[bkv, hk, k0 + j, d] = zero
        for g in range(group):
            h = hk * group + g
            lh = h if lay_heads > 1 else 0
            row = lh * nbk + kb
            for bi in range(nb):
                b = bi if Bk == 1 else bkv
                p = indptr[row]
                pend = indptr[row + 1]
                while p < pend:
                    pr = _run_end(indices, p, pend, max_run)
                    q0 = indices[p] * bq
                    w = min(Nq, (indices[pr - 1] + 1) * bq) - q0
                    qrow0 = (b * Hq + h) * Nq + q0
                    for c in range(w):
                        lcol[c] = lse_eff[b, h, q0 + c]
                        dcol[c] = delta[b, h, q0 + c]
                    _gemm(0, 1, nk, w, D, ks, 0, D, q, qrow0 * D, D, 0, s_buf, 0, w)  # S^T
                    _gemm(0, 1, nk, w, Dv, v, krow0 * Dv, Dv, dout, qrow0 * Dv, Dv, 0, dp_buf, 0, w)
                    _tile_ds_t(s_buf, dp_buf, nk, w, lcol, dcol, scale)
                    for pp in range(p, pr):
                        mi = mask_index[pp]
                        if mi >= 0:
                            _mask_tile(s_buf, dp_buf, masks[mi], nk, w, indices[pp] * bq - q0,
                                       min(bq, Nq - indices[pp] * bq), zero)
                    # dv += P^T dout, dk += (scale dS)^T q, straight into the task's rows
                    _gemm(0, 0, nk, Dv, w, dp_buf, 0, w, dout, qrow0 * Dv, Dv, 1, dv, krow0 * Dv, Dv)
                    _gemm(0, 0, nk, D, w, s_buf, 0, w, q, qrow0 * D, D, 1, dk, krow0 * D, D)
                    p = pr


@njit(parallel=True, cache=True)
def block_dkdv(q, k, v, dout, lse_eff, delta, indptr, indices, mask_index, masks, lay_heads, bq, bk,
               scale, max_run, chunk_starts, dk, dv):
    """Pass 2: ``dk`` and ``dv`` over the transposed layout (its masks are ``(bk, bq)``)."""
    for c in prange(chunk_starts.shape[0] - 1):
        _block_dkdv_tasks(chunk_starts[c], chunk_starts[c + 1], q, k, v, dout, lse_eff, delta,
                          indptr, indices, mask_index, masks, lay_heads, bq, bk, scale, max_run,
                          dk, dv)


@njit(cache=True)
def _block_fused_tasks(t0, t1, q, k, v, out, lse, dout, indptr, indices, mask_index, masks,
                       lay_heads, bq, bk, scale, max_run, entry_start, entry_slot, entry_first, dq,
                       dk, dv, pdk, pdv):
    """Tasks ``t0..t1-1`` of the fused pass: ``dq`` of the task's query block, and its tiles'
    contributions to ``dk``/``dv``, added straight into ``dk``/``dv`` for a key block no other
    chunk touches, else into this chunk's own partial slot (``entry_slot``: the slot of each
    (task, block) entry, -1 for straight). A chunk's first touch of a block overwrites
    (``entry_first``), so neither ``dk``/``dv`` nor the partials are zeroed beforehand."""
    B, Hq, Nq, D = q.shape
    Bk, Hkv, Nk, _ = k.shape
    Dv = v.shape[3]
    nbq = (Nq + bq - 1) // bq
    group = Hq // Hkv
    zero = zero_of(q)
    qs = np.empty(bq * D, q.dtype)
    s_buf = np.empty(bq * bk * max_run, q.dtype)
    dp_buf = np.empty(bq * bk * max_run, q.dtype)
    lrow = np.empty(bq, q.dtype)
    drow = np.empty(bq, q.dtype)
    for t in range(t0, t1):
        b, h, qb, lh, bkv, hk = task_coords(t, nbq, Hq, lay_heads, Bk, group)
        q0 = qb * bq
        nq = min(bq, Nq - q0)
        qrow0 = (b * Hq + h) * Nq + q0
        _row_prologue(b, h, q0, nq, q, out, lse, dout, scale, qs, lrow, drow)
        row = lh * nbq + qb
        p0 = indptr[row]
        p = p0
        pend = indptr[row + 1]
        e0 = entry_start[t]
        while p < pend:
            pr = _run_end(indices, p, pend, max_run)
            k0 = indices[p] * bk
            w = min(Nk, (indices[pr - 1] + 1) * bk) - k0
            krow0 = (bkv * Hkv + hk) * Nk + k0
            # s_buf <- scale dS, dp_buf <- P (kept for dv), dq (+)= (scale dS) K
            _run_ds_dq(qs, k, v, dout, indices, mask_index, masks, p, pr, bk, qrow0, krow0, k0, nq,
                       w, s_buf, dp_buf, lrow, drow, True, scale, p == p0, dq)
            # dv (+)= P^T dout and dk (+)= (scale dS)^T q, one product per stretch of the run whose
            # destination is contiguous (key blocks owned by this chunk: straight into dk/dv; or
            # consecutive partial slots) and that this chunk touches first, or not, throughout
            a = p
            while a < pr:
                slot = entry_slot[e0 + a - p0]
                beta = 1 - np.int64(entry_first[e0 + a - p0])
                z = a + 1
                while z < pr:
                    nxt = entry_slot[e0 + z - p0]
                    if ((slot < 0 and nxt >= 0) or (slot >= 0 and nxt != slot + z - a)
                            or entry_first[e0 + z - p0] != entry_first[e0 + a - p0]):
                        break
                    z += 1
                c0 = indices[a] * bk - k0
                c1 = min(w, indices[z - 1] * bk - k0 + bk)
                if slot < 0:
                    _gemm(1, 0, c1 - c0, Dv, nq, dp_buf, c0, w, dout, qrow0 * Dv, Dv, beta,
                          dv, (krow0 + c0) * Dv, Dv)
                    _gemm(1, 0, c1 - c0, D, nq, s_buf, c0, w, q, qrow0 * D, D, beta,
                          dk, (krow0 + c0) * D, D)
                else:
                    _gemm(1, 0, c1 - c0, Dv, nq, dp_buf, c0, w, dout, qrow0 * Dv, Dv, beta,
                          pdv, slot * bk * Dv, Dv)
                    _gemm(1, 0, c1 - c0, D, nq, s_buf, c0, w, q, qrow0 * D, D, beta,
                          pdk, slot * bk * D, D)
                a = z
            p = pr
        if p0 == pend:  # a query block without keys
            for i in range(nq):
                for d in range(D):
                    dq[b, h, q0 + i, d] = zero


@njit(parallel=True, cache=True)
def block_fused(q, k, v, out, lse, dout, indptr, indices, mask_index, masks, lay_heads, bq, bk,
                scale, max_run, chunk_starts, entry_start, entry_slot, entry_first, dq, dk, dv, pdk,
                pdv):
    """Fused pass: ``dq``, and ``dk``/``dv`` or partials (see :func:`_fused_plan`)."""
    for c in prange(chunk_starts.shape[0] - 1):
        _block_fused_tasks(chunk_starts[c], chunk_starts[c + 1], q, k, v, out, lse, dout, indptr,
                           indices, mask_index, masks, lay_heads, bq, bk, scale, max_run,
                           entry_start, entry_slot, entry_first, dq, dk, dv, pdk, pdv)


@njit(parallel=True, cache=True)
def reduce_partials(red_ptr, red_slots, pdk, pdv, bk, dk, dv):
    """Each shared key block of ``dk``/``dv`` (no chunk writes it directly) becomes the sum of its
    chunks' partials, in chunk order."""
    Bk, Hkv, Nk, D = dk.shape
    Dv = dv.shape[3]
    nbk = (Nk + bk - 1) // bk
    for g in prange(Bk * Hkv * nbk):
        bkv = g // (Hkv * nbk)
        r = g - bkv * (Hkv * nbk)
        hk = r // nbk
        k0 = (r - hk * nbk) * bk
        nk = min(bk, Nk - k0)
        x0 = red_ptr[g]
        if x0 == red_ptr[g + 1]:
            continue
        sl = red_slots[x0]
        for j in range(nk):
            for d in range(D):
                dk[bkv, hk, k0 + j, d] = pdk[sl, j, d]
            for d in range(Dv):
                dv[bkv, hk, k0 + j, d] = pdv[sl, j, d]
        for x in range(x0 + 1, red_ptr[g + 1]):
            sl = red_slots[x]
            for j in range(nk):
                for d in range(D):
                    dk[bkv, hk, k0 + j, d] += pdk[sl, j, d]
                for d in range(Dv):
                    dv[bkv, hk, k0 + j, d] += pdv[sl, j, d]


# ----------------------------------------------------------------------------- token-CSR kernels
# Accumulators start from ``zero = zero_of(q)``, a zero of the input dtype: a literal 0.0 is a
# float64 in Numba and would run every float32 reduction below in double precision, unvectorised.


@njit(cache=True, fastmath=FASTMATH)
def _csr_dq_tasks(t0, t1, q, k, v, out, lse, dout, indptr, indices, lay_heads, scale, dq, delta,
                  lse_eff, ahead):
    """Tasks ``t0..t1-1`` of pass 1 on a token layout (one per batch, head and query);
    ``ahead > 0``: prefetch the K/V rows of the key that many entries on (scattered rows)."""
    B, Hq, Nq, D = q.shape
    Bk, Hkv, Nk, _ = k.shape
    Dv = v.shape[3]
    group = Hq // Hkv
    zero = zero_of(q)
    last = indices.shape[0] - 1
    line = max(1, CACHE_LINE // k.itemsize)
    qrow = np.empty(D, q.dtype)
    drow = np.empty(Dv, q.dtype)
    acc = np.empty(D, q.dtype)
    for t in range(t0, t1):
        b, h, i, lh, bkv, hk = task_coords(t, Nq, Hq, lay_heads, Bk, group)
        dsum = np.float64(0.0)  # once per row, in float64: it cancels against dp below
        for d in range(Dv):
            dsum += np.float64(dout[b, h, i, d]) * np.float64(out[b, h, i, d])
        delta[b, h, i] = dsum
        di = delta[b, h, i]  # in the input dtype
        li = lse[b, h, i]
        if li == -np.inf:
            li = -li
        lse_eff[b, h, i] = li
        for d in range(D):
            qrow[d] = q[b, h, i, d] * scale
            acc[d] = zero
        for d in range(Dv):
            drow[d] = dout[b, h, i, d]
        row = lh * Nq + i
        p = indptr[row]
        end = indptr[row + 1]
        while p + 3 < end:  # four keys per step (see _rows)
            if ahead > 0:  # the entries run on into the next row, which is computed next
                prefetch_rows(k, bkv, hk, indices, p + ahead, last, line)
                prefetch_rows(v, bkv, hk, indices, p + ahead, last, line)
            j0, j1, j2, j3 = indices[p], indices[p + 1], indices[p + 2], indices[p + 3]
            s0, s1, s2, s3 = dot4(qrow, k, bkv, hk, j0, j1, j2, j3, zero)
            p0, p1, p2, p3 = dot4(drow, v, bkv, hk, j0, j1, j2, j3, zero)
            axpy4(acc, k, bkv, hk, j0, j1, j2, j3, fast_exp(s0 - li) * (p0 - di),
                  fast_exp(s1 - li) * (p1 - di), fast_exp(s2 - li) * (p2 - di),
                  fast_exp(s3 - li) * (p3 - di))
            p += 4
        for p in range(p, end):
            j = indices[p]
            ds = (fast_exp(dot1(qrow, k, bkv, hk, j, zero) - li)
                  * (dot1(drow, v, bkv, hk, j, zero) - di))
            axpy1(acc, k, bkv, hk, j, ds)
        for d in range(D):
            dq[b, h, i, d] = acc[d] * scale


@njit(parallel=True, cache=True)
def csr_dq(q, k, v, out, lse, dout, indptr, indices, lay_heads, scale, chunk_starts, dq, delta,
           lse_eff, ahead):
    """Pass 1 on a token layout."""
    for c in prange(chunk_starts.shape[0] - 1):
        _csr_dq_tasks(chunk_starts[c], chunk_starts[c + 1], q, k, v, out, lse, dout, indptr, indices,
                      lay_heads, scale, dq, delta, lse_eff, ahead)


@njit(cache=True, fastmath=FASTMATH)
def _csr_dkdv_tasks(t0, t1, q, k, v, dout, lse_eff, delta, indptr, indices, lay_heads, scale, dk, dv,
                    ahead):
    """Tasks ``t0..t1-1`` of pass 2 on the transposed token layout (one per kv batch, head, key);
    ``ahead > 0``: prefetch the q/dout rows of the query that many entries on."""
    B, Hq, Nq, D = q.shape
    Bk, Hkv, Nk, _ = k.shape
    Dv = v.shape[3]
    group = Hq // Hkv
    nb = B if Bk == 1 else 1
    zero = zero_of(q)
    last = indices.shape[0] - 1
    line = max(1, CACHE_LINE // q.itemsize)
    krow = np.empty(D, k.dtype)
    vrow = np.empty(Dv, k.dtype)
    dk_acc = np.empty(D, k.dtype)
    dv_acc = np.empty(Dv, k.dtype)
    for t in range(t0, t1):
        bkv = t // (Hkv * Nk)
        r = t - bkv * (Hkv * Nk)
        hk = r // Nk
        j = r - hk * Nk
        for d in range(D):
            krow[d] = k[bkv, hk, j, d] * scale
            dk_acc[d] = zero
        for d in range(Dv):
            vrow[d] = v[bkv, hk, j, d]
            dv_acc[d] = zero
        for g in range(group):
            h = hk * group + g
            lh = h if lay_heads > 1 else 0
            row = lh * Nk + j
            for bi in range(nb):
                b = bi if Bk == 1 else bkv
                p = indptr[row]
                end = indptr[row + 1]
                while p + 3 < end:  # four queries per step (see _rows)
                    if ahead > 0:
                        prefetch_rows(q, b, h, indices, p + ahead, last, line)
                        prefetch_rows(dout, b, h, indices, p + ahead, last, line)
                    i0, i1, i2, i3 = indices[p], indices[p + 1], indices[p + 2], indices[p + 3]
                    s0, s1, s2, s3 = dot4(krow, q, b, h, i0, i1, i2, i3, zero)
                    d0, d1, d2, d3 = dot4(vrow, dout, b, h, i0, i1, i2, i3, zero)
                    r0 = fast_exp(s0 - lse_eff[b, h, i0])
                    r1 = fast_exp(s1 - lse_eff[b, h, i1])
                    r2 = fast_exp(s2 - lse_eff[b, h, i2])
                    r3 = fast_exp(s3 - lse_eff[b, h, i3])
                    axpy4(dv_acc, dout, b, h, i0, i1, i2, i3, r0, r1, r2, r3)
                    axpy4(dk_acc, q, b, h, i0, i1, i2, i3, r0 * (d0 - delta[b, h, i0]),
                          r1 * (d1 - delta[b, h, i1]), r2 * (d2 - delta[b, h, i2]),
                          r3 * (d3 - delta[b, h, i3]))
                    p += 4
                for p in range(p, end):
                    i = indices[p]
                    pr = fast_exp(dot1(krow, q, b, h, i, zero) - lse_eff[b, h, i])
                    axpy1(dv_acc, dout, b, h, i, pr)
                    axpy1(dk_acc, q, b, h, i, pr * (dot1(vrow, dout, b, h, i, zero) - delta[b, h, i]))
        for d in range(D):
            dk[bkv, hk, j, d] = dk_acc[d] * scale
        for d in range(Dv):
            dv[bkv, hk, j, d] = dv_acc[d]


@njit(parallel=True, cache=True)
def csr_dkdv(q, k, v, dout, lse_eff, delta, indptr, indices, lay_heads, scale, chunk_starts, dk, dv,
             ahead):
    """Pass 2 on the transposed token layout."""
    for c in prange(chunk_starts.shape[0] - 1):
        _csr_dkdv_tasks(chunk_starts[c], chunk_starts[c + 1], q, k, v, dout, lse_eff, delta, indptr,
                        indices, lay_heads, scale, dk, dv, ahead)



@njit(parallel=True, cache=True)
def csr_backward_by_head(q, k, v, out, lse, dout, indptr, indices, tindptr, tindices, lay_heads,
                         scale, dq, dk, dv, delta, lse_eff, ahead_q, ahead_k, pieces):
    """Both token-level passes one key/value head at a time, all threads on it: pass 1 over the
    rows of each query head that reads it (each batch too when k/v are broadcast), then pass 2
    over its keys. The rows gathered at any moment then lie in one head's K and V (pass 1) or
    its group's q and dout (pass 2), not in those of as many heads as threads: scattered rows
    (top-k, LSH) of long sequences hit the shared L3 more often (see forward.csr_forward_by_head)."""
    B, Hq, Nq, _ = q.shape
    Bk, Hkv, Nk, _ = k.shape
    group = Hq // Hkv
    nb = B if Bk == 1 else 1
    for bkv in range(Bk):
        for hk in range(Hkv):
            for g in range(group * nb):
                h = hk * group + g % group
                b = g // group if Bk == 1 else bkv
                row0 = (h if lay_heads > 1 else 0) * Nq
                t0 = (b * Hq + h) * Nq
                for pc in prange(pieces):
                    r0, r1 = _piece_rows(indptr, row0, Nq, pc, pieces)
                    _csr_dq_tasks(t0 + r0, t0 + r1, q, k, v, out, lse, dout, indptr, indices,
                                  lay_heads, scale, dq, delta, lse_eff, ahead_q)
            krow0 = (hk * group if lay_heads > 1 else 0) * Nk  # the group's first head: its work
            t0 = (bkv * Hkv + hk) * Nk
            for pc in prange(pieces):
                r0, r1 = _piece_rows(tindptr, krow0, Nk, pc, pieces)
                _csr_dkdv_tasks(t0 + r0, t0 + r1, q, k, v, dout, lse_eff, delta, tindptr,
                                tindices, lay_heads, scale, dk, dv, ahead_k)

# ----------------------------------------------------------------------------- exact (float64)


@njit(parallel=True, cache=True)
def _exact_dq(q, k, v, dout, indptr, indices, lay_heads, scale, chunk_starts, dq, m64, l64, d64):
    """Pass 1 of :func:`exact_backward`: per (batch, head, query) its maximum score ``m64``, sum
    ``l64 = sum exp(s - m)``, ``delta = dout . out`` with ``out`` recomputed, and ``dq``."""
    B, Hq, Nq, D = q.shape
    Bk, Hkv, Nk, _ = k.shape
    Dv = v.shape[3]
    group = Hq // Hkv
    for c in prange(chunk_starts.shape[0] - 1):
        o = np.empty(Dv, np.float64)
        acc = np.empty(D, np.float64)
        for t in range(chunk_starts[c], chunk_starts[c + 1]):
            b, h, i, lh, bkv, hk = task_coords(t, Nq, Hq, lay_heads, Bk, group)
            row = lh * Nq + i
            p0, p1 = indptr[row], indptr[row + 1]
            m = -np.inf
            for p in range(p0, p1):
                s = _exact_score(q, k, b, h, i, bkv, hk, indices[p], scale)
                if s > m or s != s:  # a NaN score sticks: the row's gradients become NaN
                    m = s
            l = 0.0
            for d in range(Dv):
                o[d] = 0.0
            for p in range(p0, p1):
                e = np.exp(_exact_score(q, k, b, h, i, bkv, hk, indices[p], scale) - m)
                l += e
                for d in range(Dv):
                    o[d] += e * np.float64(v[bkv, hk, indices[p], d])
            dl = 0.0
            if p1 > p0:
                for d in range(Dv):
                    dl += np.float64(dout[b, h, i, d]) * o[d]
                dl /= l
            m64[b, h, i] = m
            l64[b, h, i] = l
            d64[b, h, i] = dl
            for d in range(D):
                acc[d] = 0.0
            for p in range(p0, p1):
                j = indices[p]
                pr = np.exp(_exact_score(q, k, b, h, i, bkv, hk, j, scale) - m) / l
                dp = 0.0
                for d in range(Dv):
                    dp += np.float64(dout[b, h, i, d]) * np.float64(v[bkv, hk, j, d])
                ds = pr * (dp - dl)
                for d in range(D):
                    acc[d] += ds * np.float64(k[bkv, hk, j, d])
            for d in range(D):
                dq[b, h, i, d] = acc[d] * scale


@njit(parallel=True, cache=True)
def _exact_dkdv(q, k, v, dout, indptr, indices, lay_heads, scale, chunk_starts, m64, l64, d64,
                dk, dv):
    """Pass 2 of :func:`exact_backward`, key-major over the transposed token layout."""
    B, Hq, Nq, D = q.shape
    Bk, Hkv, Nk, _ = k.shape
    Dv = v.shape[3]
    group = Hq // Hkv
    nb = B if Bk == 1 else 1
    for c in prange(chunk_starts.shape[0] - 1):
        dk_acc = np.empty(D, np.float64)
        dv_acc = np.empty(Dv, np.float64)
        for t in range(chunk_starts[c], chunk_starts[c + 1]):
            bkv = t // (Hkv * Nk)
            r = t - bkv * (Hkv * Nk)
            hk = r // Nk
            j = r - hk * Nk
            for d in range(D):
                dk_acc[d] = 0.0
            for d in range(Dv):
                dv_acc[d] = 0.0
            for g in range(group):
                h = hk * group + g
                row = (h if lay_heads > 1 else 0) * Nk + j
                for bi in range(nb):
                    b = bi if Bk == 1 else bkv
                    for p in range(indptr[row], indptr[row + 1]):
                        i = indices[p]
                        s = _exact_score(q, k, b, h, i, bkv, hk, j, scale)
                        pr = np.exp(s - m64[b, h, i]) / l64[b, h, i]
                        dp = 0.0
                        for d in range(Dv):
                            dp += np.float64(v[bkv, hk, j, d]) * np.float64(dout[b, h, i, d])
                            dv_acc[d] += pr * np.float64(dout[b, h, i, d])
                        ds = pr * (dp - d64[b, h, i])
                        for d in range(D):
                            dk_acc[d] += ds * np.float64(q[b, h, i, d])
            for d in range(D):
                dk[bkv, hk, j, d] = dk_acc[d] * scale
            for d in range(Dv):
                dv[bkv, hk, j, d] = dv_acc[d]


def exact_backward(q, k, v, dout, layout, scale, dq, dk, dv):
    """Gradients in float64 arithmetic on the token form of ``layout``, into ``dq``/``dk``/``dv``.

    Trusts neither ``lse`` nor ``out``: each row's maximum ``m`` and sum ``l`` are recomputed and
    kept apart (``P = exp(s - m) / l``; their sum ``m + log l`` would round ``log l`` away when
    ``|m|`` is huge), and ``out`` is recomputed for ``delta``. Slow (scalar, token by token): the
    fallback for logits beyond what the tiled kernels can resolve.
    """
    lay = layout.to_csr()
    lt = lay.transpose()
    B, Hq, Nq, _ = q.shape
    Bk, Hkv = k.shape[:2]
    lh = lay.heads
    m64 = np.empty((B, Hq, Nq))
    l64 = np.empty((B, Hq, Nq))
    d64 = np.empty((B, Hq, Nq))
    s = float(scale)
    chunks_q = balanced_chunks(_query_costs(lay.row_lengths + 4, lh, B, Hq))
    chunks_k = balanced_chunks(_key_costs(lt.row_lengths + 4, lh, Bk, B, Hq, Hkv))
    _exact_dq(q, k, v, dout, lay.indptr, lay.indices, lh, s, chunks_q, dq, m64, l64, d64)
    _exact_dkdv(q, k, v, dout, lt.indptr, lt.indices, lh, s, chunks_k, m64, l64, d64, dk, dv)
    return dq, dk, dv


def _needs_exact(lse):
    """Whether some finite ``lse`` is too large for ``s - lse`` in its dtype (see ``_EXACT_LSE_ULP``)."""
    if lse.size == 0:
        return False
    a = np.abs(lse)
    a = a[np.isfinite(a)]
    return a.size > 0 and float(a.max()) * float(np.finfo(lse.dtype).eps) > _EXACT_LSE_ULP


# ----------------------------------------------------------------------------- wrapper


def _query_costs(row_work, lay_heads, batch, q_heads):
    """Cost of each (batch, head, row) task of pass 1 from per-row work ``(lay_heads, rows)``."""
    per_head = np.broadcast_to(row_work, (q_heads, row_work.shape[1]))
    return np.broadcast_to(per_head, (batch,) + per_head.shape).reshape(-1)


def _key_costs(row_work, lay_heads, kv_batch, batch, q_heads, kv_heads):
    """Cost of each (kv batch, kv head, key row) task of pass 2: the work of every query head in the
    task's group and, for a broadcast k/v, of every batch element."""
    group = q_heads // kv_heads
    if lay_heads == 1:
        per_kv = np.broadcast_to(group * row_work, (kv_heads, row_work.shape[1]))
    else:
        per_kv = row_work.reshape(kv_heads, group, -1).sum(axis=1)
    reps = batch if kv_batch == 1 else 1
    return np.broadcast_to(per_kv * reps, (kv_batch,) + per_kv.shape).reshape(-1)


def _fused_plan(layout, B, Hq, Bk, Hkv, chunk_starts):
    """Where each tile of the fused pass adds its ``dk``/``dv`` contribution.

    A chunk (a run of query-block tasks, one thread at a time) owns the rows of ``dk``/``dv`` of
    every key block no other chunk touches, and one partial slot for each key block it shares, so
    no two threads ever add into the same memory. Returns ``entry_start`` (first entry of each
    task), ``entry_slot`` (slot of each (task, block) entry, -1 for an owned block),
    ``entry_first`` (1 where the entry is its chunk's first touch of the block: it overwrites,
    so nothing is zeroed beforehand), ``red_ptr``/``red_slots`` (the slots of each key block, in
    chunk order), the slot count, and ``untouched`` (key blocks no entry writes: zeroed apart).
    """
    nbq, nbk = layout.grid
    group = Hq // Hkv
    t = np.arange(B * Hq * nbq, dtype=np.int64)
    b, h, qb = t // (Hq * nbq), (t // nbq) % Hq, t % nbq
    row = (h if layout.heads > 1 else 0) * nbq + qb
    lens = layout.indptr[row + 1] - layout.indptr[row]
    entry_start = np.zeros(t.shape[0] + 1, np.int64)
    np.cumsum(lens, out=entry_start[1:])
    te = np.repeat(t, lens)
    p = layout.indptr[row[te]] + np.arange(te.shape[0], dtype=np.int64) - entry_start[te]
    kv = ((b[te] if Bk > 1 else 0) * Hkv + h[te] // group) * nbk + layout.indices[p]
    n_kv = Bk * Hkv * nbk
    chunk = np.repeat(np.arange(chunk_starts.shape[0] - 1, dtype=np.int64), np.diff(chunk_starts))
    keys, first, entry_key = np.unique(chunk[te] * n_kv + kv, return_index=True,
                                       return_inverse=True)
    entry_first = np.zeros(te.shape[0], np.uint8)
    entry_first[first] = 1  # entries are in the order the chunk runs them
    key_kv = keys % max(n_kv, 1)
    shared = np.bincount(key_kv, minlength=n_kv)[key_kv] > 1  # key blocks of several chunks
    slot_of_key = np.where(shared, np.cumsum(shared) - 1, -1)  # the others: straight into dk/dv
    entry_slot = slot_of_key[entry_key.ravel()]
    slot_kv = key_kv[shared]
    red_slots = np.argsort(slot_kv, kind="stable")  # keys are chunk-major: chunk order kept
    red_ptr = np.zeros(n_kv + 1, np.int64)
    np.cumsum(np.bincount(slot_kv, minlength=n_kv), out=red_ptr[1:])
    untouched = np.ones(n_kv, bool)
    untouched[key_kv] = False
    return (entry_start, entry_slot, entry_first, red_ptr, red_slots, slot_kv.shape[0],
            untouched)


def backward(q, k, v, out, lse, dout, layout, scale):
    """Gradients of sparse attention on the CPU (see :meth:`Backend.backward
    <sparseattn.backends.base.Backend.backward>` for the array forms).

    Parameters
    ----------
    q : ndarray, shape (B, Hq, Nq, D)
    k : ndarray, shape (Bk, Hkv, Nk, D), ``Bk`` in ``(1, B)``
    v : ndarray, shape (Bk, Hkv, Nk, Dv)
    out, dout : ndarray, shape (B, Hq, Nq, Dv)
    lse : ndarray, shape (B, Hq, Nq)
    layout : CSRLayout or BlockCSRLayout
        Shape ``(Nq, Nk)``, 1 or ``Hq`` heads; its transpose is cached on it for the next call.
    scale : float

    Returns
    -------
    dq, dk, dv : ndarrays shaped like ``q``, ``k``, ``v``, in their dtype
    """
    if not isinstance(layout, (BlockCSRLayout, CSRLayout)):  # the API only passes layouts
        raise TypeError(f"layout must be a CSRLayout or BlockCSRLayout, got {type(layout).__name__}")
    q, k, v, out, lse, dout = (np.ascontiguousarray(x) for x in (q, k, v, out, lse, dout))
    B, Hq, Nq, D = q.shape
    Bk, Hkv, Nk, _ = k.shape
    Dv = v.shape[3]
    dtype = q.dtype
    if q.size == 0 or k.size == 0 or B == 0:  # nothing attends: zero gradients
        return np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    dq = np.empty_like(q)  # every kernel path writes every element
    dk = np.empty_like(k)
    dv = np.empty_like(v)
    if _needs_exact(lse):  # logits beyond what s - lse resolves in this dtype: see the module doc
        return exact_backward(q, k, v, dout, layout, scale, dq, dk, dv)
    scale = dtype.type(scale)
    lh = layout.heads
    if isinstance(layout, BlockCSRLayout):
        bq, bk = layout.block_size
        nbq, nbk = layout.grid
        runs_k = max(1, config.CPU_MAX_KEY_TILE // bk)  # blocks per wide tile, as in the forward
        runs_q = max(1, config.CPU_MAX_KEY_TILE // bq)
        work_q = np.diff(layout.indptr).reshape(lh, nbq) + 1
        chunks_q = balanced_chunks(_query_costs(work_q, lh, B, Hq))
        plan = _fused_plan(layout, B, Hq, Bk, Hkv, chunks_q)
        entry_start, entry_slot, entry_first, red_ptr, red_slots, n_slots, untouched = plan
        if n_slots <= config.CPU_BACKWARD_MAX_PARTIALS * Bk * Hkv * nbk:
            pdk = np.empty((n_slots, bk, D), dtype)  # every slot's first touch overwrites it
            pdv = np.empty((n_slots, bk, Dv), dtype)
            if untouched.any():  # key blocks no query attends: zero gradients
                rows = np.repeat(untouched.reshape(Bk * Hkv, nbk), bk, axis=1)[:, :Nk]
                dk.reshape(Bk * Hkv, Nk, D)[rows] = 0
                dv.reshape(Bk * Hkv, Nk, Dv)[rows] = 0
            with blas_single_thread():
                block_fused(q, k, v, out, lse, dout, layout.indptr, layout.indices,
                            layout.mask_index, layout.masks, lh, bq, bk, scale, runs_k, chunks_q,
                            entry_start, entry_slot, entry_first, dq, dk, dv, pdk, pdv)
            reduce_partials(red_ptr, red_slots, pdk, pdv, bk, dk, dv)
            return dq, dk, dv
        # partial buffers too large (e.g. every chunk touches most key blocks): two passes
        delta = np.empty((B, Hq, Nq), dtype)
        lse_eff = np.empty((B, Hq, Nq), dtype)
        lt = layout.transpose()
        work_k = np.diff(lt.indptr).reshape(lh, nbk) + 1
        chunks_k = balanced_chunks(_key_costs(work_k, lh, Bk, B, Hq, Hkv))
        with blas_single_thread():
            block_dq(q, k, v, out, lse, dout, layout.indptr, layout.indices, layout.mask_index,
                     layout.masks, lh, bq, bk, scale, runs_k, chunks_q, dq, delta, lse_eff)
            block_dkdv(q, k, v, dout, lse_eff, delta, lt.indptr, lt.indices, lt.mask_index, lt.masks,
                       lh, bq, bk, scale, runs_q, chunks_k, dk, dv)
    else:
        delta = np.empty((B, Hq, Nq), dtype)
        lse_eff = np.empty((B, Hq, Nq), dtype)
        lt = layout.transpose()
        work_q = layout.row_lengths + 4
        work_k = lt.row_lengths + 4
        chunks_q = balanced_chunks(_query_costs(work_q, lh, B, Hq))
        chunks_k = balanced_chunks(_key_costs(work_k, lh, Bk, B, Hq, Hkv))
        # scattered rows (top-k, LSH) defeat the hardware prefetchers, in both passes
        ahead_q = config.CSR_PREFETCH_AHEAD if scattered(layout) else 0
        ahead_k = config.CSR_PREFETCH_AHEAD if scattered(lt) else 0
        if ahead_q and one_head_at_a_time(k, v, Nq):
            csr_backward_by_head(q, k, v, out, lse, dout, layout.indptr, layout.indices, lt.indptr,
                                 lt.indices, lh, scale, dq, dk, dv, delta, lse_eff, ahead_q, ahead_k,
                                 num_threads())
            return dq, dk, dv
        csr_dq(q, k, v, out, lse, dout, layout.indptr, layout.indices, lh, scale, chunks_q, dq, delta,
               lse_eff, ahead_q)
        csr_dkdv(q, k, v, dout, lse_eff, delta, lt.indptr, lt.indices, lh, scale, chunks_k, dk, dv,
                 ahead_k)
    return dq, dk, dv
