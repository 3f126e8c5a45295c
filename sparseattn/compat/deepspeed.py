"""DeepSpeed's sparse-attention configurations, without DeepSpeed or torch.

DeepSpeed removed ``deepspeed.ops.sparse_attention``; models configured with its
``*SparsityConfig`` classes can move here unchanged. Each class takes DeepSpeed's parameter names
and defaults, and ``make_layout(seq_len)`` returns the same ``(num_heads, nb, nb)`` int64 block
layout (``nb = seq_len // block``) that DeepSpeed's did, as a NumPy array:

* deterministic configurations (no random blocks) are bit-identical;
* random blocks (``VariableSparsityConfig`` / ``BigBirdSparsityConfig`` with
  ``num_random_blocks > 0``) come from ``numpy.random.default_rng(seed)`` (``seed`` is an extra
  keyword, default 0) instead of Python's global ``random`` module: the same rules (per block row,
  ``num_random_blocks`` distinct columns from the same range, drawn before the window and global
  blocks are set), reproducible, but not DeepSpeed's exact draws. Where DeepSpeed's
  unidirectional BigBird asked for more random blocks than a row has columns before it (and
  crashed in ``random.sample``), all of them are taken.

Then ``to_layout(seq_len)`` gives a :class:`~sparseattn.BlockCSRLayout` for
:func:`sparseattn.attention` and ``to_pattern(seq_len)`` a :func:`sparseattn.patterns.block_sparse`
pattern::

    cfg = FixedSparsityConfig(num_heads=8, block=16, num_local_blocks=4)
    out = sa.attention(q, k, v, cfg.to_layout(q.shape[-2]))

The layouts are built on the block grid (``nb x nb`` per head, small), not per token.
"""

from __future__ import annotations

import numbers

import numpy as np

from ..layout import BlockCSRLayout

__all__ = ["SparsityConfig", "DenseSparsityConfig", "FixedSparsityConfig", "VariableSparsityConfig",
           "BigBirdSparsityConfig", "BSLongformerSparsityConfig", "LocalSlidingWindowSparsityConfig"]

_ATTENTION = ("unidirectional", "bidirectional")


def _int(value, name, minimum):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _attention(attention):
    if attention not in _ATTENTION:
        raise NotImplementedError('only "uni/bi-directional" attentions are supported for now!')
    return attention


def _tril(layout):
    """``torch.tril`` of every head: keep block columns <= block rows."""
    nb = layout.shape[-1]
    return layout * np.tri(nb, nb, dtype=layout.dtype)


class SparsityConfig:
    """Base class: the properties every block-sparse configuration shares.

    Parameters
    ----------
    num_heads : int
        Attention heads of the layer.
    block : int, default 16
        Block size (``block x block`` tokens).
    different_layout_per_head : bool, default False
        Give each head its own layout (where the configuration has a per-head variation).
    """

    def __init__(self, num_heads, block=16, different_layout_per_head=False):
        self.num_heads = _int(num_heads, "num_heads", 1)
        self.block = _int(block, "block", 1)
        self.different_layout_per_head = bool(different_layout_per_head)
        self.num_layout_heads = num_heads if different_layout_per_head else 1

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if k != "num_layout_heads")
        return f"{type(self).__name__}({args})"

    def setup_layout(self, seq_len):
        """A zero ``(num_heads, nb, nb)`` int64 layout; ``seq_len`` must be a multiple of ``block``."""
        seq_len = _int(seq_len, "seq_len", 1)
        if seq_len % self.block != 0:
            raise ValueError(f"Sequence Length, {seq_len}, needs to be dividable by Block size {self.block}!")
        num_blocks = seq_len // self.block
        return np.zeros((self.num_heads, num_blocks, num_blocks), dtype=np.int64)

    def check_and_propagate_first_head_layout(self, layout):
        """Copy head 0's layout to every head unless ``different_layout_per_head``."""
        if not self.different_layout_per_head:
            layout[1:self.num_heads, :, :] = layout[0, :, :]
        return layout

    def make_layout(self, seq_len):  # pragma: no cover - abstract
        raise NotImplementedError

    # -- sparseattn side
    def to_layout(self, seq_len):
        """The layout as a :class:`~sparseattn.BlockCSRLayout` (all blocks full).

        Shared (``heads = 1``) when every head has the same layout, else ``num_heads`` heads.
        """
        lay = self.make_layout(seq_len).astype(bool)
        if np.all(lay == lay[:1]):
            lay = lay[:1]
        return BlockCSRLayout.from_block_mask(lay, (self.block, self.block), shape=(seq_len, seq_len))

    block_csr = to_layout

    def to_pattern(self, seq_len):
        """A :func:`~sparseattn.patterns.block_sparse` pattern of the layout for ``seq_len``
        (valid for that length and, cropped, for any shorter multiple of ``block``)."""
        from ..patterns import block_sparse

        lay = self.make_layout(seq_len).astype(bool)
        if np.all(lay == lay[:1]):
            lay = lay[0]
        return block_sparse(lay, self.block)


