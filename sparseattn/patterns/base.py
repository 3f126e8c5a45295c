"""The pattern base class and composition: union, intersection, causal, per-head.

A pattern is a frozen, hashable description of which keys each query may see. It holds no
arrays that depend on the sequence length: :meth:`Pattern.layout` builds the index structure for
given sizes, in time and memory proportional to the number of allowed pairs.

Positions
---------
Query ``i`` of ``n_q`` and key ``j`` of ``n_k`` sit at positions ``i + (n_k - n_q)`` and ``j``:
queries are the *last* ``n_q`` positions (bottom-right alignment, as FlashAttention). With
``n_q = n_k`` positions are indices; when decoding (``n_q < n_k``) the new queries follow the
cached keys, so a causal query sees every cached key. Every definition below is written with
``i`` meaning the query's position. When ``n_q > n_k`` the first ``n_q - n_k`` queries sit at
negative positions (a causal pattern gives them no key).
"""

from __future__ import annotations

import dataclasses
import numbers

import numpy as np

from .._validation import check_memory
from ..layout import _check_block_size, _check_heads
from . import _build

__all__ = ["Pattern", "Union", "Intersection", "Causal", "PerHead", "causal", "per_head"]


# ----------------------------------------------------------------------------- argument checks


def check_int(value, name, minimum=0):
    """An int (not bool) >= ``minimum``; ValueError/TypeError naming ``name`` otherwise."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_bool(value, name):
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return bool(value)


def check_sizes(n_q, n_k):
    n_q = check_int(n_q, "n_q")
    n_k = n_q if n_k is None else check_int(n_k, "n_k")
    # per-query arrays (positions, counts, indptr, ...) come first: refuse a size they cannot hold
    check_memory(32 * (n_q + 1), f"the per-query arrays of a layout with n_q={n_q}")
    return n_q, n_k


def positions(n_q, n_k):
    """Positions of the queries: the last ``n_q`` of ``n_k`` (bottom-right alignment)."""
    return np.arange(n_q, dtype=np.int64) + (n_k - n_q)


# ----------------------------------------------------------------------------- base class


class Pattern:
    """Base class of every static pattern.

    Subclasses are frozen dataclasses (hashable: :func:`sparseattn.attention` caches the layouts
    built from them). A subclass implements one of

    * ``_components(pos, n_k)``: the keys of queries at positions ``pos`` as a union of periodic
      intervals (:class:`~sparseattn.patterns._build.Components`); both layout kinds then follow
      from the shared builders, or
    * ``_csr(n_q, n_k)`` and optionally ``_block(n_q, n_k, block_size)`` (default: the exact
      block form of ``_csr``).

    Patterns that differ between heads override :attr:`heads` and :meth:`head`.
    """

    #: name of the public factory, used by ``repr``
    _factory = None

    #: whether ``_components`` describes the pattern (then both builders come for free)
    @property
    def _interval_based(self):
        return False

    # -- heads
    @property
    def heads(self):
        """Heads the pattern describes: 1 if every head sees the same keys."""
        return 1

    def head(self, h):
        """The (shared) pattern of head ``h``."""
        if not 0 <= h < self.heads:
            raise ValueError(f"head must lie in [0, {self.heads}), got {h}")
        return self

    # -- building
    def _components(self, pos, n_k):
        return None

    def _csr(self, n_q, n_k):
        comps = self._components(positions(n_q, n_k), n_k)
        if comps is None:  # pragma: no cover - every subclass provides one of the two
            raise NotImplementedError(type(self).__name__)
        return _build.components_to_csr(comps, n_q, n_k)

    def _block(self, n_q, n_k, block_size):
        if not self._interval_based:
            return self._csr(n_q, n_k).to_block(block_size)
        return _build.components_to_block(lambda pos: self._components(pos, n_k), n_q, n_k,
                                          block_size)

    def _build_one(self, n_q, n_k, block_size):
        if n_q == 0 or n_k == 0:
            return _build.empty_layout(n_q, n_k, 1, block_size)
        if block_size is None:
            return self._csr(n_q, n_k)
        return self._block(n_q, n_k, block_size)

    def layout(self, n_q, n_k=None, *, heads=None, block_size=None):
        """Build the index structure of this pattern for ``n_q`` queries and ``n_k`` keys.

        Parameters
        ----------
        n_q : int
            Number of queries. They sit at the last ``n_q`` key positions (bottom-right).
        n_k : int, optional
            Number of keys; defaults to ``n_q``.
        heads : int, optional
            Heads of the attention call. A pattern that is the same for every head returns a
            shared (``heads=1``) layout whatever this is; a per-head pattern must have exactly
            this many heads. ``None``: the pattern's own :attr:`heads`.
        block_size : int or tuple of int, optional
            ``(bq, bk)``: build a :class:`~sparseattn.BlockCSRLayout` (exact: partial blocks carry
            element masks). ``None``: a token-level :class:`~sparseattn.CSRLayout`.

        Returns
        -------
        CSRLayout or BlockCSRLayout
            With 1 head (shared) or one per head.
        """
        n_q, n_k = check_sizes(n_q, n_k)
        if block_size is not None:
            block_size = _check_block_size(block_size)
        own = self.heads
        if heads is not None:
            heads = _check_heads(heads)
            if own != 1 and own != heads:
                raise ValueError(
                    f"{self!r} describes {own} heads but the layout was asked for heads={heads}"
                )
        per = [self.head(h) for h in range(own)]
        if all(p == per[0] for p in per[1:]):
            per = per[:1]  # the same for every head: one shared layout
        built = {}
        out = []
        for p in per:
            if p not in built:
                built[p] = p._build_one(n_q, n_k, block_size)
            out.append(built[p])
        return _build.stack_heads(out)

    # -- composition
    def __or__(self, other):
        if not isinstance(other, Pattern):
            return NotImplemented
        return Union((self, other))

    def __and__(self, other):
        if not isinstance(other, Pattern):
            return NotImplemented
        return Intersection((self, other))

    def as_causal(self):
        """This pattern restricted to keys at or before each query (``j <= i``)."""
        return causal(self)

    # -- printing
    def __repr__(self):
        name = self._factory or type(self).__name__
        args = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self)
                         if f.repr)
        return f"{name}({args})"

    def picture(self, n=16, n_k=None, head=0):
        """The mask at a small size as text: one line per query, ``#`` allowed, ``.`` not.

        Parameters
        ----------
        n : int, default 16
            Queries (and keys, unless ``n_k`` is given).
        n_k : int, optional
        head : int, default 0
            Head to draw for a per-head pattern.

        Returns
        -------
        str
        """
        lay = self.layout(n, n_k)
        mask = lay.to_dense()[head if lay.heads > 1 else 0]
        return "\n".join("".join("#" if x else "." for x in row) for row in mask)

    def describe(self, n, block_size=None):
        """A one-line summary of the layout at length ``n``: nnz, density, index bytes."""
        lay = self.layout(n, block_size=block_size)
        return (f"{self!r} at n={n}: nnz={lay.nnz} (density {lay.density:.3g}), "
                f"{lay.nbytes / 2**20:.2f} MiB of indices")


def _flatten(kind, parts):
    out = []
    for p in parts:
        if not isinstance(p, Pattern):
            raise TypeError(f"expected patterns, got {type(p).__name__} {p!r}")
        out.extend(p.parts if isinstance(p, kind) else (p,))
    return tuple(out)


def _common_heads(parts, what):
    heads = {p.heads for p in parts} - {1}
    if len(heads) > 1:
        raise ValueError(f"cannot combine per-head patterns with different head counts {sorted(heads)} in {what}")
    return heads.pop() if heads else 1


class _Combination(Pattern):
    """What :class:`Union` and :class:`Intersection` share: parts that do not reduce to intervals
    are built one by one and folded together with ``_OP`` ("or" / "and")."""

    _OP = ""

    def _fold(self, n_q, n_k, block_size):
        lay = self.parts[0]._build_one(n_q, n_k, block_size)
        for p in self.parts[1:]:
            other = p._build_one(n_q, n_k, block_size)
            if block_size is not None:  # block level: only distinct pairs of partial masks meet
                lay = _build.merge_blocks(lay, other, self._OP)
            else:
                lay = lay.union(other) if self._OP == "or" else lay.intersection(other)
        return lay

    def _csr(self, n_q, n_k):
        if self._interval_based:
            return Pattern._csr(self, n_q, n_k)
        return self._fold(n_q, n_k, None)

    def _block(self, n_q, n_k, block_size):
        if self._interval_based:
            return Pattern._block(self, n_q, n_k, block_size)
        return self._fold(n_q, n_k, block_size)


@dataclasses.dataclass(frozen=True, repr=False)
class Union(_Combination):
    """Keys allowed by any of ``parts`` (``p | q``).

    Cost: nnz of the union. Patterns made of intervals are merged in one pass; others are united
    layout by layout (block layouts combine only distinct pairs of partial masks).
    """

    parts: tuple
    _OP = "or"

    def __post_init__(self):
        object.__setattr__(self, "parts", _flatten(Union, self.parts))
        _common_heads(self.parts, "a union")

    @property
    def heads(self):
        return _common_heads(self.parts, "a union")

    @property
    def _interval_based(self):
        return all(p._interval_based for p in self.parts)

    def head(self, h):
        Pattern.head(self, h)
        return Union(tuple(p.head(h if p.heads > 1 else 0) for p in self.parts))

    def _components(self, pos, n_k):
        comps = []
        for p in self.parts:
            c = p._components(pos, n_k)
            if c is None:
                return None
            comps.append(c)
        return _build.concat(*comps)

    def __repr__(self):
        return "(" + " | ".join(map(repr, self.parts)) + ")"


@dataclasses.dataclass(frozen=True, repr=False)
class Intersection(_Combination):
    """Keys allowed by every one of ``parts`` (``p & q``).

    Cost: parts made of intervals (and at most one period per pair of components) are
    intersected row by row before anything is built: the nnz of the result. Otherwise the parts'
    layouts are built and intersected (token level: a sorted merge of the entries; block level:
    blocks first, then only distinct pairs of partial masks).
    """

    parts: tuple
    _OP = "and"

    def __post_init__(self):
        object.__setattr__(self, "parts", _flatten(Intersection, self.parts))
        _common_heads(self.parts, "an intersection")

    @property
    def heads(self):
        return _common_heads(self.parts, "an intersection")

    @property
    def _interval_based(self):
        # periods do not depend on the sizes: probe one row to see whether the parts combine
        if not all(p.heads == 1 and p._interval_based for p in self.parts):
            return False
        return self._components(np.zeros(1, np.int64), 1) is not None

    def _components(self, pos, n_k):
        comps = None
        for p in self.parts:
            c = p._components(pos, n_k)
            if c is None:
                return None
            comps = c if comps is None else _build.intersect(comps, c)
            if comps is None:
                return None
        return comps

    def head(self, h):
        Pattern.head(self, h)
        return Intersection(tuple(p.head(h if p.heads > 1 else 0) for p in self.parts))

    def __repr__(self):
        return "(" + " & ".join(map(repr, self.parts)) + ")"


@dataclasses.dataclass(frozen=True, repr=False)
class Causal(Pattern):
    """``pattern`` restricted to keys at or before the query: ``j <= i`` (``i`` the position).

    Cost: that of ``pattern``: interval patterns are clipped row by row before anything is
    built; other layouts are filtered entry by entry (token level) or block by block, cutting
    only the blocks the diagonal crosses (block level).
    """

    pattern: Pattern

    def __post_init__(self):
        if not isinstance(self.pattern, Pattern):
            raise TypeError(f"pattern must be a Pattern, got {type(self.pattern).__name__}")

    @property
    def heads(self):
        return self.pattern.heads

    @property
    def _interval_based(self):
        return self.pattern._interval_based

    def head(self, h):
        return Causal(self.pattern.head(h))

    def _components(self, pos, n_k):
        c = self.pattern._components(pos, n_k)
        return None if c is None else _build.limit_hi(c, np.clip(pos + 1, 0, n_k))

    def _csr(self, n_q, n_k):
        if self._interval_based:
            return Pattern._csr(self, n_q, n_k)
        fn = getattr(self.pattern, "_causal_csr", None)
        if fn is not None:
            return fn(n_q, n_k)
        return _build.causal_csr(self.pattern._build_one(n_q, n_k, None))

    def _block(self, n_q, n_k, block_size):
        if self._interval_based:
            return Pattern._block(self, n_q, n_k, block_size)
        fn = getattr(self.pattern, "_causal_block", None)
        if fn is not None:
            return fn(n_q, n_k, block_size)
        return _build.causal_block(self.pattern._build_one(n_q, n_k, block_size))

    def __repr__(self):
        return f"causal({self.pattern!r})"


@dataclasses.dataclass(frozen=True, repr=False)
class PerHead(Pattern):
    """Head ``h`` follows ``patterns[h]`` (each a pattern shared across heads).

    Cost: the sum of the heads' costs; heads with equal patterns are built once.
    """

    patterns: tuple

    def __post_init__(self):
        pats = tuple(self.patterns)
        if not pats:
            raise ValueError("per_head needs at least one pattern")
        for i, p in enumerate(pats):
            if not isinstance(p, Pattern):
                raise TypeError(f"patterns[{i}] must be a Pattern, got {type(p).__name__}")
            if p.heads != 1:
                raise ValueError(f"patterns[{i}] is itself per-head ({p.heads} heads); nest no per_head")
        object.__setattr__(self, "patterns", pats)

    @property
    def heads(self):
        return len(self.patterns)

    def head(self, h):
        Pattern.head(self, h)
        return self.patterns[h]

    def __repr__(self):
        return f"per_head([{', '.join(map(repr, self.patterns))}])"


def causal(pattern):
    """``pattern`` restricted to ``j <= i`` (keys at or before each query's position).

    Parameters
    ----------
    pattern : Pattern

    Returns
    -------
    Pattern
    """
    if isinstance(pattern, Causal):
        return pattern
    return Causal(pattern)


def per_head(patterns):
    """A different pattern per head: head ``h`` sees what ``patterns[h]`` allows.

    Parameters
    ----------
    patterns : sequence of Pattern
        One shared pattern per head (its length is the number of heads the attention call must
        have).

    Returns
    -------
    PerHead
    """
    return PerHead(tuple(patterns))
