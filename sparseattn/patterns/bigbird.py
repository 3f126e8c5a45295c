"""BigBird: sliding window, global and random blocks (Zaheer et al. 2020)."""

from __future__ import annotations

import dataclasses

import numpy as np

from ..layout import _indptr_from_rows
from .base import check_bool, check_int
from .block import GridPattern

__all__ = ["BigBird", "bigbird"]

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _splitmix64(x):
    """SplitMix64 finaliser on a uint64 array: a counter-based generator, so row ``R``'s draws
    depend only on ``(seed, R)``, never on how many rows are built."""
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


def _uniform(seed, rows, step):
    """Reproducible uniforms in [0, 1), one per row, for draw number ``step``."""
    key = _splitmix64(np.uint64(seed & 0xFFFFFFFFFFFFFFFF) ^ _splitmix64(rows.astype(np.uint64)))
    with np.errstate(over="ignore"):
        key = key + np.uint64(step) * _GOLDEN
    h = _splitmix64(key)
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / 2.0**53)


def random_blocks(nb, n_rows, w, g, r, seed, causal):
    """Random key blocks per block row: ``(rows, cols)`` of the draws.

    Row ``R`` draws ``min(r, m)`` distinct columns uniformly from its ``m`` eligible ones: those
    outside its window ``[R - w, R + w]`` and the global blocks ``[0, g)`` (causal: only columns
    before the window). Floyd's algorithm, vectorised over rows.
    """
    R = np.arange(n_rows, dtype=np.int64)
    len1 = np.maximum(0, R - w - g)  # eligible columns [g, R - w)
    b = np.maximum(g, R + w + 1)
    len2 = np.zeros_like(R) if causal else np.maximum(0, nb - b)  # and [R + w + 1, nb)
    m = len1 + len2
    m[R < g] = 0  # global rows see everything already
    k = np.minimum(r, m)
    chosen = np.full((n_rows, max(r, 1)), -1, np.int64)
    for s in range(r):
        t = m - k + s
        x = np.floor(_uniform(seed, R, s) * (t + 1)).astype(np.int64)
        x = np.minimum(x, t)
        dup = np.any(chosen[:, :s] == x[:, None], axis=1) if s else np.zeros(n_rows, bool)
        chosen[:, s] = np.where(s < k, np.where(dup, t, x), -1)
    chosen = chosen[:, :r]
    rows = np.repeat(R, r)
    e = chosen.ravel()
    ok = e >= 0
    rows, e = rows[ok], e[ok]
    cols = np.where(e < len1[rows], g + e, b[rows] + (e - len1[rows]))
    return rows, cols


@dataclasses.dataclass(frozen=True, repr=False)
class BigBird(GridPattern):
    """BigBird attention on blocks of ``block_size`` positions.

    With ``R = i // block_size`` and ``C = j // block_size`` (block rows and columns over
    positions, ``nb = ceil(n_k / block_size)`` of each), query ``i`` sees key ``j`` when

    * ``|R - C| <= window_blocks // 2`` (sliding window of blocks), or
    * ``C < global_blocks`` or ``R < global_blocks`` (global blocks, both directions), or
    * ``C`` is one of row ``R``'s ``random_blocks`` random blocks.

    Random blocks are drawn, per block row, uniformly without repeats from the blocks that are
    neither in the window nor global (fewer if fewer are left), by a counter-based generator
    keyed by ``(seed, R)``: the same seed and length always give the same blocks (with
    ``causal=True`` a row's blocks do not even depend on the length, so decoding step by step
    sees the blocks a full pass saw). With ``causal=True``
    every part keeps only ``C <= R``, random blocks come from before the window, and inside the
    diagonal block only ``j <= i`` is kept.

    Cost: ``(window_blocks + global_blocks + random_blocks) * block_size`` keys per query plus
    ``n_k`` for global queries; at ``block_size`` equal to the kernel's block size, a block layout
    is built straight from the block grid with no element masks (causal: one triangle).

    Mask of ``bigbird(2, 3, 1, 1, seed=0)`` at n = 12 (``.picture(12)``; rows are queries)::

        ############
        ############
        ######....##
        ######....##
        ##########..
        ##########..
        ##########..
        ##########..
        ####..######
        ####..######
        ##..##..####
        ##..##..####
    """

    block_size: int
    window_blocks: int = 3
    global_blocks: int = 1
    random_blocks: int = 3
    seed: int = 0
    causal: bool = False
    _factory = "bigbird"

    def __post_init__(self):
        object.__setattr__(self, "block_size", check_int(self.block_size, "block_size", 1))
        for name in ("window_blocks", "global_blocks", "random_blocks", "seed"):
            object.__setattr__(self, name, check_int(getattr(self, name), name, 0))
        check_bool(self.causal, "causal")

    @property
    def _token_causal(self):
        return self.causal

    def block_mask(self, n):
        """Boolean ``(nb, nb)`` block grid for ``n`` keys (small: blocks, not tokens)."""
        (_, _), ip, ix = self._grid(n)
        nb = ip.shape[0] - 1
        out = np.zeros((nb, nb), bool)
        out[np.repeat(np.arange(nb), np.diff(ip)), ix] = True
        return out

    def _grid(self, n_k):
        bs = self.block_size
        nb = -(-n_k // bs)
        w, g, r = self.window_blocks // 2, min(self.global_blocks, nb), self.random_blocks
        R = np.arange(nb, dtype=np.int64)
        span = 2 * w + 1
        win_r = np.repeat(R, span)
        win_c = (R[:, None] + np.arange(-w, w + 1)[None, :]).ravel()
        glob_col_r = np.repeat(R, g)
        glob_col_c = np.tile(np.arange(g, dtype=np.int64), nb)
        glob_row_r = np.repeat(np.arange(g, dtype=np.int64), nb)
        glob_row_c = np.tile(R, g)
        rnd_r, rnd_c = random_blocks(nb, nb, w, g, r, self.seed, self.causal)
        rows = np.concatenate([win_r, glob_col_r, glob_row_r, rnd_r])
        cols = np.concatenate([win_c, glob_col_c, glob_row_c, rnd_c])
        ok = (cols >= 0) & (cols < nb)
        if self.causal:
            ok &= cols <= rows
        keys = np.unique(rows[ok] * nb + cols[ok])
        rows, cols = np.divmod(keys, nb)
        return (bs, bs), _indptr_from_rows(rows, nb), cols


def bigbird(block_size, window_blocks=3, global_blocks=1, random_blocks=3, seed=0, causal=False):
    """BigBird: window, global and random blocks.

    Parameters
    ----------
    block_size : int
        Positions per block (the same for queries and keys).
    window_blocks : int, default 3
        Blocks in the sliding window: ``window_blocks // 2`` on each side of the diagonal block.
    global_blocks : int, default 1
        Leading blocks that see, and are seen by, everything.
    random_blocks : int, default 3
        Random blocks per block row, never a window or global block.
    seed : int, default 0
        The random blocks are a pure function of ``(seed, block row)``.
    causal : bool, default False
        Keep only keys at or before the query (random blocks drawn from the past).

    Returns
    -------
    BigBird
    """
    return BigBird(block_size, window_blocks, global_blocks, random_blocks, seed, causal)