class DenseSparsityConfig(SparsityConfig):
    """Every block (not sparse; for comparison)."""

    def make_layout(self, seq_len):
        """All-ones ``(num_heads, nb, nb)`` int64 layout."""
        layout = self.setup_layout(seq_len)
        layout[:, :, :] = 1
        return layout


class FixedSparsityConfig(SparsityConfig):
    """Sparse Transformer "fixed" pattern on blocks, as DeepSpeed customised it.

    Parameters
    ----------
    num_heads, block, different_layout_per_head
        See :class:`SparsityConfig`.
    num_local_blocks : int, default 4
        Blocks per local window (windows tile the sequence; the last may be short).
    num_global_blocks : int, default 1
        Consecutive blocks of each window that represent it globally; must divide
        ``num_local_blocks``.
    attention : {"bidirectional", "unidirectional"}
    horizontal_global_attention : bool, default False
        Global blocks also attend to everything (bidirectional only).
    num_different_global_patterns : int, default 1
        Heads cycle through this many choices of representative blocks (needs
        ``different_layout_per_head``).
    """

    def __init__(self, num_heads, block=16, different_layout_per_head=False, num_local_blocks=4,
                 num_global_blocks=1, attention="bidirectional", horizontal_global_attention=False,
                 num_different_global_patterns=1):
        super().__init__(num_heads, block, different_layout_per_head)
        self.num_local_blocks = _int(num_local_blocks, "num_local_blocks", 1)
        num_global_blocks = _int(num_global_blocks, "num_global_blocks", 1)
        if num_local_blocks % num_global_blocks != 0:
            raise ValueError(
                f"Number of blocks in a local window, {num_local_blocks}, must be dividable by "
                f"number of global blocks, {num_global_blocks}!")
        self.num_global_blocks = num_global_blocks
        self.attention = _attention(attention)
        if attention != "bidirectional" and horizontal_global_attention:
            raise ValueError('only "bi-directional" attentions can support horizontal global attention!')
        self.horizontal_global_attention = bool(horizontal_global_attention)
        num_different_global_patterns = _int(num_different_global_patterns,
                                             "num_different_global_patterns", 1)
        if num_different_global_patterns > 1 and not different_layout_per_head:
            raise ValueError(
                "Number of different layouts cannot be more than one when you have set a single "
                "layout for all heads! Set different_layout_per_head to True.")
        if num_different_global_patterns > num_local_blocks // num_global_blocks:
            raise ValueError(
                f"Number of layout versions (num_different_global_patterns), "
                f"{num_different_global_patterns}, cannot be larger than number of local window "
                f"blocks divided by number of global blocks, {num_local_blocks} / "
                f"{num_global_blocks} = {num_local_blocks // num_global_blocks}!")
        self.num_different_global_patterns = num_different_global_patterns

    def set_local_layout(self, h, layout):
        """Blocks of the same local window (unidirectional: at or below the diagonal)."""
        nb = layout.shape[1]
        win = np.arange(nb) // self.num_local_blocks
        local = win[:, None] == win[None, :]
        if self.attention == "unidirectional":
            local &= np.tri(nb, nb, dtype=bool)
        layout[h][local] = 1
        return layout

    def set_global_layout(self, h, layout):
        """The representative blocks of every window: columns (and rows, if horizontal)."""
        nb = layout.shape[1]
        L, G = self.num_local_blocks, self.num_global_blocks
        first_global_block_idx = L - (1 + h % self.num_different_global_patterns) * G
        end = nb - (nb % L)
        for i in range(first_global_block_idx, end, L):  # one per window: blocks, not tokens
            first_row = 0 if self.attention == "bidirectional" else i
            layout[h, first_row:, i:i + G] = 1
            if self.horizontal_global_attention:
                layout[h, i:i + G, :] = 1
        if end < nb:  # a short last window
            start = min(end + first_global_block_idx, nb - G)
            stop = start + G
            first_row = 0 if self.attention == "bidirectional" else start
            layout[h, first_row:, start:stop] = 1
            if self.horizontal_global_attention:
                layout[h, start:stop, :] = 1
        return layout

    def make_layout(self, seq_len):
        """The ``(num_heads, nb, nb)`` int64 block layout."""
        layout = self.setup_layout(seq_len)
        for h in range(self.num_layout_heads):
            layout = self.set_local_layout(h, layout)
            layout = self.set_global_layout(h, layout)
        return self.check_and_propagate_first_head_layout(layout)


