"""KV caches for autoregressive decoding, shaped by the attention pattern.

Sparse attention shrinks the KV cache only if the cache knows the pattern:

* ``sliding_window(w)``: a rolling buffer (Mistral: slot ``= position % w``), ``O(w)`` memory
  however long the stream runs.
* ``sinks(s) | sliding_window(w)``: the first ``s`` and the last ``w`` entries (StreamingLLM);
  everything between is evicted.
* ``dense()``: the full, growing cache (amortised doubling).

Decoding is causal: a cache computes exactly ``sa.attention`` with
``sa.patterns.causal(pattern)`` over the whole stream, the new queries being the last positions
appended. Single-token decode runs a backend ``decode`` kernel on the buffers as they are (no
layout, no per-token allocation beyond the output); a prefill chunk runs the backend's forward
kernel with the pattern's layout over the chunk and the cached keys it needs.

:class:`KVCacheStack` (``KVCache.for_plan``) gives each layer of a hybrid stack the cache its
pattern needs and reports the memory saved against an all-dense stack.
"""

from __future__ import annotations

import numpy as np

from . import backends as _backends
from ._validation import array_info, check_scale
from .api import resolve_layout

__all__ = ["KVCache", "KVCacheStack", "cache_spec"]

_POSITIONS = ("original", "cache")
_SUPPORTED = ("sliding_window(w) (causal or not: the cache keeps its causal part), "
              "sinks(s) | sliding_window(w), dense(), sinks(s), and sa.patterns.causal(...) of these")


# ----------------------------------------------------------------------------- pattern -> cache shape


