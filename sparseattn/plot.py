"""Pictures of attention patterns: masks, per-head panels, receptive-field growth, scaling.

Needs matplotlib (``pip install 'sparseattn[plot]'``); importing this module without it works, and
the first drawing call raises an ImportError saying what to install.

Masks are drawn from the index structures, never from an ``n x n`` array: up to ``resolution``
tokens per side each pixel is one (query, key) pair; beyond, each pixel is a bin of tokens shaded
by the fraction of its pairs that are allowed (the *element* view), or the block-CSR grid shows
which tiles a kernel visits, full or partial (the *block* view).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from .analysis import _layout_of, loglog_slope, mask_rows, receptive_field
from .layout import BlockCSRLayout, CSRLayout, _rows_of

__all__ = ["mask_image", "block_image", "plot_mask", "plot_heads", "plot_patterns",
           "plot_receptive_field", "plot_scaling", "savefig"]

#: Above this many allowed pairs a block layout is drawn per block (pixels of whole blocks)
#: rather than converted to its token form.
_ELEMENT_VIEW_MAX_NNZ = 1 << 25

_MISSING = (
    "sparseattn.plot needs matplotlib, which is not installed: "
    "pip install 'sparseattn[plot]' (or pip install matplotlib)"
)


def _pyplot():
    try:
        import matplotlib.pyplot as plt
    except ImportError as exc:  # a clear message instead of a bare ModuleNotFoundError
        raise ImportError(_MISSING) from exc
    return plt


# ----------------------------------------------------------------------------- images (no matplotlib)


def _bin_size(n, resolution, multiple=1):
    """Tokens per pixel: 1 up to ``resolution`` tokens, else the smallest multiple of ``multiple``
    that fits ``n`` into ``resolution`` pixels."""
    if n <= resolution:
        return 1
    b = -(-n // resolution)
    return -(-b // multiple) * multiple


def _check_resolution(resolution):
    if isinstance(resolution, (bool, np.bool_)) or not isinstance(resolution, (int, np.integer)):
        raise TypeError(f"resolution must be an int, got {type(resolution).__name__}")
    if resolution < 8:
        raise ValueError(f"resolution must be >= 8 pixels, got {resolution}")
    return int(resolution)


def _head_of(layout, head):
    if layout.heads == 1:
        return 0
    if not 0 <= head < layout.heads:
        raise ValueError(f"head must lie in [0, {layout.heads}), got {head}")
    return int(head)


def mask_image(obj, n=None, *, head=0, resolution=512, n_k=None, region=None):
    """Element view of a mask as a small image: the fraction of allowed pairs per pixel.

    Parameters
    ----------
    obj : pattern, CSRLayout or BlockCSRLayout
    n : int, optional
        Sequence length; required for a pattern.
    head : int, default 0
        Head to draw (a shared layout has only one).
    resolution : int, default 512
        Largest image side in pixels. Up to this many tokens a pixel is one pair (exact mask).
    n_k : int, optional
        Key length of a pattern, defaults to ``n``.
    region : tuple of int, optional
        ``(lo, hi)``: draw only queries and keys in ``[lo, hi)`` (a zoom on the diagonal), read
        from those rows of the layout; at most 8192 tokens wide.

    Returns
    -------
    image : ndarray of float64, shape (rows, cols)
        Values in [0, 1]; 1 where every pair of the pixel's bin is allowed.
    bins : tuple of int
        Tokens per pixel along queries and keys.
    """
    resolution = _check_resolution(resolution)
    lay = _as_layout(obj, n, n_k, block=False)
    n_q, nk = lay.shape
    h = _head_of(lay, head)
    if region is not None:
        return _region_image(lay, h, region, resolution)
    if isinstance(lay, BlockCSRLayout):
        bq, bk = lay.block_size
        # whole blocks per pixel: count per block, no element work. Used when a pixel is at least
        # half a block anyway, or when the token form would be too large to build for a picture.
        coarse = -(-n_q // resolution) * 2 >= bq and -(-nk // resolution) * 2 >= bk
        if coarse or lay.nnz > _ELEMENT_VIEW_MAX_NNZ:
            rq, rk = _bin_size(n_q, resolution, bq), _bin_size(nk, resolution, bk)
            return _block_counts_image(lay, h, rq, rk), (rq, rk)
        lay = lay.to_csr()
    rq, rk = _bin_size(n_q, resolution), _bin_size(nk, resolution)
    lo, hi = lay.indptr[h * n_q], lay.indptr[(h + 1) * n_q]
    rows = _rows_of(lay.indptr[h * n_q: (h + 1) * n_q + 1] - lo)
    cols = lay.indices[lo:hi].astype(np.int64)
    return _binned(rows // rq, cols // rk, np.ones(rows.shape[0]), n_q, nk, rq, rk), (rq, rk)


def _region_image(lay, h, region, resolution):
    try:
        lo, hi = (int(x) for x in region)
    except (TypeError, ValueError):
        raise TypeError(f"region must be a pair of ints (lo, hi), got {region!r}") from None
    if not 0 <= lo < hi <= min(lay.shape) or hi - lo > 8192:
        raise ValueError(f"region must satisfy 0 <= lo < hi <= {min(lay.shape)} and hi - lo <= 8192, "
                         f"got {(lo, hi)}")
    sub = mask_rows(lay, np.arange(lo, hi), h)[:, lo:hi]
    m = hi - lo
    r = _bin_size(m, resolution)
    rows, cols = np.nonzero(sub)
    return _binned(rows // r, cols // r, np.ones(rows.shape[0]), m, m, r, r), (r, r)


def _binned(brow, bcol, weight, n_q, n_k, rq, rk):
    """Sum ``weight`` into pixels and divide by each pixel's (clipped) area."""
    pr, pc = -(-n_q // rq), -(-n_k // rk)
    img = np.bincount(brow * pc + bcol, weights=weight, minlength=pr * pc).reshape(pr, pc)
    area = (np.minimum(rq, n_q - np.arange(pr) * rq)[:, None]
            * np.minimum(rk, n_k - np.arange(pc) * rk)[None, :])
    return img / np.maximum(area, 1)


def _block_counts_image(lay, h, rq, rk):
    nbq, _ = lay.grid
    bq, bk = lay.block_size
    lo, hi = lay.indptr[h * nbq], lay.indptr[(h + 1) * nbq]
    brow = _rows_of(lay.indptr[h * nbq: (h + 1) * nbq + 1] - lo)
    bcol = lay.indices[lo:hi].astype(np.int64)
    mi = lay.mask_index[lo:hi]
    count = (np.minimum(bq, lay.n_q - brow * bq) * np.minimum(bk, lay.n_k - bcol * bk)).astype(np.float64)
    part = mi >= 0
    if part.any():
        per_mask = lay.masks.reshape(lay.masks.shape[0], -1).sum(axis=1)
        count[part] = per_mask[mi[part]]
    return _binned(brow * bq // rq, bcol * bk // rk, count, lay.n_q, lay.n_k, rq, rk)


def block_image(obj, n=None, *, head=0, block_size=(64, 64), resolution=512, n_k=None):
    """Block view: which tiles of the block-CSR layout a kernel visits.

    Returns
    -------
    image : ndarray of float64, shape (rows, cols)
        1 for a full block, 0.5 for a partial block (it carries an element mask), 0 for a block
        that is skipped. Beyond ``resolution`` blocks per side a pixel covers several blocks and
        shows the largest value among them.
    block_size : tuple of int
        Block size of the layout drawn.
    """
    resolution = _check_resolution(resolution)
    lay = _as_layout(obj, n, n_k, block=True, block_size=block_size)
    if isinstance(lay, CSRLayout):
        lay = lay.to_block(block_size)
    h = _head_of(lay, head)
    nbq, nbk = lay.grid
    lo, hi = lay.indptr[h * nbq], lay.indptr[(h + 1) * nbq]
    brow = _rows_of(lay.indptr[h * nbq: (h + 1) * nbq + 1] - lo)
    bcol = lay.indices[lo:hi].astype(np.int64)
    val = np.where(lay.mask_index[lo:hi] >= 0, 0.5, 1.0)
    rq, rk = _bin_size(nbq, resolution), _bin_size(nbk, resolution)
    pr, pc = -(-nbq // rq), -(-nbk // rk)
    img = np.zeros(pr * pc)
    np.maximum.at(img, (brow // rq) * pc + bcol // rk, val)
    return img.reshape(pr, pc), lay.block_size


def _as_layout(obj, n, n_k, *, block, block_size=(64, 64)):
    if isinstance(obj, (CSRLayout, BlockCSRLayout)):
        return obj
    if n is None:
        raise ValueError("n must be given to draw a pattern (only a layout knows its own size)")
    # a pattern builds its block form directly, cheap at any n; the token form costs O(nnz)
    return _layout_of(obj, n, n_k, block_size=block_size if block else (64, 64))


# ----------------------------------------------------------------------------- drawing


def _new_axes(ax, figsize=(4, 4)):
    if ax is not None:
        return ax.figure, ax
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=figsize, constrained_layout=True)
    return fig, ax


def plot_mask(obj, n=None, *, view="element", head=0, ax=None, resolution=512, block_size=(64, 64),
              title=None, cmap="Greys", region=None):
    """Draw a pattern's (or layout's) mask: query rows down, key columns across.

    Parameters
    ----------
    obj : pattern, CSRLayout or BlockCSRLayout
    n : int, optional
        Sequence length; required for a pattern.
    view : {"element", "block"}, default "element"
        ``"element"``: allowed pairs (exact up to ``resolution`` tokens, a fraction per bin
        beyond). ``"block"``: the block-CSR tiles, full (dark) or partial (grey).
    head : int, default 0
    ax : matplotlib Axes, optional
        Axes to draw in; a new figure otherwise.
    resolution : int, default 512
        Largest image side in pixels.
    block_size : tuple of int, default (64, 64)
        Block size of the block view (and of the layout built from a pattern).
    title : str, optional
        Defaults to the view, size and density.
    cmap : str, default "Greys"
    region : tuple of int, optional
        ``(lo, hi)``: element view of positions ``[lo, hi)`` only (see :func:`mask_image`).

    Returns
    -------
    matplotlib.axes.Axes
    """
    if view not in ("element", "block"):
        raise ValueError(f"view must be 'element' or 'block', got {view!r}")
    lay = _as_layout(obj, n, None, block=view == "block", block_size=block_size)
    _, ax = _new_axes(ax)
    n_q, n_k = lay.shape
    extent = (0, n_k, n_q, 0)
    if region is not None:
        img, (rq, rk) = mask_image(lay, head=head, resolution=resolution, region=region)
        what = f"positions {region[0]}-{region[1]}, " + ("pairs" if rq == 1 else f"{rq}x{rk}-token bins")
        extent = (region[0], region[1], region[1], region[0])
    elif view == "element":
        img, (rq, rk) = mask_image(lay, head=head, resolution=resolution)
        what = "pairs" if rq == rk == 1 else f"{rq}x{rk}-token bins"
    else:
        img, (bq, bk) = block_image(lay, head=head, block_size=block_size, resolution=resolution)
        what = f"{bq}x{bk} blocks: full dark, partial grey"
    ax.imshow(img, cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest",
              extent=extent, aspect="auto")
    ax.set_xlabel("key position")
    ax.set_ylabel("query position")
    if title is None:
        title = f"n={n_q}, density {lay.density:.3g}"
    ax.set_title(f"{title}\n({what})", fontsize=9)
    return ax


def _grid(count, ncols, panel=3.0):
    plt = _pyplot()
    ncols = max(1, min(ncols, count))
    nrows = -(-count // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(panel * ncols, panel * nrows + 0.3),
                             constrained_layout=True, squeeze=False)
    for ax in axes.ravel()[count:]:
        ax.set_visible(False)
    return fig, axes.ravel()[:count]


def plot_heads(obj, n=None, *, heads=None, view="element", ncols=4, resolution=256, block_size=(64, 64)):
    """One panel per head of a per-head pattern or a multi-head layout.

    Parameters
    ----------
    obj : pattern, CSRLayout or BlockCSRLayout
    n : int, optional
        Sequence length; required for a pattern.
    heads : int, optional
        Heads to build a pattern for; defaults to the layout's heads.
    view, resolution, block_size
        As in :func:`plot_mask`.
    ncols : int, default 4

    Returns
    -------
    matplotlib.figure.Figure
    """
    if isinstance(obj, (CSRLayout, BlockCSRLayout)):
        lay = obj
    else:
        if n is None:
            raise ValueError("n must be given to draw a pattern")
        lay = _layout_of(obj, n, None, heads=heads, block_size=block_size if view == "block" else None)
    fig, axes = _grid(lay.heads, ncols)
    for h, ax in enumerate(axes):
        plot_mask(lay, view=view, head=h, ax=ax, resolution=resolution, block_size=block_size,
                  title=f"head {h}")
    return fig


def plot_patterns(patterns, n, *, view="element", ncols=3, resolution=256, block_size=(64, 64),
                  zoom=None):
    """A grid of masks, one panel per named pattern or layout.

    Parameters
    ----------
    patterns : mapping of str to pattern or layout
    n : int
        Sequence length the patterns are built for.
    view, resolution, block_size
        As in :func:`plot_mask`.
    ncols : int, default 3
    zoom : int, optional
        Also draw the first ``zoom`` positions of each pattern, pair by pair, in a row of panels
        under each row of whole masks: at large ``n`` single columns (sinks, global tokens,
        strides) vanish in the whole view.

    Returns
    -------
    matplotlib.figure.Figure
    """
    if not isinstance(patterns, Mapping) or not patterns:
        raise TypeError("patterns must be a non-empty mapping of name to pattern or layout")
    items = list(patterns.items())
    ncols = max(1, min(ncols, len(items)))
    if zoom is None:
        fig, axes = _grid(len(items), ncols)
        slots = [(item, ax, None) for item, ax in zip(items, axes)]
    else:
        nrows = -(-len(items) // ncols)
        fig, axes = _grid(2 * nrows * ncols, ncols)
        slots = []
        for i, item in enumerate(items):
            r, c = divmod(i, ncols)
            slots.append((item, axes[2 * r * ncols + c], None))
            slots.append((item, axes[(2 * r + 1) * ncols + c], (0, min(int(zoom), n))))
        used = {id(ax) for _, ax, _ in slots}
        for ax in axes:
            ax.set_visible(id(ax) in used)
    for (name, p), ax, region in slots:
        lay = _as_layout(p, n, None, block=True, block_size=block_size)
        plot_mask(lay, view=view, ax=ax, resolution=resolution, block_size=block_size, region=region,
                  title=f"{name}, density {lay.density:.3g}" if region is None else f"{name}, zoom")
    return fig


def plot_receptive_field(stacks, n=None, *, layers=None, ax=None, residual=True, reference=None,
                         reduce="max"):
    """Receptive-field growth: positions reaching a token (max over tokens) after each layer.

    Parameters
    ----------
    stacks : mapping of str to (stack of patterns, pattern, or precomputed counts)
        A 1-D array of counts per layer is drawn as is; anything else goes through
        :func:`sparseattn.analysis.receptive_field` with ``n`` and ``layers``.
    n : int, optional
        Sequence length, needed to compute.
    layers : int, optional
        Layers for single patterns.
    ax : matplotlib Axes, optional
    residual : bool, default True
        Passed to :func:`~sparseattn.analysis.receptive_field`.
    reference : float, optional
        Draws the line ``l * reference`` (e.g. the window: the "L layers of window w reach L*w"
        rule of thumb).
    reduce : {"max", "mean", "min"}, default "max"
        Summary over tokens, passed to :func:`~sparseattn.analysis.receptive_field`.

    Returns
    -------
    matplotlib.axes.Axes
    """
    if not isinstance(stacks, Mapping) or not stacks:
        raise TypeError("stacks must be a non-empty mapping of name to patterns or counts")
    _, ax = _new_axes(ax, figsize=(5, 3.5))
    top = 0
    for name, s in stacks.items():
        if isinstance(s, np.ndarray) and s.ndim == 1 and np.issubdtype(s.dtype, np.number):
            counts = s
        else:
            if n is None:
                raise ValueError("n must be given to compute a receptive field")
            counts = receptive_field(s, n, layers=layers, residual=residual, reduce=reduce)
        x = np.arange(1, counts.shape[0] + 1)
        ax.plot(x, counts, marker="o", label=str(name))
        top = max(top, x[-1])
    if reference is not None:
        x = np.arange(1, top + 1)
        ax.plot(x, x * reference, "k--", lw=1, label=f"L x {reference:g}")
    if n is not None:
        ax.axhline(n, color="grey", lw=0.8, ls=":", label=f"n = {n}")
    ax.set_xlabel("layers")
    ax.set_ylabel(f"positions reaching a token ({reduce})")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    return ax


def plot_scaling(records, *, ax=None, x="n", y="time_s", by="pattern"):
    """Log-log plot of time against sequence length, one line per pattern, with fitted slopes.

    Parameters
    ----------
    records : list of dict
        Each with keys ``x`` (e.g. ``"n"``), ``y`` (e.g. ``"time_s"``) and ``by`` (the label).
        NaN or missing times are skipped.
    ax : matplotlib Axes, optional
    x, y, by : str
        Keys of the records.

    Returns
    -------
    matplotlib.axes.Axes
        The legend gives each line's slope (1 for linear cost, 2 for dense attention).
    """
    _, ax = _new_axes(ax, figsize=(6, 4.5))
    groups = {}
    for r in records:
        t = r.get(y)
        if t is None or not np.isfinite(t) or t <= 0:
            continue
        groups.setdefault(str(r[by]), []).append((r[x], t))
    if not groups:
        raise ValueError(f"records hold no positive, finite {y!r} to plot")
    for name, pts in groups.items():
        pts.sort()
        xs, ys = np.array(pts, dtype=float).T
        label = name
        if len(xs) >= 2:
            label = f"{name} (slope {loglog_slope(xs, ys):.2f})"
        ax.plot(xs, ys, marker="o", ls="--" if name.startswith("dense") else "-", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length N")
    ax.set_ylabel("time per forward pass (s)")
    ax.grid(True, which="both", lw=0.3)
    ax.legend(fontsize=8)
    return ax


def savefig(fig_or_ax, path, dpi=110):
    """Save a figure (or an Axes' figure) to ``path`` and close it."""
    fig = getattr(fig_or_ax, "figure", fig_or_ax)
    fig.savefig(path, dpi=dpi)
    _pyplot().close(fig)
    return path
