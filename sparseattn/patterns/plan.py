"""Per-layer plans: which pattern each layer of a model uses (hybrid dense + sparse stacks)."""

from __future__ import annotations

import dataclasses

from .base import Pattern, check_int

__all__ = ["LayerPlan"]


@dataclasses.dataclass(frozen=True, repr=False)
class LayerPlan:
    """The attention pattern of every layer of a stack, e.g. a hybrid of dense and local layers.

    A plan is a frozen sequence of patterns: ``len(plan)``, ``plan[l]``, iteration and
    ``plan.patterns`` all work, slices give plans, and ``+`` concatenates plans.

    Parameters
    ----------
    patterns : sequence of Pattern
        Layer ``l`` uses ``patterns[l]``.

    Examples
    --------
    >>> import sparseattn as sa
    >>> plan = sa.patterns.LayerPlan.hybrid(8, dense_every=4,
    ...                                     sparse=sa.patterns.sliding_window(4096))
    >>> [type(p).__name__ for p in plan]     # doctest: +NORMALIZE_WHITESPACE
    ['SlidingWindow', 'SlidingWindow', 'SlidingWindow', 'Dense',
     'SlidingWindow', 'SlidingWindow', 'SlidingWindow', 'Dense']
    """

    patterns: tuple

    def __post_init__(self):
        pats = tuple(self.patterns)
        for i, p in enumerate(pats):
            if not isinstance(p, Pattern):
                raise TypeError(f"patterns[{i}] must be a Pattern, got {type(p).__name__}")
        object.__setattr__(self, "patterns", pats)

    @classmethod
    def hybrid(cls, n_layers, dense_every=4, sparse=None, dense=None, first_dense=None):
        """Dense attention every ``dense_every``-th layer, ``sparse`` elsewhere.

        Layer ``l`` is dense when ``l % dense_every == first_dense``; ``first_dense`` defaults to
        ``dense_every - 1`` (the last layer of every group, as MiniMax-01's one softmax layer
        after seven linear ones with ``dense_every=8``, or Jamba's one attention layer in eight).

        Parameters
        ----------
        n_layers : int
        dense_every : int, default 4
        sparse : Pattern, optional
            Default: ``sliding_window(4096)``.
        dense : Pattern, optional
            Default: ``dense(causal=True)``.
        first_dense : int, optional
            Index of the first dense layer, in ``[0, dense_every)``.

        Returns
        -------
        LayerPlan
        """
        from .local import dense as _dense, sliding_window

        n_layers = check_int(n_layers, "n_layers", 0)
        dense_every = check_int(dense_every, "dense_every", 1)
        first = dense_every - 1 if first_dense is None else check_int(first_dense, "first_dense", 0)
        if first >= dense_every:
            raise ValueError(f"first_dense must be < dense_every={dense_every}, got {first}")
        sparse = sliding_window(4096) if sparse is None else sparse
        dense = _dense(causal=True) if dense is None else dense
        return cls(tuple(dense if l % dense_every == first else sparse for l in range(n_layers)))

    @classmethod
    def repeat(cls, pattern, n_layers):
        """The same pattern in every one of ``n_layers`` layers."""
        return cls((pattern,) * check_int(n_layers, "n_layers", 0))

    def __len__(self):
        return len(self.patterns)

    def __iter__(self):
        return iter(self.patterns)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return LayerPlan(self.patterns[index])
        return self.patterns[index]

    def __add__(self, other):
        if not isinstance(other, LayerPlan):
            return NotImplemented
        return LayerPlan(self.patterns + other.patterns)

    def layouts(self, n_q, n_k=None, *, heads=None, block_size=None):
        """Each layer's layout (layers sharing a pattern share one layout object)."""
        built = {}
        return [built.setdefault(p, p.layout(n_q, n_k, heads=heads, block_size=block_size))
                if p not in built else built[p] for p in self.patterns]

    def __repr__(self):
        # run-length encode: hybrid stacks repeat a few patterns many times
        runs = []
        for p in self.patterns:
            if runs and runs[-1][0] == p:
                runs[-1][1] += 1
            else:
                runs.append([p, 1])
        body = ", ".join(f"{p!r}" + (f" x{n}" if n > 1 else "") for p, n in runs)
        return f"LayerPlan({len(self)} layers: {body})"
