"""Dense masked-softmax attention in float64 NumPy: the oracle every test compares against.

It builds the ``(B, Hq, Nq, Nk)`` score array on purpose, so it is for tests and small inputs only.
"""

from __future__ import annotations

import numpy as np

from .base import Backend


def _expand_kv(x, hq):
    """(Bk, Hkv, N, D) -> (Bk, Hq, N, D): query head h reads kv head h // (Hq // Hkv)."""
    group = hq // x.shape[1]
    return np.repeat(x, group, axis=1)


def _mask(layout):
    return layout.to_dense()[None]  # (1, heads, Nq, Nk), heads broadcast over Hq when 1


def _probabilities(q, k, layout, scale):
    """Masked softmax probabilities, lse, all in float64; empty rows give P = 0, lse = -inf."""
    q64, k64 = q.astype(np.float64), _expand_kv(k.astype(np.float64), q.shape[1])
    scores = np.einsum("bhqd,bhkd->bhqk", q64, k64) * scale
    mask = _mask(layout)
    scores = np.where(mask, scores, -np.inf)
    m = scores.max(axis=-1, keepdims=True) if scores.shape[-1] else np.full(scores.shape[:-1] + (1,), -np.inf)
    m_safe = np.where(np.isfinite(m), m, 0.0)
    p = np.exp(scores - m_safe)
    l = p.sum(axis=-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = np.where(l > 0, p / np.where(l > 0, l, 1.0), 0.0)
        lse = np.where(l > 0, m_safe + np.log(np.where(l > 0, l, 1.0)), -np.inf)[..., 0]
    # a NaN score (NaN in q or k), a +inf one (inf - inf), or only -inf scores on a row that has
    # keys (inf in q or k) make the row NaN, never "no key"
    bad = (np.isnan(scores).any(axis=-1, keepdims=True) | (m == np.inf)
           | ((m == -np.inf) & mask.any(axis=-1, keepdims=True)))
    if bad.any():  # NaN on the row's allowed pairs only: masked ones stay 0 for the gradients
        p = np.where(bad & mask, np.nan, p)
        lse = np.where(bad[..., 0], np.nan, lse)
    return p, lse


def _allowed_sum(w, x, mask):
    """``sum_j w[..., i, j] x[..., j, :]`` over the *allowed* pairs (``mask[..., i, j]``) only.

    A NaN/inf row of ``x`` that a row ``i`` may not see must not reach it through ``0 * NaN`` (a
    masked-out key's value or key, a masked-out query's gradient); one it may see propagates as
    IEEE arithmetic does.
    """
    finite = np.isfinite(x)
    if finite.all():
        return np.einsum("bhqk,bhkd->bhqd", w, x)
    out = np.einsum("bhqk,bhkd->bhqd", w, np.where(finite, x, 0.0))
    bad = ~finite.all(axis=-1)  # (B, H, N): only the rows of x with a non-finite entry
    bi, hi, ji = np.nonzero(bad)
    for b, h, j in zip(bi.tolist(), hi.tolist(), ji.tolist()):
        seen = mask[min(b, mask.shape[0] - 1), min(h, mask.shape[1] - 1), :, j]
        with np.errstate(invalid="ignore"):
            extra = w[b, h, :, j, None] * np.where(finite[b, h, j], 0.0, x[b, h, j])
        out[b, h] += np.where(seen[:, None], extra, 0.0)
    return out


class ReferenceBackend(Backend):
    """Dense NumPy oracle (float64 internally)."""

    name = "reference"
    block_size = None

    def forward(self, q, k, v, layout, scale):
        p, lse = _probabilities(q, k, layout, scale)
        v64 = _expand_kv(v.astype(np.float64), q.shape[1])
        out = _allowed_sum(p, v64, _mask(layout))
        return out.astype(q.dtype), lse.astype(q.dtype)

    def backward(self, q, k, v, out, lse, dout, layout, scale):
        p, _ = _probabilities(q, k, layout, scale)
        hq, hkv = q.shape[1], k.shape[1]
        q64 = q.astype(np.float64)
        k64 = _expand_kv(k.astype(np.float64), hq)
        v64 = _expand_kv(v.astype(np.float64), hq)
        do64 = dout.astype(np.float64)
        mask = _mask(layout)
        mask_t = mask.swapaxes(-1, -2)
        # every product sums over allowed pairs only (see _allowed_sum): a NaN in a masked-out
        # key, value, query or output gradient must not leak into a gradient through 0 * NaN
        o64 = _allowed_sum(p, v64, mask)  # recomputed: the oracle trusts nothing given
        dv = _allowed_sum(p.swapaxes(-1, -2), do64, mask_t)
        with np.errstate(invalid="ignore"):
            dp = np.einsum("bhqd,bhkd->bhqk", do64, v64)
            delta = (do64 * o64).sum(-1, keepdims=True)
            ds = np.where(mask, p * (dp - delta), 0.0)
        dq = _allowed_sum(ds, k64, mask) * scale
        dk = _allowed_sum(ds.swapaxes(-1, -2), q64, mask_t) * scale

        def fold(g, like):
            b = g.shape[0]
            g = g.reshape(b, hkv, hq // hkv, *g.shape[2:]).sum(axis=2)
            if like.shape[0] == 1 and b != 1:
                g = g.sum(axis=0, keepdims=True)
            return g.astype(like.dtype)

        return dq.astype(q.dtype), fold(dk, k), fold(dv, v)
