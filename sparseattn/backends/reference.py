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
    if bad.any():
        p = np.where(bad, np.nan, p)
        lse = np.where(bad[..., 0], np.nan, lse)
    return p, lse


def _weighted_values(p, v64, layout):
    """``sum_j p[j] v[j]`` over the *allowed* keys only: a NaN/inf value of a masked-out key must
    not reach a row through ``0 * NaN``; one of an allowed key propagates as IEEE arithmetic does."""
    finite = np.isfinite(v64)
    if finite.all():
        return np.einsum("bhqk,bhkd->bhqd", p, v64)
    out = np.einsum("bhqk,bhkd->bhqd", p, np.where(finite, v64, 0.0))
    mask = _mask(layout)[..., None]
    bad_v = np.where(finite, 0.0, v64)[:, :, None]  # (B, H, 1, Nk, Dv)
    with np.errstate(invalid="ignore"):
        extra = np.where(mask, p[..., None] * bad_v, 0.0).sum(axis=-2)
    return out + extra


class ReferenceBackend(Backend):
    """Dense NumPy oracle (float64 internally)."""

    name = "reference"
    block_size = None

    def forward(self, q, k, v, layout, scale):
        p, lse = _probabilities(q, k, layout, scale)
        v64 = _expand_kv(v.astype(np.float64), q.shape[1])
        out = _weighted_values(p, v64, layout)
        return out.astype(q.dtype), lse.astype(q.dtype)

    def backward(self, q, k, v, out, lse, dout, layout, scale):
        p, _ = _probabilities(q, k, layout, scale)
        hq, hkv = q.shape[1], k.shape[1]
        q64 = q.astype(np.float64)
        k64 = _expand_kv(k.astype(np.float64), hq)
        v64 = _expand_kv(v.astype(np.float64), hq)
        do64 = dout.astype(np.float64)
        o64 = np.einsum("bhqk,bhkd->bhqd", p, v64)  # recomputed: the oracle trusts nothing given
        dv = np.einsum("bhqk,bhqd->bhkd", p, do64)
        dp = np.einsum("bhqd,bhkd->bhqk", do64, v64)
        delta = (do64 * o64).sum(-1, keepdims=True)
        ds = p * (dp - delta)
        dq = np.einsum("bhqk,bhkd->bhqd", ds, k64) * scale
        dk = np.einsum("bhqk,bhqd->bhkd", ds, q64) * scale

        def fold(g, like):
            b = g.shape[0]
            g = g.reshape(b, hkv, hq // hkv, *g.shape[2:]).sum(axis=2)
            if like.shape[0] == 1 and b != 1:
                g = g.sum(axis=0, keepdims=True)
            return g.astype(like.dtype)

        return dq.astype(q.dtype), fold(dk, k), fold(dv, v)
