"""Reformer-style angular LSH selection (Kitaev, Kaiser & Levskaya, 2020)."""

from __future__ import annotations

import numpy as np

from .._validation import check_memory
from ._common import check_count, check_flag, prepare_qk, unit_rows

__all__ = ["lsh", "default_n_buckets", "lsh_rotations"]


def default_n_buckets(n_k, bucket_size):
    """Reformer's choice: about ``2 * n_k / bucket_size`` buckets, even, at least 2.

    Chunks then hold about two buckets' worth of keys on average, so a query whose bucket
    straddles a chunk boundary still finds most of it in its chunk or the previous one.
    """
    return 2 * max(1, int(round(n_k / bucket_size)))


def lsh_rotations(n_hashes, head_dim, n_buckets, seed=0, dtype=np.float64):
    """The random rotations :func:`lsh` draws from ``seed``: standard normal, shape
    ``(n_hashes, head_dim, n_buckets // 2)``, from ``numpy.random.default_rng(seed)``."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n_hashes, head_dim, n_buckets // 2)).astype(dtype, copy=False)


def lsh(q, k, n_hashes, bucket_size, seed=0, causal=False, rotations=None, n_buckets=None,
        backend=None):
    """Reformer's LSH attention layout: each query sees the keys that hash near it.

    For each of ``n_hashes`` rounds ``r``, every query and key vector ``x`` is hashed to the bucket
    ``argmax([x R_r, -x R_r])`` (angular LSH with a random rotation ``R_r``; vectors at a small
    angle tend to share a bucket). The keys are sorted by (bucket, position) and cut into chunks
    of ``bucket_size``; a query is placed where it would sit in that order (at position
    ``i + Nk - Nq``: with ``q`` and ``k`` the same tokens, exactly at its own key) and attends to
    the keys of its chunk and of the previous chunk (chunk 0 wraps around to the last, as in
    Reformer). The layout is the union over rounds, each key listed once.

    Parameters
    ----------
    q : array, shape (..., Hq, Nq, D)
    k : array, shape (..., Hkv, Nk, D)
        Query head ``h`` uses key head ``h // (Hq // Hkv)``. Leading dimensions must be 1 (a
        layout has no batch axis). Queries and keys are hashed with the same rotations (Reformer
        shares ``q`` and ``k``; here they may differ).
    n_hashes : int
        Hash rounds, ``>= 1``. More rounds: higher recall, more keys per query.
    bucket_size : int
        Chunk length in keys, ``>= 1``; a query sees at most ``2 * bucket_size * n_hashes`` keys.
    seed : int, default 0
        Seeds :func:`lsh_rotations`; the same seed gives the same layout.
    causal : bool, default False
        Keep only keys ``j <= i + Nk - Nq``.
    rotations : array, shape (n_hashes, D, n_buckets // 2), optional
        Use these rotations instead of drawing them (e.g. shared across layers or steps);
        they fix ``n_buckets``. Shared by every head.
    n_buckets : int, optional
        Even, ``>= 2``; default :func:`default_n_buckets` ``(Nk, bucket_size)``, about
        ``2 * Nk / bucket_size``, as Reformer recommends.
    backend : str, optional

    Returns
    -------
    CSRLayout
        Shape ``(Nq, Nk)``, ``heads = Hq``, keys sorted per row; feeds
        :func:`sparseattn.attention` and combines with static layouts by ``|`` / ``&``.

    Notes
    -----
    *Relation to Reformer's combination of rounds.* Reformer attends within each round
    separately and mixes the round outputs ``o_r`` with weights ``softmax_r(lse_r)``, after
    subtracting ``log(count)`` from the score of a key found in ``count`` rounds. With that
    correction the mixture is exactly one softmax over the union of the rounds' keys, which is
    what attention over this layout computes (in one pass, each key once). Without the correction
    Reformer weighs a key found in several rounds more; that variant is not reproduced.

    Reformer also masks a token's attention to itself when ``q`` and ``k`` are shared; here ``q``
    and ``k`` are separate inputs and no key is masked. Hashing costs ``O((Nq + Nk) * D *
    n_buckets * n_hashes)`` (tile products); the layout ``O((Nq + Nk) * n_hashes * bucket_size)``.

    Examples
    --------
    >>> import numpy as np, sparseattn as sa
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((1, 256, 16), dtype=np.float32) for _ in range(3))
    >>> lay = sa.select.lsh(q, k, n_hashes=2, bucket_size=32, seed=1)
    >>> bool(lay.row_lengths.max() <= 2 * 32 * 2)
    True
    >>> out = sa.attention(q, k, v, lay)
    """
    n_hashes = check_count(n_hashes, "n_hashes")
    bucket_size = check_count(bucket_size, "bucket_size")
    causal = check_flag(causal, "causal")
    be, qh, kh, info = prepare_qk(q, k, backend, "select.lsh")
    d, nk = info["d"], info["nk"]
    bucket_size = min(bucket_size, max(nk, 1))  # one chunk holds every key either way
    if n_buckets is not None:
        n_buckets = check_count(n_buckets, "n_buckets", 2)
        if n_buckets % 2:
            raise ValueError(f"n_buckets must be even (buckets come in +/- pairs), got {n_buckets}")
    if rotations is None:
        if n_buckets is None:
            n_buckets = default_n_buckets(nk, bucket_size)
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, (bool, np.bool_)):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        check_memory(8 * n_hashes * d * (n_buckets // 2), "select.lsh rotations")
        rot = lsh_rotations(n_hashes, d, n_buckets, seed)
    else:
        rot = be.to_numpy(be.asarray(rotations))
        if rot.ndim != 3 or rot.shape[:2] != (n_hashes, d) or rot.shape[2] < 1:
            raise ValueError(
                f"rotations must have shape (n_hashes, D, n_buckets // 2) = ({n_hashes}, {d}, >=1) "
                f"for q of shape {tuple(np.shape(q))}, got {rot.shape}"
            )
        if not np.issubdtype(rot.dtype, np.floating) or not np.isfinite(rot).all():
            raise ValueError(f"rotations must be finite floats, got dtype {rot.dtype}")
        if n_buckets is not None and n_buckets != 2 * rot.shape[2]:
            raise ValueError(
                f"n_buckets={n_buckets} contradicts rotations of shape {rot.shape} "
                f"(which give {2 * rot.shape[2]} buckets)"
            )
        n_buckets = 2 * rot.shape[2]
    check_memory(4 * n_hashes * (info["hq"] * info["nq"] + 5 * info["hkv"] * nk)
                 + 4 * n_hashes * info["hkv"] * (n_buckets + 1), "select.lsh bucket arrays")
    rot = be.xp.ascontiguousarray(be.asarray(rot), dtype=qh.dtype)
    # unit rows: the same buckets (argmax ignores a positive scale), and no product can overflow
    q_buckets = be.lsh_hash(unit_rows(be.xp, qh), rot)
    k_buckets = be.lsh_hash(unit_rows(be.xp, kh), rot)
    return be.lsh_select(q_buckets, k_buckets, n_buckets, bucket_size, causal)
