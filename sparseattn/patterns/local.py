"""Local patterns: dense (full or causal), sliding window, attention sinks.

``i`` below is a query's position (query index plus ``n_k - n_q``, see :mod:`.base`), ``j`` a key.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from . import _build
from .base import Pattern, check_bool, check_int

__all__ = ["Dense", "SlidingWindow", "Sinks", "dense", "sliding_window", "sinks"]


@dataclasses.dataclass(frozen=True, repr=False)
class Dense(Pattern):
    """Every key (``causal=False``) or every key with ``j <= i`` (``causal=True``).

    Cost: ``n_q * n_k`` pairs (causal: about half). Block layouts are all full blocks except the
    diagonal ones of a causal mask.

    Mask of ``dense(causal=True)`` at n = 12 (``.picture(12)``; rows are queries)::

        #...........
        ##..........
        ###.........
        ####........
        #####.......
        ######......
        #######.....
        ########....
        #########...
        ##########..
        ###########.
        ############
    """

    causal: bool = False
    _factory = "dense"
    _interval_based = True

    def __post_init__(self):
        check_bool(self.causal, "causal")

    def _components(self, pos, n_k):
        return _build.interval(pos, 0, pos + 1 if self.causal else n_k, n_k)


@dataclasses.dataclass(frozen=True, repr=False)
class SlidingWindow(Pattern):
    """A window of keys around each query.

    * ``causal=True``: ``i - window < j <= i``, i.e. the ``window`` most recent keys including the
      query's own position (Mistral's ``sliding_window``).
    * ``causal=False``: ``|i - j| <= window // 2`` (Longformer's ``attention_window``: ``window // 2``
      keys on each side, ``2 * (window // 2) + 1`` in all).

    Cost: at most ``window`` (causal) or ``2 * (window // 2) + 1`` keys per query, ``O(n * window)``
    pairs. As a block layout only the blocks the window's two edges cut are partial; they repeat
    along the diagonal, so a few distinct masks serve any length.

    Mask of ``sliding_window(4)`` at n = 12 (``.picture(12)``; rows are queries)::

        #...........
        ##..........
        ###.........
        ####........
        .####.......
        ..####......
        ...####.....
        ....####....
        .....####...
        ......####..
        .......####.
        ........####
    """

    window: int
    causal: bool = True
    _factory = "sliding_window"
    _interval_based = True

    def __post_init__(self):
        object.__setattr__(self, "window", check_int(self.window, "window", 1))
        check_bool(self.causal, "causal")

    def _components(self, pos, n_k):
        if self.causal:
            return _build.interval(pos, pos - self.window + 1, pos + 1, n_k)
        h = self.window // 2
        return _build.interval(pos, pos - h, pos + h + 1, n_k)


@dataclasses.dataclass(frozen=True, repr=False)
class Sinks(Pattern):
    """The first ``n_sink`` keys (attention sinks, StreamingLLM): ``j < n_sink``.

    With ``causal=True`` (default) also ``j <= i``, so a query never sees a sink after it.
    Usually united with a window: ``sinks(4) | sliding_window(4096)``.

    Cost: ``n_sink`` keys per query; as blocks, ``ceil(n_sink / bk)`` columns of blocks sharing one
    mask per column.

    Mask of ``sinks(2) | sliding_window(3)`` at n = 12 (``.picture(12)``; rows are queries)::

        #...........
        ##..........
        ###.........
        ####........
        #####.......
        ##.###......
        ##..###.....
        ##...###....
        ##....###...
        ##.....###..
        ##......###.
        ##.......###
    """

    n_sink: int
    causal: bool = True
    _factory = "sinks"
    _interval_based = True

    def __post_init__(self):
        object.__setattr__(self, "n_sink", check_int(self.n_sink, "n_sink", 0))
        check_bool(self.causal, "causal")

    def _components(self, pos, n_k):
        hi = np.full(pos.shape, self.n_sink, np.int64)
        if self.causal:
            hi = np.minimum(hi, pos + 1)
        return _build.interval(pos, 0, hi, n_k)


def dense(causal=False):
    """Every key, or every key at or before the query (``causal=True``).

    Parameters
    ----------
    causal : bool, default False

    Returns
    -------
    Dense
    """
    return Dense(causal)


def sliding_window(window, causal=True):
    """Sliding-window (local) attention.

    Parameters
    ----------
    window : int
        ``causal=True``: keys ``i - window < j <= i`` (``window`` keys including the query's own
        position, as Mistral). ``causal=False``: keys ``|i - j| <= window // 2`` (as Longformer's
        ``attention_window``).
    causal : bool, default True

    Returns
    -------
    SlidingWindow
    """
    return SlidingWindow(window, causal)


def sinks(n_sink, causal=True):
    """Attention sinks: the first ``n_sink`` keys (``j < n_sink``; causal: also ``j <= i``).

    Parameters
    ----------
    n_sink : int
    causal : bool, default True

    Returns
    -------
    Sinks
    """
    return Sinks(n_sink, causal)
