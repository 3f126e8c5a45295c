"""Routing-Transformer-style selection by spherical k-means (Roy, Saffar, Vaswani & Grangier, 2021)."""

from __future__ import annotations

import math

import numpy as np

from ._common import check_count, check_flag, prepare_qk, unit_rows

__all__ = ["routing", "init_centroids"]


def init_centroids(q_unit, k_unit, n_clusters, seed=0, xp=np):
    """The starting centroids :func:`routing` draws from ``seed``: per query head ``h``,
    ``n_clusters`` distinct points picked uniformly from its unit queries and the unit keys of its
    key head (``numpy.random.default_rng(seed)``, heads in order). Returns ``(Hq, C, D)``.
    ``xp``: the array module of ``q_unit`` and ``k_unit`` (device arrays stay on the device: only
    the picked rows are gathered, the picks are drawn on the host)."""
    hq, nq, d = q_unit.shape
    hkv, nk, _ = k_unit.shape
    group = hq // hkv
    rng = np.random.default_rng(seed)
    out = xp.empty((hq, n_clusters, d), q_unit.dtype)
    for h in range(hq):  # a loop over heads, not tokens
        pick = rng.choice(nq + nk, size=n_clusters, replace=False)
        iq = np.flatnonzero(pick < nq)
        ik = np.flatnonzero(pick >= nq)
        out[h, xp.asarray(iq)] = q_unit[h, xp.asarray(pick[iq])]
        out[h, xp.asarray(ik)] = k_unit[h // group, xp.asarray(pick[ik] - nq)]
    return out


def routing(q, k, n_clusters, seed=0, causal=False, iters=10, centroids=None,
            return_centroids=False, capacity_factor=2.0, backend=None):
    """Routing Transformer's layout: queries attend to the keys of their k-means cluster.

    Queries and keys are scaled to unit length and clustered together, per query head, by
    spherical k-means (assignment by largest cosine similarity, each centroid the normalised sum
    of its points). Query ``i`` of head ``h`` then sees the keys of its own cluster. Every query
    belongs to exactly one cluster; a cluster's key list is *capped*: it keeps at most
    ``capacity = ceil(capacity_factor * Nk / n_clusters)`` keys, those closest to the centroid
    (ties: lower key), so no row holds more than ``capacity`` keys however unbalanced the
    clusters, and the layout at most ``Hq * Nq * capacity`` pairs.

    Parameters
    ----------
    q : array, shape (..., Hq, Nq, D)
    k : array, shape (..., Hkv, Nk, D)
        Query head ``h`` clusters with, and selects from, key head ``h // (Hq // Hkv)``.
        Leading dimensions must be 1 (a layout has no batch axis).
    n_clusters : int
        Clusters per head, ``1 <= n_clusters <= Nq + Nk`` when drawn from ``seed``. The Routing
        Transformer uses about ``sqrt(N)``.
    seed : int, default 0
        Seeds :func:`init_centroids` (unused when ``centroids`` is given).
    causal : bool, default False
        Keep only keys ``j <= i + Nk - Nq`` (an early query may then have none: pair with a local
        pattern, e.g. ``layout | sa.patterns.sliding_window(w).layout(...)``, as the paper does).
    iters : int, default 10
        k-means iterations (``>= 0``) before the final assignment; with reused ``centroids`` one
        or two refine them for the new inputs, and 0 only assigns.
    centroids : array, shape (Hq, C, D) or (C, D), optional
        Starting centroids, e.g. those returned by the previous step; normalised on entry.
    return_centroids : bool, default False
        Also return the final centroids.
    capacity_factor : float or None, default 2.0
        Cluster key lists are capped at ``ceil(capacity_factor * Nk / n_clusters)`` keys;
        ``None`` keeps every key (rows then as long as the largest cluster).
    backend : str, optional

    Returns
    -------
    layout : CSRLayout
        Shape ``(Nq, Nk)``, ``heads = Hq``, keys sorted per row.
    centroids : ndarray, shape (Hq, C, D)
        Only with ``return_centroids``: unit centroids in the compute dtype, to pass back as
        ``centroids=`` on the next step.

    Notes
    -----
    The paper keeps centroids as an exponential moving average updated during training and
    balances clusters by taking the top ``N / C`` tokens per centroid; here the clustering is
    recomputed from the inputs (or refined from given centroids), and balancing is the cap
    above. The assignment is one ``(N x D) @ (D x C)`` product per head and iteration; all
    results are deterministic for a given seed.

    Examples
    --------
    >>> import numpy as np, sparseattn as sa
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((2, 256, 16), dtype=np.float32) for _ in range(3))
    >>> lay, cent = sa.select.routing(q, k, n_clusters=8, return_centroids=True)
    >>> cent.shape
    (2, 8, 16)
    >>> lay2 = sa.select.routing(q, k, n_clusters=8, centroids=cent, iters=1)
    >>> out = sa.attention(q, k, v, lay2)
    """
    n_clusters = check_count(n_clusters, "n_clusters")
    iters = check_count(iters, "iters", 0)
    causal = check_flag(causal, "causal")
    return_centroids = check_flag(return_centroids, "return_centroids")
    be, qh, kh, info = prepare_qk(q, k, backend, "select.routing")
    xp = be.xp
    hq, nq, nk, d = info["hq"], info["nq"], info["nk"], info["d"]
    if capacity_factor is None:
        capacity = max(nk, 1)
    else:
        try:
            cf = float(capacity_factor)
        except (TypeError, ValueError):
            raise TypeError(f"capacity_factor must be a number or None, got {capacity_factor!r}") from None
        if not (cf > 0 and math.isfinite(cf)):
            raise ValueError(f"capacity_factor must be finite and positive, got {capacity_factor!r}")
        raw = cf * nk / n_clusters
        capacity = max(1, nk if raw >= nk else math.ceil(raw))  # no cluster holds more than Nk
    qn, kn = unit_rows(xp, qh), unit_rows(xp, kh)
    if centroids is None:
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, (bool, np.bool_)):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        if n_clusters > nq + nk:
            raise ValueError(
                f"n_clusters={n_clusters} exceeds the {nq + nk} queries and keys to draw centroids "
                f"from (q {tuple(np.shape(q))}, k {tuple(np.shape(k))}); pass centroids= instead"
            )
        cent = init_centroids(qn, kn, n_clusters, seed, xp=xp)  # no copy of q and k to the host
    else:
        cent = np.asarray(be.to_numpy(be.asarray(centroids)))
        if cent.ndim == 2:
            cent = np.broadcast_to(cent, (hq,) + cent.shape)
        if cent.shape != (hq, n_clusters, d):
            raise ValueError(
                f"centroids must have shape (Hq, n_clusters, D) = {(hq, n_clusters, d)} or "
                f"(n_clusters, D), got {np.shape(centroids)}"
            )
        if not np.issubdtype(cent.dtype, np.floating) or not np.isfinite(cent).all():
            raise ValueError(f"centroids must be finite floats, got dtype {cent.dtype}")
    cent = unit_rows(xp, xp.asarray(be.asarray(cent), dtype=qh.dtype))
    for _ in range(iters):
        q_labels, _ = be.kmeans_assign(qn, cent)
        k_labels, _ = be.kmeans_assign(kn, cent)
        cent = be.kmeans_update(qn, kn, q_labels, k_labels, cent)
    q_labels, _ = be.kmeans_assign(qn, cent)
    k_labels, k_sims = be.kmeans_assign(kn, cent)
    layout = be.routing_select(q_labels, k_labels, k_sims, n_clusters, capacity, causal)
    if return_centroids:
        return layout, be.to_numpy(cent)
    return layout
