"""Exact top-k selection: each query keeps the keys of largest ``q . k``."""

from __future__ import annotations

import numpy as np

from .._validation import check_memory
from ..api import resolve_layout
from ._common import check_count, check_flag, prepare_qk

__all__ = ["topk"]


def _check_no_overflow(be, qh, kh):
    """Refuse inputs whose scores could overflow: |q . k| <= |q| |k| bounds every partial sum,
    so below half the dtype's largest value no score (hence no comparison) meets inf or NaN."""
    xp = be.xp
    if qh.size == 0 or kh.size == 0:
        return
    qmax = float(xp.sqrt((qh.astype(np.float64) ** 2).sum(-1)).max())
    kmax = float(xp.sqrt((kh.astype(np.float64) ** 2).sum(-1)).max())
    limit = float(np.finfo(qh.dtype).max) / 2
    if qmax * kmax >= limit:
        raise ValueError(
            f"q and k are too large: the largest |q| * |k| = {qmax * kmax:.3g} can overflow "
            f"{qh.dtype} scores (limit {limit:.3g}); scale them down (the ranking does not change)"
        )


def topk(q, k, top_k, within=None, causal=False, backend=None):
    """The exact ``top_k`` keys of every query by dot product, as a layout.

    Parameters
    ----------
    q : array, shape (..., Hq, Nq, D)
    k : array, shape (..., Hkv, Nk, D)
        ``Hq`` must be a multiple of ``Hkv``: query head ``h`` ranks the keys of key head
        ``h // (Hq // Hkv)`` (GQA/MQA). A layout has no batch axis, so leading dimensions must all
        be 1 (select once per batch element). float16/32/64; must be finite.
    top_k : int
        Keys kept per query, ``>= 1``. A query with fewer candidates keeps all of them.
    within : pattern, CSRLayout or BlockCSRLayout, optional
        Restrict each query's candidates to the keys this pattern or layout allows (shape
        ``(Nq, Nk)``, 1 or ``Hq`` heads), e.g. top-k inside a window. Default: all keys.
    causal : bool, default False
        Only keys ``j <= i + Nk - Nq`` (bottom-right aligned, as :func:`sparseattn.attention`'s
        causal patterns): with ``Nq == Nk``, key ``j <= i``.
    backend : str, optional
        Backend whose kernels run the selection (see :func:`sparseattn.use_backend`).

    Returns
    -------
    CSRLayout
        Shape ``(Nq, Nk)``, ``heads = Hq``; row ``(h, i)`` holds ``min(top_k, candidates)`` keys,
        sorted by position. It feeds :func:`sparseattn.attention` directly and combines with
        other layouts by ``|`` and ``&``.

    Notes
    -----
    *Ties* are broken by position: among keys of equal score the lower key index wins, so the
    result is unique and deterministic. Scores are computed in the compute dtype (float32 for
    float16/float32 inputs) by blocked products; two keys whose exact scores differ by less than
    that rounding may be ranked either way, as with any float32 top-k.

    *Cost*: the scale of ``q . k`` does not change the ranking, so none is taken. Without
    ``within`` the CPU kernel scores ``config.TOPK_BLOCK_SIZE`` tiles (128 queries x 256 keys)
    with one BLAS product each and streams every row through a buffer of about ``2 * top_k``
    candidates: a key enters only if it beats the ``top_k``-th best score seen at the last cut,
    and a full buffer is cut back to ``top_k`` (quickselect). Time ``O(Hq * Nq * Nk * D)`` (half
    with ``causal``; exact selection must score every pair, so the floor is the machine's GEMM
    rate), memory ``O(Hq * Nq * top_k)``, never an ``Nq x Nk`` array. With ``within`` only its
    keys are scored: ``O(nnz(within) * D)``.

    Examples
    --------
    >>> import numpy as np, sparseattn as sa
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((2, 128, 16), dtype=np.float32) for _ in range(3))
    >>> lay = sa.select.topk(q, k, top_k=8, causal=True)
    >>> lay.heads, int(lay.row_lengths.max())
    (2, 8)
    >>> sa.attention(q, k, v, lay).shape
    (2, 128, 16)
    """
    top_k = check_count(top_k, "top_k")
    causal = check_flag(causal, "causal")
    be, qh, kh, info = prepare_qk(q, k, backend, "select.topk")
    top_k = min(top_k, max(info["nk"], 1))  # more than Nk keeps every key: no oversized buffers
    check_memory(info["hq"] * info["nq"] * top_k * 8, "select.topk's layout (Hq * Nq * top_k keys)")
    _check_no_overflow(be, qh, kh)
    lay = None
    if within is not None:
        lay = resolve_layout(within, info["nq"], info["nk"], info["hq"], None, name="within").to_csr()
    # no row has more than Nk candidates: a larger top_k selects the same keys, and clamping
    # keeps the per-query buffers (about 2 * top_k pairs) from growing past the key count
    top_k = min(top_k, max(info["nk"], 1))
    return be.topk(qh, kh, top_k, lay, causal)
