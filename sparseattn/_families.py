"""The pattern families the command line knows, with their options and defaults.

One table serves ``demo``, ``bench`` and ``show``: each family names the options it takes, their
defaults (fixed numbers, so that the keys per query of a local pattern do not grow with ``n``
and a sweep over ``n`` measures the kernel's scaling), and how to build the pattern.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

__all__ = ["OPTIONS", "FAMILIES", "Family", "build"]

#: every pattern option of the command line: name -> (type, help)
OPTIONS = {
    "window": (int, "keys per query of the sliding window (causal: i-window < j <= i; "
                    "non-causal: |i-j| <= window//2)"),
    "dilation": (int, "distance between attended keys of a dilated pattern"),
    "span": (int, "span of a dilated pattern, as a sliding window (0: the whole sequence)"),
    "stride": (int, "Sparse Transformer stride (local window and column period)"),
    "summary": (int, "summary columns per stride block of the 'fixed' pattern"),
    "global_tokens": (int, "leading global tokens (rows and columns) of Longformer"),
    "block": (int, "block size in tokens (BigBird, block-sparse)"),
    "window_blocks": (int, "BigBird sliding-window width in blocks"),
    "global_blocks": (int, "BigBird global blocks"),
    "random_blocks": (int, "BigBird random blocks per block row"),
    "density": (float, "fraction of key blocks each query block sees (random block-sparse)"),
    "sinks": (int, "attention-sink tokens (the first keys), added to a sliding window"),
    "causal": (bool, "keep only keys at or before the query"),
    "seed": (int, "seed of the random blocks"),
}


@dataclasses.dataclass(frozen=True)
class Family:
    """A pattern family: its factory, the options it takes and their defaults."""

    name: str
    summary: str
    defaults: dict
    make: Callable  # (n, **options) -> pattern


def _p():
    import sparseattn.patterns as patterns

    return patterns


def _random_block_mask(nb, density, seed):
    """A random block mask with the diagonal always on (no query block without keys)."""
    rng = np.random.default_rng(seed)
    mask = rng.random((nb, nb)) < density
    np.fill_diagonal(mask, True)
    return mask


def _block_sparse(n, block, density, seed):
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must lie in (0, 1], got {density}")
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    return _p().block_sparse(_random_block_mask(-(-n // block), density, seed), block)


def _sinks(n, sinks, window):
    p = _p().sinks(sinks)
    return p | _p().sliding_window(window) if window else p


FAMILIES = {f.name: f for f in [
    Family("dense", "every key (causal: every earlier key)", {"causal": False},
           lambda n, causal: _p().dense(causal=causal)),
    Family("sliding_window", "a window of recent keys (Mistral), or around the query (Longformer)",
           {"window": 512, "causal": True},
           lambda n, window, causal: _p().sliding_window(window, causal=causal)),
    Family("dilated", "every dilation-th key within a span", {"dilation": 4, "span": 2048, "causal": False},
           lambda n, dilation, span, causal: _p().dilated(dilation, window=span or None, causal=causal)),
    Family("strided", "Sparse Transformer strided: local window plus every stride-th key",
           {"stride": 128, "causal": True},
           lambda n, stride, causal: _p().strided(stride, causal=causal)),
    Family("fixed", "Sparse Transformer fixed: own stride block plus summary columns",
           {"stride": 128, "summary": 8, "causal": True},
           lambda n, stride, summary, causal: _p().fixed(stride, summary=summary, causal=causal)),
    Family("longformer", "non-causal window plus global tokens", {"window": 512, "global_tokens": 4},
           lambda n, window, global_tokens: _p().longformer(window, global_tokens)),
    Family("bigbird", "block window, global and random blocks",
           {"block": 64, "window_blocks": 3, "global_blocks": 1, "random_blocks": 3, "seed": 0,
            "causal": False},
           lambda n, block, window_blocks, global_blocks, random_blocks, seed, causal: _p().bigbird(
               block, window_blocks=window_blocks, global_blocks=global_blocks,
               random_blocks=random_blocks, seed=seed, causal=causal)),
    Family("block_sparse", "a random block mask (diagonal always on)",
           {"block": 64, "density": 0.1, "seed": 0}, _block_sparse),
    Family("sinks", "attention sinks plus a causal sliding window (StreamingLLM)",
           {"sinks": 4, "window": 512}, _sinks),
]}


def build(name, n, **options):
    """The pattern of family ``name`` for length ``n``; options not given take their defaults.

    Raises
    ------
    ValueError
        Unknown family, an option the family does not take, or a bad value (the pattern's own
        message).
    """
    fam = FAMILIES.get(name)
    if fam is None:
        raise ValueError(f"unknown pattern {name!r}; choose one of {', '.join(FAMILIES)}")
    extra = sorted(set(options) - set(fam.defaults))
    if extra:
        raise ValueError(f"pattern {name!r} takes no option {', '.join(extra)}; "
                         f"its options: {', '.join(fam.defaults) or 'none'}")
    kwargs = dict(fam.defaults)
    kwargs.update(options)
    return fam.make(n, **kwargs)


def available(name):
    """Empty string when the family can be built with this installation, else why not."""
    fam = FAMILIES[name]
    try:
        import sparseattn.patterns as patterns
    except ImportError as exc:
        return f"sparseattn.patterns cannot be imported: {exc}"
    factory = {"sinks": "sinks", "block_sparse": "block_sparse"}.get(fam.name, fam.name)
    return "" if hasattr(patterns, factory) else f"sparseattn.patterns has no {factory}()"
