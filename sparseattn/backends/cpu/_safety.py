"""When the fast CPU kernels can be trusted, and what runs instead when they cannot.

For finite, ordinary inputs the tiled kernels are exact. Two kinds of input break them, and both
show in their results, so both are caught after the call, at the cost of one pass over ``out``
and one over ``lse``, far below the kernel's:

* non-finite ``q``, ``k`` or ``v``: a tile product multiplies the masked-out keys of a partial
  block by a zero weight, and ``0 * NaN`` would leak a masked-out key's NaN value into rows that
  never see it; an allowed NaN/inf score makes its row's sum NaN. Either way some ``out`` or
  ``lse`` is NaN/inf (:func:`all_finite` of ``out``, :func:`suspect_rows`). A bad entry that no
  kernel reads changes nothing, as it should.
* logits so large that ``scale * q . k`` overflows (``|logit|`` near the float's maximum): the
  row's running maximum becomes ``+inf`` or every score ``-inf``, so a row *with* allowed keys
  ends with ``lse = -inf``, ``+inf`` or NaN (:func:`suspect_rows`).

Either way the CPU backend recomputes with :func:`exact_forward`: a plain token-level kernel that
accumulates in float64 (a float32 ``q . k`` cannot overflow there), touches only the allowed keys
and turns a NaN or ``+inf`` score into a NaN row. It is slower than the tiled kernels, and runs
only for such inputs. (Checking ``out`` rather than ``k`` and ``v`` beforehand reads half as much
for self-attention and keeps the check's cost linear in N where ``k``/``v`` fall out of cache.)
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ...layout import BlockCSRLayout

from ._tasks import task_coords
from ._threads import balanced_chunks

__all__ = ["all_finite", "exact_forward", "exact_score", "row_has_keys", "suspect_rows"]

#: elements checked per step: bounds the boolean temporary of ``np.isfinite`` (4 MiB)
_CHUNK = 1 << 22


def all_finite(*arrays):
    """Whether every element of every (C-contiguous float) array is finite.

    NumPy's SIMD ``isfinite`` by chunks: about 1 ms per million elements, a few per cent of an
    attention call (a Numba reduction was 10x slower: it did not vectorise).
    """
    for x in arrays:
        flat = x.reshape(-1)
        for i in range(0, flat.shape[0], _CHUNK):
            if not np.isfinite(flat[i : i + _CHUNK]).all():
                return False
    return True


def row_has_keys(layout):
    """Boolean ``(layout.heads, n_q)``: which query rows allow at least one key (cached)."""
    cached = layout._cache.get("row_has_keys")
    if cached is not None:
        return cached
    n_q = layout.n_q
    if isinstance(layout, BlockCSRLayout):
        bq, _ = layout.block_size
        nbq, _ = layout.grid
        n_rows = layout.heads * nbq
        rows = np.repeat(np.arange(n_rows, dtype=np.int64), np.diff(layout.indptr))
        has = np.zeros((n_rows, bq), bool)
        full = layout.mask_index < 0
        has[rows[full]] = True  # a stored full block: every (in-range) row sees a key
        partial = ~full
        if partial.any():  # a partial block: the rows of its mask with an allowed element
            hits = layout.masks.any(axis=2)[layout.mask_index[partial]]
            np.logical_or.at(has, rows[partial], hits)
        has = has.reshape(layout.heads, nbq * bq)[:, :n_q]
    else:
        has = np.diff(layout.indptr).reshape(layout.heads, n_q) > 0
    has = np.ascontiguousarray(has)
    has.flags.writeable = False
    layout._cache["row_has_keys"] = has  # a benign race: every thread stores the same value
    return has


def suspect_rows(layout, lse):
    """Whether some row's ``lse`` ``(B, Hq, Nq)`` cannot be right: NaN, ``+inf``, or ``-inf`` on a
    row that allows keys (the maximum of finite scores gives at least ``exp(0) = 1``)."""
    if lse.size == 0:
        return False
    if np.isnan(lse).any() or np.isposinf(lse).any():
        return True
    empty = np.isneginf(lse)
    if not empty.any():
        return False
    return bool((empty & row_has_keys(layout)[None]).any())  # heads 1 broadcasts over Hq


@njit(cache=True)
def exact_score(q, k, b, h, i, bkv, hk, j, scale):
    """``scale * q_i . k_j`` in float64: the exact forward and both exact backward passes call
    this, so they all see the same bits."""
    s = 0.0
    for d in range(q.shape[3]):
        s += np.float64(q[b, h, i, d]) * np.float64(k[bkv, hk, j, d])
    return s * scale


@njit(parallel=True, cache=True)
def _exact_csr_forward(q, k, v, indptr, indices, lay_heads, scale, chunk_starts, out, lse):
    """One task per (batch, head, query); a two-pass softmax over the row's keys in float64."""
    B, Hq, Nq, D = q.shape
    Bk, Hkv, Nk, _ = k.shape
    Dv = v.shape[3]
    group = Hq // Hkv
    for c in prange(chunk_starts.shape[0] - 1):
        acc = np.empty(Dv, np.float64)
        for t in range(chunk_starts[c], chunk_starts[c + 1]):
            b, h, i, lh, bkv, hk = task_coords(
                t, Nq, Hq, lay_heads, Bk, group)
            row = lh * Nq + i
            p0, p1 = indptr[row], indptr[row + 1]
            if p0 == p1:
                for d in range(Dv):
                    out[b, h, i, d] = 0.0
                lse[b, h, i] = -np.inf
                continue
            m = -np.inf
            bad = False
            for p in range(p0, p1):
                s = exact_score(q, k, b, h, i, bkv, hk, indices[p], scale)
                if s != s or s == np.inf:  # NaN (NaN in q/k) or +inf (inf in q/k): NaN row
                    bad = True
                elif s > m:
                    m = s
            if bad:
                for d in range(Dv):
                    out[b, h, i, d] = np.nan
                lse[b, h, i] = np.nan
                continue
            for d in range(Dv):
                acc[d] = 0.0
            l = 0.0
            if m > -np.inf:  # (every score -inf: each key's weight is exp(-inf) = 0)
                for p in range(p0, p1):
                    e = np.exp(exact_score(q, k, b, h, i, bkv, hk, indices[p], scale) - m)
                    l += e
                    for d in range(Dv):
                        # every allowed key counts, even at weight 0: a NaN value stays visible
                        acc[d] += e * np.float64(v[bkv, hk, indices[p], d])
            if l > 0.0:
                for d in range(Dv):
                    out[b, h, i, d] = acc[d] / l
                lse[b, h, i] = m + np.log(l)
            else:
                for d in range(Dv):
                    out[b, h, i, d] = np.nan
                lse[b, h, i] = np.nan


def exact_forward(q, k, v, layout, scale, out, lse):
    """The forward pass by :func:`_exact_csr_forward` into ``out`` / ``lse``; returns them."""
    lay = layout.to_csr()
    B, Hq, Nq, _ = q.shape
    work = np.broadcast_to(lay.row_lengths + 4, (Hq, Nq)) if lay.heads == 1 else lay.row_lengths + 4
    chunks = balanced_chunks(np.ascontiguousarray(np.broadcast_to(work, (B, Hq, Nq)).reshape(-1)))
    _exact_csr_forward(q, k, v, lay.indptr, lay.indices, lay.heads, float(scale), chunks, out, lse)
    return out, lse