class _RandomMixin:
    def _rng(self):
        return np.random.default_rng(self.seed)

    def _random_rows(self, h, layout, rng, causal):
        nb = layout.shape[1]
        r = self.num_random_blocks
        if nb < r:
            raise ValueError(
                f"Number of random blocks, {r}, must be smaller than overall number of blocks in a row, {nb}!")
        if r == 0:
            return layout
        for row in range(nb):  # block rows: nb draws of r columns
            pop = row + 1 if causal else nb
            cols = rng.choice(pop, size=min(r, pop), replace=False)
            layout[h, row, cols] = 1
        return layout


class VariableSparsityConfig(_RandomMixin, SparsityConfig):
    """Fixed-like layout with variable windows, explicit global blocks and random blocks.

    Parameters
    ----------
    num_heads, block, different_layout_per_head
        See :class:`SparsityConfig`.
    num_random_blocks : int, default 0
        Random blocks per block row (from all columns, as DeepSpeed, even when unidirectional).
    local_window_blocks : list of int, default [4]
        Sizes of the successive local windows; the last size repeats to the end.
    global_block_indices : list of int, default [0]
        Global blocks (or window starts, with ``global_block_end_indices``).
    global_block_end_indices : list of int, optional
        Exclusive ends of the global windows.
    attention : {"bidirectional", "unidirectional"}
    horizontal_global_attention : bool, default False
    seed : int, default 0
        Seed of the random blocks (a sparseattn extension: DeepSpeed used Python's ``random``).
    """

    def __init__(self, num_heads, block=16, different_layout_per_head=False, num_random_blocks=0,
                 local_window_blocks=(4,), global_block_indices=(0,), global_block_end_indices=None,
                 attention="bidirectional", horizontal_global_attention=False, seed=0):
        super().__init__(num_heads, block, different_layout_per_head)
        self.num_random_blocks = _int(num_random_blocks, "num_random_blocks", 0)
        self.local_window_blocks = [_int(b, "local_window_blocks[]", 1) for b in local_window_blocks]
        if not self.local_window_blocks:
            raise ValueError("local_window_blocks must not be empty")
        self.global_block_indices = [_int(b, "global_block_indices[]", 0) for b in global_block_indices]
        if global_block_end_indices is not None:
            global_block_end_indices = [_int(b, "global_block_end_indices[]", 0)
                                        for b in global_block_end_indices]
            if len(global_block_indices) != len(global_block_end_indices):
                raise ValueError(
                    f"Global block start indices length, {len(global_block_indices)}, must be same "
                    f"as global block end indices length, {len(global_block_end_indices)}!")
            for start_idx, end_idx in zip(global_block_indices, global_block_end_indices):
                if start_idx >= end_idx:
                    raise ValueError(
                        f"Global block start index, {start_idx}, must be smaller than global block "
                        f"end index, {end_idx}!")
        self.global_block_end_indices = global_block_end_indices
        self.attention = _attention(attention)
        if attention != "bidirectional" and horizontal_global_attention:
            raise ValueError('only "bi-directional" attentions can support horizontal global attention!')
        self.horizontal_global_attention = bool(horizontal_global_attention)
        self.seed = _int(seed, "seed", 0)

    def set_random_layout(self, h, layout, rng=None):
        """``num_random_blocks`` distinct random columns in every block row."""
        return self._random_rows(h, layout, self._rng() if rng is None else rng, causal=False)

    def set_local_layout(self, h, layout):
        """Consecutive windows of the given sizes, the last size repeated to the end."""
        nb = layout.shape[1]
        win = np.full(nb, -1, np.int64)  # window number of every block
        start = 0
        size = self.local_window_blocks[-1]
        n = 0
        for size in self.local_window_blocks:
            win[start:min(start + size, nb)] = n
            start += size
            n += 1
        if start < nb:
            rest = np.arange(nb - start) // size
            win[start:] = n + rest
        local = (win[:, None] == win[None, :]) & (win[:, None] >= 0)
        if self.attention == "unidirectional":
            local &= np.tri(nb, nb, dtype=bool)
        layout[h][local] = 1
        return layout

    def set_global_layout(self, h, layout):
        """Global columns (and rows, if horizontal)."""
        nb = layout.shape[1]
        if self.global_block_end_indices is None:
            spans = [(idx, idx + 1) for idx in self.global_block_indices]
        else:
            spans = list(zip(self.global_block_indices, self.global_block_end_indices))
        for start_idx, end_idx in spans:
            if start_idx < nb:
                end_idx = min(end_idx, nb)
                if self.horizontal_global_attention:
                    layout[h, start_idx:end_idx, :] = 1
                first_row = 0 if self.attention == "bidirectional" else start_idx
                layout[h, first_row:, start_idx:end_idx] = 1
        return layout

    def make_layout(self, seq_len):
        """The ``(num_heads, nb, nb)`` int64 block layout (random blocks from ``seed``)."""
        layout = self.setup_layout(seq_len)
        rng = self._rng()
        for h in range(self.num_layout_heads):
            layout = self.set_random_layout(h, layout, rng)
            layout = self.set_local_layout(h, layout)
            layout = self.set_global_layout(h, layout)
        return self.check_and_propagate_first_head_layout(layout)