def cache_spec(pattern):
    """What a cache must keep for ``sa.patterns.causal(pattern)``: ``(window, n_sink)``.

    Parameters
    ----------
    pattern : Pattern
        ``dense``, ``sliding_window``, ``sinks``, unions of these, or ``causal(...)`` of one.

    Returns
    -------
    window : int or None
        The most recent ``window`` positions (including the query's own); ``None``: every position.
    n_sink : int
        The first ``n_sink`` positions are kept as well.

    Raises
    ------
    ValueError
        For any other pattern, naming the patterns a cache supports.
    """
    from .patterns import base as pb
    from .patterns import local as pl

    if isinstance(pattern, pb.Causal):
        return cache_spec(pattern.pattern)
    if isinstance(pattern, pl.Dense):
        return None, 0
    if isinstance(pattern, pl.SlidingWindow):
        # causal=False allows |i - j| <= w // 2; its causal part is the last w // 2 + 1 keys
        return (pattern.window if pattern.causal else pattern.window // 2 + 1), 0
    if isinstance(pattern, pl.Sinks):
        return 0, pattern.n_sink
    if isinstance(pattern, pb.Union):
        specs = [cache_spec(p) for p in pattern.parts]
        if any(w is None for w, _ in specs):
            return None, 0
        return max(w for w, _ in specs), max(s for _, s in specs)
    raise ValueError(
        f"KVCache does not support the pattern {pattern!r}: a cache can keep the keys of "
        f"{_SUPPORTED}. Use sa.attention over the whole sequence for other patterns."
    )


def _canonical(window, n_sink):
    """The causal pattern a cache computes, in its simplest form (equal to ``causal(pattern)``)."""
    from .patterns import local as pl

    if window is None:
        return pl.dense(causal=True)
    if n_sink == 0:
        return pl.sliding_window(window) if window else pl.sinks(0)
    return pl.sinks(n_sink) | pl.sliding_window(window) if window else pl.sinks(n_sink)


def _info(x, name):
    """Shape and dtype; NumPy arrays take a fast path (this runs twice per decoded token)."""
    if type(x) is np.ndarray:
        return x.shape, x.dtype
    return array_info(x, name)


def _check_dim(value, name):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


# ----------------------------------------------------------------------------- the cache


class KVCache:
    """A key/value cache for autoregressive decoding, shaped by the attention pattern.

    Parameters
    ----------
    pattern : Pattern
        ``sa.patterns.sliding_window(w)`` (rolling buffer of ``w`` entries),
        ``sa.patterns.sinks(s) | sa.patterns.sliding_window(w)`` (first ``s`` and last ``w``
        entries), ``sa.patterns.dense()`` (full cache), or ``causal(...)`` of these. The cache
        computes ``sa.attention`` with ``sa.patterns.causal(pattern)``.
    heads : int
        Key/value heads ``Hkv``. :meth:`attend` takes any multiple of them as query heads (GQA).
    head_dim : int
        ``D`` of queries and keys.
    dtype : float32 or float64, default float32
        Storage and compute dtype.
    backend : str, optional
        Backend whose arrays hold the cache and whose kernels run (default: the current one).
    value_dim : int, optional
        ``Dv``; defaults to ``head_dim``.
    positions : {"original", "cache"}, default "original"
        Positions given to ``rope``. ``"original"``: a token's position in the stream.
        ``"cache"``: its index among the keys held (StreamingLLM's position shift: sinks
        ``0..s-1``, then the recent keys in order, the query at its own key's index). Without
        ``rope`` both give the same outputs.
    rope : callable, optional
        ``rope(x, positions) -> x_rotated`` with ``x`` ``(H, n, D)`` and ``positions`` int64
        ``(n,)``: rotary embeddings re-applied by the cache. Give it un-rotated ``q`` and ``k``.
        With ``positions="original"`` keys are rotated once, when appended; with ``"cache"``
        they are rotated at every :meth:`attend`, at their current cache positions.
    scale : float, optional
        Score scale; defaults to ``1 / sqrt(head_dim)``.
    capacity : int, optional
        Initial capacity of a dense (full) cache; it doubles when full.

    Attributes
    ----------
    window : int or None
        Recent positions kept (``None``: all).
    n_sink : int
        Leading positions kept.
    length : int
        Positions appended so far (``len(cache)``).

    Notes
    -----
    :meth:`attend` takes the queries of the last positions appended. One query (decode) can always
    be answered. Several queries (a prefill chunk) need the keys before them: a dense cache has
    them; a rolling one keeps them only for the chunk of the latest :meth:`append`, so append a
    chunk, then attend its queries (or fewer, the last ones).

    Examples
    --------
    >>> import numpy as np, sparseattn as sa
    >>> cache = sa.KVCache(sa.patterns.sliding_window(4), heads=2, head_dim=8)
    >>> rng = np.random.default_rng(0)
    >>> for t in range(10):
    ...     k, v = rng.standard_normal((2, 2, 1, 8), dtype=np.float32)
    ...     cache.append(k, v)
    ...     out = cache.attend(rng.standard_normal((4, 1, 8), dtype=np.float32))
    >>> out.shape, len(cache), cache.n_cached, cache.buffer_nbytes  # 4 entries held, not 10
    ((4, 1, 8), 10, 4, 512)
    """

    def __init__(self, pattern, heads, head_dim, dtype=np.float32, backend=None, *, value_dim=None,
                 positions="original", rope=None, scale=None, capacity=None):
        from .patterns import base as pb

        if not isinstance(pattern, pb.Pattern):
            raise TypeError(
                f"pattern must be a sparseattn pattern ({_SUPPORTED}), got {type(pattern).__name__}"
            )
        self.window, self.n_sink = cache_spec(pattern)
        self.pattern = pattern
        self._causal = _canonical(self.window, self.n_sink)
        self.heads = _check_dim(heads, "heads")
        self.head_dim = _check_dim(head_dim, "head_dim")
        self.value_dim = self.head_dim if value_dim is None else _check_dim(value_dim, "value_dim")
        try:
            dt = np.dtype(dtype)
        except TypeError:
            raise TypeError(f"dtype must be float32 or float64, got {dtype!r}") from None
        if dt not in (np.dtype(np.float32), np.dtype(np.float64)):
            raise TypeError(f"dtype must be float32 or float64, got {dt}")
        self.dtype = dt
        if positions not in _POSITIONS:
            raise ValueError(f"positions must be one of {_POSITIONS}, got {positions!r}")
        self.positions = positions
        if rope is not None and not callable(rope):
            raise TypeError(f"rope must be callable as rope(x, positions), got {type(rope).__name__}")
        self.rope = rope
        self.scale = check_scale(scale, self.head_dim)
        self._backend = _backends.resolve(backend)
        if self.window is None:
            cap = 256 if capacity is None else _check_dim(capacity, "capacity")
        else:
            if capacity is not None:
                raise ValueError("capacity applies to dense (full) caches only; "
                                 f"this cache keeps {self.n_sink} sinks + {self.window} recent keys")
            cap = self.n_sink + self.window
        self._alloc(cap)
        self._workspace = {}
        self.reset()

    # -- storage
    def _alloc(self, cap):
        xp = self._backend.xp
        self._k = xp.zeros((self.heads, cap, self.head_dim), self.dtype)
        self._v = xp.zeros((self.heads, cap, self.value_dim), self.dtype)

    @property
    def capacity(self):
        """Entries the buffers hold now (fixed for rolling caches)."""
        return int(self._k.shape[1])

    @property
    def rolling(self):
        """Whether old entries are evicted (a window) rather than kept (dense)."""
        return self.window is not None

    def reset(self):
        """Forget every position (buffers are kept and reused)."""
        self.length = 0
        self._ctx = None  # (k, v, chunk length) of the latest multi-token append, rolling caches

    def __len__(self):
        return self.length

    @property
    def n_cached(self):
        """Entries held now: ``min(length, n_sink + window)`` (rolling) or ``length`` (dense)."""
        return self.length if self.window is None else min(self.length, self.capacity)

    @property
    def nbytes(self):
        """Bytes held: buffers, the latest chunk's context and kernel scratch.

        ``O(n_sink + window)`` for a rolling cache however long the stream, ``O(length)`` dense.
        """
        total = self._k.nbytes + self._v.nbytes
        if self._ctx is not None:
            total += self._ctx[0].nbytes + self._ctx[1].nbytes
        total += sum(a.nbytes for a in self._workspace.values() if hasattr(a, "nbytes"))
        return int(total)

    @property
    def buffer_nbytes(self):
        """Bytes of the key/value buffers alone (what persists from token to token)."""
        return int(self._k.nbytes + self._v.nbytes)

    def dense_nbytes(self, length=None):
        """Bytes an all-dense cache would need for ``length`` positions (default: so far)."""
        n = self.length if length is None else int(length)
        return int(n * self.heads * (self.head_dim + self.value_dim) * self.dtype.itemsize)

    def _slot_positions(self):
        """Position held by each slot ``[0, n_cached)``, int64 (host)."""
        n, L, s = self.n_cached, self.length, self.n_sink
        if self.window is None or L <= self.capacity:
            return np.arange(n, dtype=np.int64)
        w = self.window
        slots = np.arange(w, dtype=np.int64)
        first = L - w  # positions first..L-1 live in the ring; slot s + (p - s) % w
        recent = first + (slots - (first - s)) % w
        return np.concatenate([np.arange(s, dtype=np.int64), recent])

    def _ordered_slots(self):
        """Slots ``[0, n_cached)`` ordered by position."""
        n, L, s = self.n_cached, self.length, self.n_sink
        if self.window is None or L <= self.capacity:
            return np.arange(n, dtype=np.int64)
        w = self.window
        first = L - w
        return np.concatenate([np.arange(s, dtype=np.int64),
                               s + (np.arange(first, L, dtype=np.int64) - s) % w])

    def cached_positions(self):
        """Positions of the entries held, in order (sinks, then recent). int64 ndarray."""
        return self._slot_positions()[self._ordered_slots()]

    def keys_values(self):
        """The entries held, in position order: ``(k, v)`` of shapes ``(Hkv, n, D)``, ``(Hkv, n, Dv)``.

        Keys are as stored (rotated when ``rope`` is given with ``positions="original"``).
        """
        order = self._ordered_slots()
        return self._k[:, order], self._v[:, order]

    # -- input checks
    def _check_kv(self, k_new, v_new):
        (ks, kd), (vs, vd) = _info(k_new, "k_new"), _info(v_new, "v_new")
        H, D, Dv = self.heads, self.head_dim, self.value_dim
        if len(ks) != 3 or ks[0] != H or ks[2] != D:
            raise ValueError(f"k_new must have shape (heads={H}, t, head_dim={D}), got {ks}")
        if len(vs) != 3 or vs[0] != H or vs[2] != Dv or vs[1] != ks[1]:
            raise ValueError(
                f"v_new must have shape (heads={H}, t={ks[1]}, value_dim={Dv}), got {vs} (k_new {ks})"
            )
        for name, dt in (("k_new", kd), ("v_new", vd)):
            if dt.kind != "f":
                raise TypeError(f"{name} must be a floating-point array, got dtype {dt}")
        return ks[1]

    def _as_buffer_dtype(self, x):
        if type(x) is np.ndarray and x.dtype == self.dtype and self._backend.xp is np:
            return x
        be = self._backend
        return be.xp.asarray(be.asarray(x), dtype=self.dtype)

    def _rotate(self, x, pos, name):
        be = self._backend
        out = self.rope(x, be.asarray(pos) if be.xp is not np else pos)
        got = tuple(getattr(out, "shape", ()))
        if got != tuple(x.shape):
            raise ValueError(f"rope must return an array shaped like its input {tuple(x.shape)} "
                             f"({name}), got {got}")
        return be.xp.asarray(be.asarray(out), dtype=self.dtype)

    # -- append
    def append(self, k_new, v_new):
        """Add ``t`` new positions (a prefill chunk, or one decoded token).

        Parameters
        ----------
        k_new : array, shape (heads, t, head_dim)
            Un-rotated when the cache has ``rope``.
        v_new : array, shape (heads, t, value_dim)
        """
        t = self._check_kv(k_new, v_new)
        if t == 0:
            return
        k_new = self._as_buffer_dtype(k_new)
        v_new = self._as_buffer_dtype(v_new)
        L = self.length
        if self.rope is not None and self.positions == "original":
            k_new = self._rotate(k_new, np.arange(L, L + t, dtype=np.int64), "k_new")
        if self.window is None:
            self._append_dense(k_new, v_new, L, t)
        else:
            self._append_rolling(k_new, v_new, L, t)
        self.length = L + t

    def _append_dense(self, k_new, v_new, L, t):
        if L + t > self.capacity:
            cap = max(2 * self.capacity, L + t)
            k_old, v_old = self._k, self._v
            self._alloc(cap)
            self._k[:, :L] = k_old[:, :L]
            self._v[:, :L] = v_old[:, :L]
        self._k[:, L:L + t] = k_new
        self._v[:, L:L + t] = v_new

    def _append_rolling(self, k_new, v_new, L, t):
        xp = self._backend.xp
        s, w = self.n_sink, self.window
        self._ctx = None
        if t > 1:
            # a chunk's first queries need up to w - 1 keys the chunk is about to evict: keep the
            # context (held sinks, the recent keys before the chunk, the chunk) until the next append
            order = self._ordered_slots()
            keep = order[:min(s, L)]
            recent = order[min(s, L):]
            if w > 1:
                recent = recent[max(0, recent.shape[0] - (w - 1)):]
            else:
                recent = recent[:0]
            idx = np.concatenate([keep, recent])
            self._ctx = (xp.concatenate([self._k[:, idx], k_new], axis=1),
                         xp.concatenate([self._v[:, idx], v_new], axis=1), t)
        # positions < s go to sink slots; of the rest only the last w survive, at s + (p - s) % w
        n_sink_new = max(0, min(t, s - L))
        if n_sink_new:
            self._k[:, L:L + n_sink_new] = k_new[:, :n_sink_new]
            self._v[:, L:L + n_sink_new] = v_new[:, :n_sink_new]
        first = max(L + n_sink_new, L + t - w)  # first position written into the ring
        if w == 0 or first >= L + t:
            return
        if L + t - first == 1:  # decode: one slot, no index array
            slot = s + (first - s) % w
            self._k[:, slot] = k_new[:, t - 1]
            self._v[:, slot] = v_new[:, t - 1]
            return
        slots = s + (np.arange(first, L + t, dtype=np.int64) - s) % w
        off = first - L
        self._k[:, slots] = k_new[:, off:]
        self._v[:, slots] = v_new[:, off:]

    # -- attend
    def attend(self, q_new, return_lse=False):
        """Attention of the queries of the last ``t`` positions appended.

        Parameters
        ----------
        q_new : array, shape (Hq, t, head_dim)
            ``Hq`` a multiple of ``heads`` (GQA: query head ``h`` reads key/value head
            ``h // (Hq // heads)``). Un-rotated when the cache has ``rope``.
        return_lse : bool, default False
            Also return the log-sum-exp of the scaled scores, ``(Hq, t)``.

        Returns
        -------
        out : array, shape (Hq, t, value_dim)
            The cache's dtype, the backend's array kind.
        lse : array, shape (Hq, t)
            Only with ``return_lse``.
        """
        qs, qd = _info(q_new, "q_new")
        H, D = self.heads, self.head_dim
        if len(qs) != 3 or qs[2] != D or qs[0] < 1 or qs[0] % H:
            raise ValueError(
                f"q_new must have shape (Hq, t, head_dim={D}) with Hq a multiple of heads={H}, got {qs}"
            )
        if qd.kind != "f":
            raise TypeError(f"q_new must be a floating-point array, got dtype {qd}")
        hq, t = qs[0], qs[1]
        if t > self.length:
            raise ValueError(f"q_new has {t} queries but only {self.length} positions were appended")
        q = self._as_buffer_dtype(q_new)
        if t == 0:
            xp = self._backend.xp
            out = xp.zeros((hq, 0, self.value_dim), self.dtype)
            return (out, xp.zeros((hq, 0), self.dtype)) if return_lse else out
        if t == 1:
            out, lse = self._decode(q, hq)
        else:
            out, lse = self._prefill(q, hq, t)
        return (out, lse) if return_lse else out

    def _decode(self, q, hq):
        be = self._backend
        n = self.n_cached
        k = self._k
        q2 = q.reshape(hq, self.head_dim)
        if self.rope is not None:
            L = self.length
            if self.positions == "original":
                q2 = self._rotate(q2[:, None], np.array([L - 1], np.int64), "q_new")[:, 0]
            else:
                cpos = self._cache_rank(self._slot_positions())
                own = n - 1 if (self.window is None or self.window > 0 or L <= self.n_sink) else n
                k = self._rotate(k[:, :n], cpos, "keys")
                q2 = self._rotate(q2[:, None], np.array([own], np.int64), "q_new")[:, 0]
        q2 = be.xp.ascontiguousarray(q2)
        out, lse = be.decode(q2, k, self._v, n, self.scale, self._workspace)
        return out[:, None], lse[:, None]

    def _cache_rank(self, pos):
        """Cache position of each held position: its index in position order."""
        return np.argsort(np.argsort(pos, kind="stable"), kind="stable").astype(np.int64)

    def _prefill(self, q, hq, t):
        be = self._backend
        xp = be.xp
        L = self.length
        if self.window is None:
            kc, vc = self._k[:, :L], self._v[:, :L]
        else:
            if self._ctx is None or t > self._ctx[2]:
                got = 0 if self._ctx is None else self._ctx[2]
                raise ValueError(
                    f"q_new has {t} queries but this rolling cache (window {self.window}) keeps the "
                    f"keys for several queries only for the chunk of the latest append ({got} "
                    f"position(s)): append the chunk, then attend its queries, or decode one at a time"
                )
            kc, vc, _ = self._ctx
        n_ctx = kc.shape[1]
        if self.rope is not None:
            qpos = np.arange(n_ctx - t, n_ctx, dtype=np.int64)
            if self.positions == "original":
                qpos += L - n_ctx
            else:
                kc = self._rotate(kc, np.arange(n_ctx, dtype=np.int64), "keys")
            q = self._rotate(q, qpos, "q_new")
        # in context coordinates (held sinks first, then contiguous positions) the pattern's
        # window distances are the true ones, so the pattern's own layout applies
        lay = resolve_layout(self._causal, t, n_ctx, hq, be.block_size, "pattern")
        out, lse = be.forward(xp.ascontiguousarray(q[None]), xp.ascontiguousarray(kc[None]),
                              xp.ascontiguousarray(vc[None]), lay, self.scale)
        return out[0], lse[0]

    # -- hybrid stacks
    @classmethod
    def for_plan(cls, plan, heads, head_dim, dtype=np.float32, backend=None, **kwargs):
        """One cache per layer of a hybrid stack; see :class:`KVCacheStack`."""
        return KVCacheStack(plan, heads, head_dim, dtype, backend, **kwargs)

    def __repr__(self):
        kind = ("dense" if self.window is None else
                f"sinks={self.n_sink}, window={self.window}" if self.n_sink else f"window={self.window}")
        return (f"KVCache({kind}, heads={self.heads}, head_dim={self.head_dim}, "
                f"value_dim={self.value_dim}, dtype={self.dtype}, length={self.length}, "
                f"nbytes={self.nbytes})")


# ----------------------------------------------------------------------------- stacks of layers


def _plan_patterns(plan):
    """The per-layer patterns of a LayerPlan, or of a sequence of patterns."""
    for attr in ("patterns", "layers"):
        got = getattr(plan, attr, None)
        if got is not None and not callable(got):
            return list(got)
    try:
        return list(plan)
    except TypeError:
        raise TypeError(
            f"plan must be a LayerPlan or a sequence of patterns, got {type(plan).__name__}"
        ) from None


class KVCacheStack:
    """One :class:`KVCache` per layer of a hybrid stack (e.g. a ``LayerPlan``).

    Each layer gets the cache its pattern needs: a rolling buffer for windows, sinks + recent for
    StreamingLLM layers, a full cache for dense layers.

    Parameters
    ----------
    plan : LayerPlan or sequence of Pattern
        One pattern per layer.
    heads, head_dim, dtype, backend, **kwargs
        As for :class:`KVCache`, shared by every layer.

    Examples
    --------
    >>> import sparseattn as sa
    >>> sw, full = sa.patterns.sliding_window(512), sa.patterns.dense(causal=True)
    >>> stack = sa.KVCache.for_plan([sw, sw, sw, full], heads=2, head_dim=64)
    >>> len(stack)
    4
    """

    def __init__(self, plan, heads, head_dim, dtype=np.float32, backend=None, **kwargs):
        pats = _plan_patterns(plan)
        if not pats:
            raise ValueError("plan has no layers")
        self.caches = []
        for i, p in enumerate(pats):
            try:
                self.caches.append(KVCache(p, heads, head_dim, dtype, backend, **kwargs))
            except ValueError as exc:
                raise ValueError(f"layer {i}: {exc}") from None

    def __len__(self):
        return len(self.caches)

    def __getitem__(self, i):
        return self.caches[i]

    def __iter__(self):
        return iter(self.caches)

    @property
    def nbytes(self):
        """Bytes held by all layers."""
        return sum(c.nbytes for c in self.caches)

    def dense_nbytes(self, length=None):
        """Bytes an all-dense stack would hold for ``length`` positions (default: so far)."""
        return sum(c.dense_nbytes(length) for c in self.caches)

    def memory_report(self, length=None):
        """Memory of this stack against an all-dense one.

        Parameters
        ----------
        length : int, optional
            Stream length to report for; default: the positions appended so far. For a length
            other than the current one, the stack's bytes are projected (rolling layers stay
            fixed; dense layers hold ``length`` positions).

        Returns
        -------
        dict
            ``nbytes`` (key/value buffers, :attr:`KVCache.buffer_nbytes`), ``dense_nbytes``, ``saved_bytes``, ``saved_fraction`` and ``layers``
            (per layer: ``kind``, ``nbytes``, ``dense_nbytes``).
        """
        layers = []
        for c in self.caches:
            if length is None:
                nb = c.buffer_nbytes
            elif c.window is None:  # entries only, as the dense baseline counts them
                nb = c.dense_nbytes(length)
            else:
                per = c.heads * (c.head_dim + c.value_dim) * c.dtype.itemsize
                nb = min(int(length), c.capacity) * per
            kind = ("dense" if c.window is None else
                    f"sinks({c.n_sink}) + window({c.window})" if c.n_sink else f"window({c.window})")
            layers.append({"kind": kind, "nbytes": int(nb), "dense_nbytes": c.dense_nbytes(length)})
        total = sum(x["nbytes"] for x in layers)
        dense = sum(x["dense_nbytes"] for x in layers)
        return {"nbytes": total, "dense_nbytes": dense, "saved_bytes": dense - total,
                "saved_fraction": (dense - total) / dense if dense else 0.0, "layers": layers}

    def reset(self):
        for c in self.caches:
            c.reset()

    def __repr__(self):
        r = self.memory_report()
        return (f"KVCacheStack({len(self)} layers, nbytes={r['nbytes']}, "
                f"all-dense {r['dense_nbytes']}, saved {r['saved_fraction']:.1%})")
