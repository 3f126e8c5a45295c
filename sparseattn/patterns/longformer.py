"""Longformer: a symmetric sliding window plus global tokens."""

from __future__ import annotations

import dataclasses
import numbers

import numpy as np

from . import _build
from .base import Pattern, check_int

__all__ = ["Longformer", "longformer"]


@dataclasses.dataclass(frozen=True, repr=False)
class Longformer(Pattern):
    """Longformer attention (Beltagy et al. 2020): local window plus global tokens.

    Query ``i`` sees key ``j`` when ``|i - j| <= window // 2`` (the non-causal
    :func:`sliding_window`), or ``j`` is global (global tokens are attended by all), or ``i`` is
    global (global tokens attend to all). ``global_tokens`` is a count ``g`` (positions
    ``0 .. g-1``, e.g. a CLS token) or a sequence of positions; positions ``>= n_k`` are ignored.
    Apply :func:`causal` for a causal variant.

    Cost: ``window + G`` keys per ordinary query and ``n_k`` per global query
    (``O(n * (window + G))`` pairs for ``G`` global tokens); global columns are merged as runs of
    consecutive positions, so scattered global tokens cost one merge step per run.

    Mask of ``longformer(4, [0, 6])`` at n = 12 (``.picture(12)``; rows are queries)::

        ############
        ####..#.....
        #####.#.....
        #######.....
        #.#####.....
        #..#####....
        ############
        #....#####..
        #.....#####.
        #.....######
        #.....#.####
        #.....#..###
    """

    window: int
    global_tokens: object = 1
    _factory = "longformer"
    _interval_based = True

    def __post_init__(self):
        object.__setattr__(self, "window", check_int(self.window, "window", 1))
        g = self.global_tokens
        if isinstance(g, numbers.Integral) and not isinstance(g, bool):
            g = check_int(g, "global_tokens", 0)
        else:
            try:
                vals = [check_int(x, f"global_tokens[{i}]", 0) for i, x in enumerate(g)]
            except TypeError:
                raise TypeError(
                    f"global_tokens must be an int or a sequence of positions, got {type(g).__name__}"
                ) from None
            g = tuple(sorted(set(vals)))
        object.__setattr__(self, "global_tokens", g)

    def _global_positions(self, n_k):
        g = self.global_tokens
        if isinstance(g, int):
            return np.arange(min(g, n_k), dtype=np.int64)
        arr = np.asarray(g, np.int64)
        return arr[arr < n_k]

    def _components(self, pos, n_k):
        glob = self._global_positions(n_k)
        h = self.window // 2
        lo, hi = pos - h, pos + h + 1
        if glob.size:
            is_global = np.isin(pos, glob)
            lo = np.where(is_global, 0, lo)
            hi = np.where(is_global, n_k, hi)
        parts = [_build.interval(pos, lo, hi, n_k)]
        if glob.size:
            # consecutive global positions form one interval component each
            breaks = np.nonzero(np.diff(glob) != 1)[0] + 1
            run_start = glob[np.concatenate([[0], breaks])]
            run_stop = glob[np.concatenate([breaks - 1, [glob.size - 1]])] + 1
            for a, b in zip(run_start, run_stop):
                parts.append(_build.interval(pos, np.full(pos.shape, a), np.full(pos.shape, b), n_k))
        return _build.concat(*parts)


def longformer(window, global_tokens=1):
    """Longformer attention: ``|i - j| <= window // 2`` plus global rows and columns.

    Parameters
    ----------
    window : int
        As Longformer's ``attention_window``: ``window // 2`` keys on each side.
    global_tokens : int or sequence of int, default 1
        The number of leading global positions, or the global positions themselves.

    Returns
    -------
    Longformer
    """
    return Longformer(window, global_tokens)