def _sliding(layout, h, nsw, bidirectional):
    nb = layout.shape[1]
    if nb < nsw:
        raise ValueError(
            f"Number of sliding window blocks, {nsw}, must be smaller than overall number of blocks in a row, {nb}!")
    w = nsw // 2
    d = np.arange(nb)[None, :] - np.arange(nb)[:, None]  # column minus row
    band = (d >= -w) & ((d <= w) if bidirectional else (d <= 0))
    layout[h][band] = 1
    return layout


class BigBirdSparsityConfig(_RandomMixin, SparsityConfig):
    """BigBird on blocks: random, sliding-window and leading global blocks.

    Parameters
    ----------
    num_heads, block, different_layout_per_head
        See :class:`SparsityConfig`.
    num_random_blocks : int, default 1
    num_sliding_window_blocks : int, default 3
    num_global_blocks : int, default 1
        Leading blocks that attend to, and are attended by, all blocks.
    attention : {"bidirectional", "unidirectional"}
        Unidirectional: random blocks from columns ``<= row``, then everything above the diagonal
        is cleared.
    seed : int, default 0
        Seed of the random blocks (a sparseattn extension).
    """

    def __init__(self, num_heads, block=16, different_layout_per_head=False, num_random_blocks=1,
                 num_sliding_window_blocks=3, num_global_blocks=1, attention="bidirectional", seed=0):
        super().__init__(num_heads, block, different_layout_per_head)
        self.num_random_blocks = _int(num_random_blocks, "num_random_blocks", 0)
        self.num_sliding_window_blocks = _int(num_sliding_window_blocks, "num_sliding_window_blocks", 0)
        self.num_global_blocks = _int(num_global_blocks, "num_global_blocks", 0)
        self.attention = _attention(attention)
        self.seed = _int(seed, "seed", 0)

    def set_random_layout(self, h, layout, rng=None):
        return self._random_rows(h, layout, self._rng() if rng is None else rng,
                                 causal=self.attention != "bidirectional")

    def set_sliding_window_layout(self, h, layout):
        return _sliding(layout, h, self.num_sliding_window_blocks, True)

    def set_global_layout_itc(self, h, layout):
        nb = layout.shape[1]
        g = self.num_global_blocks
        if nb < g:
            raise ValueError(
                f"Number of global blocks, {g}, must be smaller than overall number of blocks in a row, {nb}!")
        layout[h, 0:g, :] = 1
        layout[h, :, 0:g] = 1
        if self.attention == "unidirectional":
            layout = _tril(layout)
        return layout

    def make_layout(self, seq_len):
        """The ``(num_heads, nb, nb)`` int64 block layout (random blocks from ``seed``)."""
        layout = self.setup_layout(seq_len)
        rng = self._rng()
        for h in range(self.num_layout_heads):
            layout = self.set_random_layout(h, layout, rng)
            layout = self.set_sliding_window_layout(h, layout)
            layout = self.set_global_layout_itc(h, layout)
        return self.check_and_propagate_first_head_layout(layout)


