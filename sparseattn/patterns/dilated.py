"""Dilated attention: every ``dilation``-th key within a span, optionally a different dilation per
head (LongNet-style mixtures of dilations)."""

from __future__ import annotations

import dataclasses
import numbers

from . import _build
from .base import Pattern, check_bool, check_int

__all__ = ["Dilated", "dilated"]


@dataclasses.dataclass(frozen=True, repr=False)
class Dilated(Pattern):
    """Keys whose distance to the query is a multiple of the dilation, within a span.

    ``(i - j) % dilation == 0`` and ``j`` in the span:

    * ``window=None``: every key (``causal=True``: ``j <= i``);
    * ``window=w``: the span of :func:`sliding_window` ``(w, causal)``, i.e. ``i - w < j <= i``
      (causal) or ``|i - j| <= w // 2``.

    ``dilation`` may be a sequence: head ``h`` uses ``dilation[h]`` (the pattern then has
    ``len(dilation)`` heads).

    Cost: about ``span / dilation`` keys per query. Every block in the span is partial (unless
    ``dilation == 1``), but masks depend only on the block's offset to the diagonal modulo the
    dilation, so few are stored.

    Mask of ``dilated(2, window=8, causal=True)`` at n = 12 (``.picture(12)``; rows are queries)::

        #...........
        .#..........
        #.#.........
        .#.#........
        #.#.#.......
        .#.#.#......
        #.#.#.#.....
        .#.#.#.#....
        ..#.#.#.#...
        ...#.#.#.#..
        ....#.#.#.#.
        .....#.#.#.#
    """

    dilation: object
    window: object = None
    causal: bool = False
    _factory = "dilated"
    _interval_based = True

    def __post_init__(self):
        d = self.dilation
        if isinstance(d, numbers.Integral) and not isinstance(d, bool):
            d = check_int(d, "dilation", 1)
        else:
            try:
                d = tuple(check_int(x, f"dilation[{i}]", 1) for i, x in enumerate(d))
            except TypeError:
                raise TypeError(
                    f"dilation must be an int or a sequence of ints, got {type(d).__name__}"
                ) from None
            if not d:
                raise ValueError("dilation must not be an empty sequence")
            if len(d) == 1:
                d = d[0]
        object.__setattr__(self, "dilation", d)
        if self.window is not None:
            object.__setattr__(self, "window", check_int(self.window, "window", 1))
        check_bool(self.causal, "causal")

    @property
    def heads(self):
        return len(self.dilation) if isinstance(self.dilation, tuple) else 1

    def head(self, h):
        Pattern.head(self, h)
        if isinstance(self.dilation, tuple):
            return Dilated(self.dilation[h], self.window, self.causal)
        return self

    def _components(self, pos, n_k):
        d = self.dilation
        if isinstance(d, tuple):  # pragma: no cover - layout() splits heads first
            raise ValueError("a per-head dilated pattern is built head by head")
        if self.window is None:
            lo, hi = 0, (pos + 1 if self.causal else n_k)
        elif self.causal:
            lo, hi = pos - self.window + 1, pos + 1
        else:
            h = self.window // 2
            lo, hi = pos - h, pos + h + 1
        if d == 1:
            return _build.interval(pos, lo, hi, n_k)
        return _build.periodic(pos, lo, hi, pos, d, 1, n_k)


def dilated(dilation, window=None, causal=False):
    """Dilated attention: keys with ``(i - j) % dilation == 0`` inside a span.

    Parameters
    ----------
    dilation : int or sequence of int
        Distance between attended keys; a sequence gives head ``h`` dilation ``dilation[h]``.
    window : int, optional
        Span, as :func:`sliding_window`'s ``window``; ``None``: the whole sequence.
    causal : bool, default False
        Only keys ``j <= i``.

    Returns
    -------
    Dilated
    """
    return Dilated(dilation, window, causal)
