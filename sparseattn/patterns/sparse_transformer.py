"""The factorised patterns of the Sparse Transformer (Child et al. 2019): "strided" and "fixed".

Each is the union of the paper's two heads' sets ``A(1) | A(2)`` in one pattern; take them apart
with ``&`` / separate patterns if a model assigns them to different heads.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from . import _build
from .base import Pattern, check_bool, check_int

__all__ = ["Strided", "Fixed", "strided", "fixed"]


@dataclasses.dataclass(frozen=True, repr=False)
class Strided(Pattern):
    """Strided attention: the ``stride`` previous keys plus every ``stride``-th key.

    * ``causal=True``: ``0 <= i - j < stride`` or (``j <= i`` and ``(i - j) % stride == 0``).
    * ``causal=False``: ``|i - j| < stride`` or ``(i - j) % stride == 0``.

    Cost: about ``stride + n / stride`` keys per query (``O(n * sqrt(n))`` pairs at
    ``stride ~ sqrt(n)``); the periodic part touches most blocks, with masks that depend only on
    the block's offset to the diagonal modulo ``stride``.

    Mask of ``strided(3)`` at n = 12 (``.picture(12)``; rows are queries)::

        #...........
        ##..........
        ###.........
        ####........
        .####.......
        ..####......
        #..####.....
        .#..####....
        ..#..####...
        #..#..####..
        .#..#..####.
        ..#..#..####
    """

    stride: int
    causal: bool = True
    _factory = "strided"
    _interval_based = True

    def __post_init__(self):
        object.__setattr__(self, "stride", check_int(self.stride, "stride", 1))
        check_bool(self.causal, "causal")

    def _components(self, pos, n_k):
        s = self.stride
        if self.causal:
            local = _build.interval(pos, pos - s + 1, pos + 1, n_k)
            hi = pos + 1
        else:
            local = _build.interval(pos, pos - s + 1, pos + s, n_k)
            hi = np.full(pos.shape, n_k, np.int64)
        if s == 1:
            return _build.interval(pos, 0, hi, n_k)
        return _build.concat(local, _build.periodic(pos, 0, hi, pos, s, 1, n_k))


@dataclasses.dataclass(frozen=True, repr=False)
class Fixed(Pattern):
    """Fixed attention: the query's own chunk of ``stride`` keys plus the chunks' summary keys.

    ``i // stride == j // stride`` (same chunk) or ``j % stride >= stride - summary`` (the last
    ``summary`` keys of every chunk); with ``causal=True`` (default) also ``j <= i``.

    Cost: about ``stride + summary * n / stride`` keys per query. The summary columns touch every
    block of the (causal) triangle, with masks that depend only on the block's column offset
    modulo ``stride``.

    Mask of ``fixed(4)`` at n = 12 (``.picture(12)``; rows are queries)::

        #...........
        ##..........
        ###.........
        ####........
        ...##.......
        ...###......
        ...####.....
        ...#####....
        ...#...##...
        ...#...###..
        ...#...####.
        ...#...#####
    """

    stride: int
    summary: int = 1
    causal: bool = True
    _factory = "fixed"
    _interval_based = True

    def __post_init__(self):
        object.__setattr__(self, "stride", check_int(self.stride, "stride", 1))
        object.__setattr__(self, "summary", check_int(self.summary, "summary", 1))
        if self.summary > self.stride:
            raise ValueError(f"summary must be <= stride, got summary={self.summary}, stride={self.stride}")
        check_bool(self.causal, "causal")

    def _components(self, pos, n_k):
        s, c = self.stride, self.summary
        start = (pos // s) * s
        hi = pos + 1 if self.causal else np.full(pos.shape, n_k, np.int64)
        chunk = _build.interval(pos, start, np.minimum(start + s, hi), n_k)
        return _build.concat(chunk, _build.periodic(pos, 0, hi, s - c, s, c, n_k))


def strided(stride, causal=True):
    """Sparse Transformer "strided" pattern: local ``stride`` keys plus every ``stride``-th key.

    Parameters
    ----------
    stride : int
    causal : bool, default True

    Returns
    -------
    Strided
    """
    return Strided(stride, causal)


def fixed(stride, summary=1, causal=True):
    """Sparse Transformer "fixed" pattern: own chunk of ``stride`` keys plus summary keys.

    Parameters
    ----------
    stride : int
        Chunk length ``l``.
    summary : int, default 1
        ``c``: the last ``c`` keys of every chunk are summaries every query sees.
    causal : bool, default True

    Returns
    -------
    Fixed
    """
    return Fixed(stride, summary, causal)