class BSLongformerSparsityConfig(SparsityConfig):
    """Block-sparse Longformer: sliding window of blocks plus global block rows and columns.

    Parameters
    ----------
    num_heads, block, different_layout_per_head
        See :class:`SparsityConfig`.
    num_sliding_window_blocks : int, default 3
    global_block_indices : list of int, default [0]
    global_block_end_indices : list of int, optional
    attention : {"bidirectional", "unidirectional"}
        Unidirectional clears everything above the diagonal.
    """

    def __init__(self, num_heads, block=16, different_layout_per_head=False, num_sliding_window_blocks=3,
                 global_block_indices=(0,), global_block_end_indices=None, attention="bidirectional"):
        super().__init__(num_heads, block, different_layout_per_head)
        self.num_sliding_window_blocks = _int(num_sliding_window_blocks, "num_sliding_window_blocks", 0)
        self.global_block_indices = [_int(b, "global_block_indices[]", 0) for b in global_block_indices]
        self.attention = _attention(attention)
        if global_block_end_indices is not None:
            global_block_end_indices = [_int(b, "global_block_end_indices[]", 0)
                                        for b in global_block_end_indices]
            if len(global_block_indices) != len(global_block_end_indices):
                raise ValueError(
                    f"Global block start indices length, {len(global_block_indices)}, must be same "
                    f"as global block end indices length, {len(global_block_end_indices)}!")
            for start_idx, end_idx in zip(global_block_indices, global_block_end_indices):
                if start_idx >= end_idx:
                    raise ValueError(
                        f"Global block start index, {start_idx}, must be smaller than global block "
                        f"end index, {end_idx}!")
        self.global_block_end_indices = global_block_end_indices

    def set_sliding_window_layout(self, h, layout):
        return _sliding(layout, h, self.num_sliding_window_blocks, True)

    def set_global_layout(self, h, layout):
        nb = layout.shape[1]
        if self.global_block_end_indices is None:
            spans = [(idx, idx + 1) for idx in self.global_block_indices]
        else:
            spans = list(zip(self.global_block_indices, self.global_block_end_indices))
        for start_idx, end_idx in spans:
            if start_idx < nb:
                end_idx = min(end_idx, nb)
                layout[h, start_idx:end_idx, :] = 1
                layout[h, :, start_idx:end_idx] = 1
        if self.attention == "unidirectional":
            layout = _tril(layout)
        return layout

    def make_layout(self, seq_len):
        """The ``(num_heads, nb, nb)`` int64 block layout."""
        layout = self.setup_layout(seq_len)
        for h in range(self.num_layout_heads):
            layout = self.set_sliding_window_layout(h, layout)
            layout = self.set_global_layout(h, layout)
        return self.check_and_propagate_first_head_layout(layout)


class LocalSlidingWindowSparsityConfig(SparsityConfig):
    """A purely local sliding window of blocks.

    Parameters
    ----------
    num_heads, block
        See :class:`SparsityConfig`.
    num_sliding_window_blocks : int, default 3
        ``num_sliding_window_blocks // 2`` blocks before the diagonal (and after it, when
        bidirectional).
    attention : {"unidirectional", "bidirectional"}, default "unidirectional"
    """

    def __init__(self, num_heads, block=16, num_sliding_window_blocks=3, attention="unidirectional"):
        super().__init__(num_heads, block)
        self.num_sliding_window_blocks = _int(num_sliding_window_blocks, "num_sliding_window_blocks", 0)
        self.attention = _attention(attention)

    def set_sliding_window_layout(self, h, layout):
        return _sliding(layout, h, self.num_sliding_window_blocks, self.attention == "bidirectional")

    def make_layout(self, seq_len):
        """The ``(num_heads, nb, nb)`` int64 block layout."""
        layout = self.setup_layout(seq_len)
        for h in range(self.num_layout_heads):
            layout = self.set_sliding_window_layout(h, layout)
        return self.check_and_propagate_first_head_layout(layout)
