"""Analysis of attention patterns: receptive field over a stack of layers, cost tables.

Everything here works on the index structures (:class:`~sparseattn.CSRLayout`,
:class:`~sparseattn.BlockCSRLayout`) or on patterns (anything with a ``layout`` method), in memory
proportional to the number of allowed pairs; no function builds an ``n x n`` array.

Examples
--------
>>> import sparseattn as sa
>>> reach = sa.analysis.receptive_field([sa.patterns.sliding_window(64)] * 4, 1024)  # doctest: +SKIP
>>> reach.tolist()                                                                 # doctest: +SKIP
[64, 127, 190, 253]
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
from numba import njit, prange

from .layout import BlockCSRLayout, CSRLayout

__all__ = ["receptive_field", "cost", "compare", "layer_layouts", "mask_rows", "loglog_slope",
           "format_table"]

#: Bits of the running reach matrix held at once (a column chunk of ``n x chunk`` booleans, packed).
_REACH_CHUNK_ENTRIES = 1 << 27


# ----------------------------------------------------------------------------- layouts


def _layout_of(obj, n_q, n_k=None, *, heads=None, block_size=None, name="pattern"):
    """A layout as is, or the layout a pattern builds for these sizes."""
    if isinstance(obj, (CSRLayout, BlockCSRLayout)):
        want = (n_q, n_q if n_k is None else n_k)
        if obj.shape != want:
            raise ValueError(f"{name}: layout has shape {obj.shape}, expected {want}")
        return obj
    if callable(getattr(obj, "layout", None)):
        return obj.layout(n_q, n_k, heads=heads, block_size=block_size)
    raise TypeError(
        f"{name} must be a pattern (see sparseattn.patterns), a CSRLayout or a BlockCSRLayout, "
        f"got {type(obj).__name__}"
    )


def layer_layouts(plan_or_patterns, n, layers=None):
    """The token-level layouts of a stack of layers.

    Parameters
    ----------
    plan_or_patterns : pattern, layout, sequence of them, or a layer plan
        A layer plan is anything with a ``layers`` attribute (a sequence of patterns) or a
        ``pattern(layer)`` / ``layout_for_layer`` method; a sequence gives one entry per layer.
    n : int
        Sequence length (square attention, ``n x n``).
    layers : int, optional
        Number of layers. Required for a single pattern or layout (repeated ``layers`` times);
        with a sequence it must match its length if given.

    Returns
    -------
    list of CSRLayout
    """
    n = _check_n(n)
    obj = plan_or_patterns
    items = None
    if hasattr(obj, "layers") and not isinstance(obj, (CSRLayout, BlockCSRLayout)):
        seq = obj.layers
        items = list(seq() if callable(seq) else seq)
    elif isinstance(obj, (CSRLayout, BlockCSRLayout)) or callable(getattr(obj, "layout", None)):
        if layers is None:
            raise ValueError("layers must be given when plan_or_patterns is a single pattern or layout")
        items = [obj] * _check_layers(layers)
    elif isinstance(obj, Iterable) and not isinstance(obj, (str, bytes, Mapping)):
        items = list(obj)
    else:
        raise TypeError(
            "plan_or_patterns must be a pattern, a layout, a sequence of them or a layer plan, "
            f"got {type(obj).__name__}"
        )
    if layers is not None and len(items) != _check_layers(layers):
        raise ValueError(f"layers={layers} does not match the {len(items)} layers given")
    if not items:
        raise ValueError("plan_or_patterns holds no layer")
    built = {}  # stacks repeat a few patterns many times: build each once
    out = []
    for i, p in enumerate(items):
        key = ("layout", id(p)) if isinstance(p, (CSRLayout, BlockCSRLayout)) else ("pattern", p)
        try:
            hash(key)
        except TypeError:  # a pattern holding arrays: build it where it stands
            key = ("unhashable", i)
        if key not in built:
            built[key] = _layout_of(p, n, n, name=f"layer {i}").to_csr()
        out.append(built[key])
    return out


def _check_n(n):
    if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)):
        raise TypeError(f"n must be an int, got {type(n).__name__}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return int(n)


def _check_layers(layers):
    if isinstance(layers, (bool, np.bool_)) or not isinstance(layers, (int, np.integer)):
        raise TypeError(f"layers must be an int, got {type(layers).__name__}")
    if layers < 1:
        raise ValueError(f"layers must be >= 1, got {layers}")
    return int(layers)


def _flow_matrix(layout, residual):
    """Boolean ``(n, n)`` scipy CSR: entry ``(i, j)`` when token ``i`` reads token ``j`` in any head.

    Heads are merged because the output projection mixes them: whatever one head brings to a
    token, the next layer sees. ``residual`` adds the diagonal (the residual stream carries a
    token's own state forward even when its pattern skips itself).
    """
    import scipy.sparse as sp

    n_q, n_k = layout.shape
    a = layout.to_scipy()  # (heads * n, n), heads stacked along rows
    if layout.heads > 1:
        rows = np.repeat(np.arange(layout.heads * n_q) % n_q, np.diff(a.indptr))
        a = sp.csr_array((np.ones(rows.shape[0], bool), (rows, a.indices)), shape=(n_q, n_k))
    if residual:
        a = a + sp.identity(n_q, dtype=bool, format="csr")
    a = sp.csr_array(a, dtype=bool)
    a.sum_duplicates()
    return a


# ----------------------------------------------------------------------------- receptive field


def receptive_field(plan_or_patterns, n, *, layers=None, residual=True, reduce="max"):
    """How many positions can reach a token after each layer of a stack, computed exactly.

    Token ``j`` reaches token ``i`` after layers ``1..l`` when there is a chain ``j = t0, t1, ...,
    tl = i`` with ``t(m-1)`` allowed for query ``tm`` in layer ``m``. The reach sets are the rows of
    the boolean product ``A_l ... A_2 A_1`` of the layers' masks (``scipy.sparse`` CSR), formed
    on column chunks of the source positions, so memory stays at ``n * chunk`` bits and no
    ``n x n`` array is built.

    Parameters
    ----------
    plan_or_patterns : pattern, layout, sequence of them, or a layer plan
        One pattern (or layout) per layer; a single one needs ``layers``. Heads of a layer are
        merged: a position reaches a token if it does in any head.
    n : int
        Sequence length.
    layers : int, optional
        Layer count for a single pattern.
    residual : bool, default True
        Count the residual connection: each token keeps its own state from layer to layer, as
        if every layer allowed the diagonal.
    reduce : {"max", "mean", "min", None}, default "max"
        Summary over tokens per layer; ``None`` returns every token's count.

    Returns
    -------
    ndarray
        ``(layers,)`` int64 for ``"max"`` / ``"min"``, float64 for ``"mean"``, or ``(layers, n)``
        int64 for ``None``: the number of positions that reach a token (itself included when
        its pattern or the residual allows it).

    Notes
    -----
    The work is ``nnz(A) * n / 64`` word operations per layer (Numba, parallel), whatever the
    reach: about a second per layer for a 512-window at ``n = 16384`` on two cores.

    Examples
    --------
    A causal window of ``w`` keys reaches ``l * (w - 1) + 1`` positions after ``l`` layers:

    >>> import sparseattn as sa
    >>> sa.analysis.receptive_field(sa.patterns.sliding_window(8), 256, layers=3).tolist()  # doctest: +SKIP
    [8, 15, 22]
    """
    if reduce not in ("max", "mean", "min", None):
        raise ValueError(f"reduce must be 'max', 'mean', 'min' or None, got {reduce!r}")
    flows = {}
    mats = [flows.setdefault(id(lay), _flow_matrix(lay, residual)) if id(lay) not in flows else flows[id(lay)]
            for lay in layer_layouts(plan_or_patterns, n, layers)]
    counts = _reach_counts(mats, n)
    if reduce is None:
        return counts
    if reduce == "mean":
        return counts.mean(axis=1)
    return getattr(counts, reduce)(axis=1).astype(np.int64)


def _reach_counts(mats, n):
    """Row counts of ``A_l ... A_1`` for every prefix ``l``: shape ``(layers, n)``.

    Column chunk ``C`` of the product only needs column chunk ``C`` of the previous product,
    ``P_l[:, C] = A_l @ P_(l-1)[:, C]``, so chunks are independent and the running matrix never
    exceeds ``n x chunk``. The running chunk is a packed bit matrix and each product ORs the bit
    rows of a token's allowed keys: exact, and 64 columns per machine word. (scipy's boolean
    sparse-sparse product took 137 s for 4 layers of a 512-window at n=16384, the packed form
    a few seconds: the reach sets fill up, so their sparse form stops paying.)
    """
    counts = np.zeros((len(mats), n), np.int64)
    words_total = -(-n // 64)
    words = max(1, min(words_total, _REACH_CHUNK_ENTRIES // (64 * n)))
    cur = np.empty((n, words), np.uint64)
    nxt = np.empty((n, words), np.uint64)
    for w0 in range(0, words_total, words):  # loop over column chunks of 64*words sources
        w1 = min(words_total, w0 + words)
        a, b = cur[:, : w1 - w0], nxt[:, : w1 - w0]
        _identity_bits(a, w0 * 64)
        for layer, m in enumerate(mats):
            _bool_spmm_bits(m.indptr.astype(np.int64), m.indices.astype(np.int64), a, b)
            _popcount_rows_add(b, counts[layer])
            a, b = b, a
    return counts


@njit(cache=True)
def _identity_bits(bits, col0):
    """``bits[i]`` holds source column ``i`` when it falls in this chunk ``[col0, col0 + 64 * words)``."""
    n, words = bits.shape
    bits[:, :] = 0
    for i in range(col0, min(n, col0 + 64 * words)):
        off = i - col0
        bits[i, off // 64] = np.uint64(1) << np.uint64(off % 64)


@njit(parallel=True, cache=True)
def _bool_spmm_bits(indptr, indices, x, out):
    """``out = A @ x`` over booleans, ``A`` in CSR and ``x`` bit-packed along its columns."""
    n, words = x.shape
    for i in prange(n):
        for w in range(words):
            out[i, w] = 0
        for p in range(indptr[i], indptr[i + 1]):
            j = indices[p]
            for w in range(words):
                out[i, w] |= x[j, w]


@njit(parallel=True, cache=True)
def _popcount_rows_add(bits, acc):
    """``acc[i] += `` set bits of row ``i`` (SWAR popcount: Numba has no popcnt intrinsic)."""
    n, words = bits.shape
    m1 = np.uint64(0x5555555555555555)
    m2 = np.uint64(0x3333333333333333)
    m4 = np.uint64(0x0F0F0F0F0F0F0F0F)
    h01 = np.uint64(0x0101010101010101)
    for i in prange(n):
        c = 0
        for w in range(words):
            x = bits[i, w]
            x = x - ((x >> np.uint64(1)) & m1)
            x = (x & m2) + ((x >> np.uint64(2)) & m2)
            x = (x + (x >> np.uint64(4))) & m4
            c += (x * h01) >> np.uint64(56)
        acc[i] += c


# ----------------------------------------------------------------------------- cost


def cost(pattern, n, n_k=None, *, heads=1, head_dim=64, value_dim=None, block_size=(64, 64)):
    """Cost figures of a pattern (or layout) at one size.

    Parameters
    ----------
    pattern : pattern, CSRLayout or BlockCSRLayout
    n : int
        Query length (and key length unless ``n_k`` is given).
    n_k : int, optional
    heads : int, default 1
        Query heads the pattern is applied to: a pattern shared by all heads counts once per head.
    head_dim, value_dim : int
        ``D`` and ``Dv`` for the FLOP count (``Dv`` defaults to ``D``).
    block_size : tuple of int or None, default (64, 64)
        Block size of the tiled kernel whose work (``block_flops``) and index size are reported;
        ``None`` reports the token-level CSR form.

    Returns
    -------
    dict
        ``nnz`` (allowed pairs over all heads), ``density`` (nnz / (heads * n_q * n_k)),
        ``keys_per_query`` (mean), ``flops`` (useful FLOPs of one forward pass), ``bytes`` (index
        arrays), and for block layouts ``block_flops`` (FLOPs a tiled kernel performs on whole
        blocks) and ``blocks``.
    """
    n = _check_n(n)
    n_k = n if n_k is None else _check_n(n_k)
    if isinstance(heads, (bool, np.bool_)) or not isinstance(heads, (int, np.integer)) or heads < 1:
        raise ValueError(f"heads must be a positive int, got {heads!r}")
    lay = _layout_of(pattern, n, n_k, heads=heads, block_size=block_size)
    if block_size is not None and isinstance(lay, CSRLayout):
        lay = lay.to_block(block_size)
    reps = heads // lay.heads if heads % lay.heads == 0 else 1
    out = lay.cost(head_dim, value_dim, q_heads=heads)
    out["nnz"] = lay.nnz * reps
    out["keys_per_query"] = lay.nnz / max(1, lay.heads * n)
    out["density"] = lay.density
    return out


def compare(patterns, n, **kwargs):
    """A cost table of several patterns at one size.

    Parameters
    ----------
    patterns : mapping of name to pattern, or sequence of patterns / layouts
        Unnamed entries are named by their ``repr``.
    n : int
    **kwargs
        Passed to :func:`cost` (``heads``, ``head_dim``, ``block_size`` ...).

    Returns
    -------
    list of dict
        One row per pattern: ``name`` then the fields of :func:`cost`. :func:`format_table`
        prints it.
    """
    items = patterns.items() if isinstance(patterns, Mapping) else ((repr(p), p) for p in patterns)
    rows = []
    for name, p in items:
        row = {"name": str(name)}
        row.update(cost(p, n, **kwargs))
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- helpers


def mask_rows(layout, rows, head=0):
    """Boolean mask of a few query rows of a layout, ``(len(rows), n_k)``.

    Reads the index arrays of those rows only, so it is cheap for any ``n``; used to check
    sampled rows against exact dense attention.

    Parameters
    ----------
    layout : CSRLayout or BlockCSRLayout
    rows : array_like of int
        Query positions.
    head : int, default 0
        Head of the layout (ignored for a shared layout).
    """
    rows = np.asarray(rows, dtype=np.int64).ravel()
    n_q, n_k = layout.shape
    if rows.size and (rows.min() < 0 or rows.max() >= n_q):
        raise ValueError(f"rows must lie in [0, {n_q}), got values in [{rows.min()}, {rows.max()}]")
    h = 0 if layout.heads == 1 else int(head)
    if not 0 <= h < layout.heads:
        raise ValueError(f"head must lie in [0, {layout.heads}), got {head}")
    out = np.zeros((rows.size, n_k), bool)
    if isinstance(layout, CSRLayout):
        r = h * n_q + rows
        starts, ends = layout.indptr[r], layout.indptr[r + 1]
        lens = ends - starts
        which = np.repeat(np.arange(rows.size), lens)
        pos = np.arange(lens.sum()) - np.repeat(np.cumsum(lens) - lens, lens) + np.repeat(starts, lens)
        out[which, layout.indices[pos]] = True
        return out
    bq, bk = layout.block_size
    nbq, _ = layout.grid
    r = h * nbq + rows // bq
    starts, ends = layout.indptr[r], layout.indptr[r + 1]
    lens = ends - starts
    which = np.repeat(np.arange(rows.size), lens)
    blk = np.arange(lens.sum()) - np.repeat(np.cumsum(lens) - lens, lens) + np.repeat(starts, lens)
    bcol = layout.indices[blk].astype(np.int64)
    elem = np.ones((blk.size, bk), bool)
    mi = layout.mask_index[blk]
    part = mi >= 0
    elem[part] = layout.masks[mi[part], (rows[which] % bq)[part]]
    cols = bcol[:, None] * bk + np.arange(bk)[None, :]
    ok = elem & (cols < n_k)
    w2 = np.broadcast_to(which[:, None], cols.shape)
    out[w2[ok], cols[ok]] = True
    return out


def loglog_slope(x, y):
    """Least-squares slope of ``log y`` against ``log x``: the exponent of a power law.

    Dense attention's time grows with slope 2 in the sequence length, a fixed-width sparse
    pattern's with slope 1.

    Parameters
    ----------
    x, y : array_like of positive float, same length >= 2
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.shape != y.shape or x.ndim != 1 or x.shape[0] < 2:
        raise ValueError(f"x and y must be 1-D of the same length >= 2, got {x.shape} and {y.shape}")
    if np.any(x <= 0) or np.any(y <= 0):
        raise ValueError("x and y must be positive for a log-log fit")
    return float(np.polyfit(np.log(x), np.log(y), 1)[0])


def format_table(rows, columns=None, formats=None):
    """Plain-text table of a list of dicts (the output of :func:`compare`, the CLI's tables).

    Parameters
    ----------
    rows : list of dict
    columns : list of str, optional
        Column order; defaults to the keys of the first row.
    formats : dict of str to str or callable, optional
        Format spec (``"{:.3g}"``) or function per column; numbers default to 4 significant digits.
    """
    rows = list(rows)
    if not rows:
        return ""
    columns = list(columns or rows[0].keys())
    formats = formats or {}

    def fmt(col, val):
        f = formats.get(col)
        if val is None or (isinstance(val, float) and np.isnan(val)):
            return "-"
        if callable(f):
            return f(val)
        if f:
            return f.format(val)
        if isinstance(val, (float, np.floating)):
            return f"{val:.4g}"
        if isinstance(val, (int, np.integer)) and not isinstance(val, bool):
            return f"{val:,}"
        return str(val)

    cells = [[fmt(c, r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(columns, widths)))
    sep = "  ".join("-" * w for w in widths)
    body = [
        "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths)))
        for row in cells
    ]
    return "\n".join([line, sep, *body])
