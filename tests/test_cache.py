"""KVCache: decoding through a pattern-shaped cache equals attention over the whole stream."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import sparseattn as sa
import sparseattn.patterns as pl
from sparseattn.cache import KVCacheStack, cache_spec

TOL = {np.float32: 2e-5, np.float64: 1e-12}


def _data(rng, hq, hkv, n, d, dv, dtype):
    q = rng.standard_normal((hq, n, d)).astype(dtype)
    k = rng.standard_normal((hkv, n, d)).astype(dtype)
    v = rng.standard_normal((hkv, n, dv)).astype(dtype)
    return q, k, v


def _stream(cache, q, k, v, chunks):
    """Append/attend chunk by chunk (sizes cycle through ``chunks``); the outputs, concatenated."""
    n = k.shape[1]
    outs, p, i = [], 0, 0
    while p < n:
        t = min(chunks[i % len(chunks)], n - p)
        i += 1
        cache.append(k[:, p:p + t], v[:, p:p + t])
        outs.append(cache.attend(q[:, p:p + t]))
        p += t
    return np.concatenate(outs, axis=1)


def _brute(q, k, v, mask, scale=None):
    """Dense float64 masked softmax, GQA; mask (n, n) bool."""
    hq, hkv = q.shape[0], k.shape[0]
    kk = np.repeat(k.astype(np.float64), hq // hkv, axis=0)
    vv = np.repeat(v.astype(np.float64), hq // hkv, axis=0)
    scale = 1 / np.sqrt(q.shape[-1]) if scale is None else scale
    s = np.einsum("hid,hjd->hij", q.astype(np.float64), kk) * scale
    s = np.where(mask, s, -np.inf)
    m = s.max(-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0)
    p = np.exp(s - m)
    den = p.sum(-1, keepdims=True)
    return np.where(den > 0, p @ vv / np.where(den > 0, den, 1), 0.0)


def _mask(n, window, n_sink):
    i = np.arange(n)[:, None]
    j = np.arange(n)[None, :]
    m = j <= i
    if window is not None:
        m &= (j > i - window) | (j < n_sink)
    return m


def rope(x, pos, base=10000.0):
    """Rotate-half rotary embedding: x (H, n, D) at positions pos (n,)."""
    d = x.shape[-1]
    inv = base ** (-np.arange(0, d, 2) / d)
    ang = pos[:, None].astype(np.float64) * inv[None, :]
    cos, sin = np.cos(ang), np.sin(ang)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return np.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1).astype(x.dtype)


PATTERNS = {
    "window": (pl.sliding_window(16), 16, 0),
    "sinks+window": (pl.sinks(4) | pl.sliding_window(16), 16, 4),
    "dense": (pl.dense(causal=True), None, 0),
}


# ----------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", list(PATTERNS))
@pytest.mark.parametrize("chunks", [[1], [5, 1, 1, 40, 3, 17, 1]], ids=["decode", "chunks"])
def test_stream_equals_attention(name, dtype, chunks):
    """300 steps wrap the 16-entry rolling buffer ~18 times; every step matches sa.attention."""
    pattern, window, n_sink = PATTERNS[name]
    rng = np.random.default_rng(1)
    q, k, v = _data(rng, 4, 2, 300, 8, 8, dtype)
    cache = sa.KVCache(pattern, heads=2, head_dim=8, dtype=dtype)
    got = _stream(cache, q, k, v, chunks)
    want = sa.attention(q, k, v, pattern, backend="reference")
    assert got.dtype == dtype and got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=TOL[dtype], atol=TOL[dtype])
    if window is not None:  # held entries: exactly the sinks and the last `window` positions
        assert cache.capacity == window + n_sink
        np.testing.assert_array_equal(
            cache.cached_positions(), np.r_[np.arange(n_sink), np.arange(300 - window, 300)])
        hk, _ = cache.keys_values()
        np.testing.assert_array_equal(hk, k[:, cache.cached_positions()])


@settings(max_examples=25, deadline=None)
@given(
    window=st.integers(1, 12),
    n_sink=st.integers(0, 5),
    kind=st.sampled_from(["window", "sinks", "dense", "sinks-only"]),
    hkv=st.integers(1, 3),
    group=st.integers(1, 3),
    d=st.integers(1, 9),
    dv=st.integers(1, 7),
    n=st.integers(1, 70),
    chunks=st.lists(st.integers(1, 20), min_size=1, max_size=5),
    dtype=st.sampled_from([np.float32, np.float64]),
    seed=st.integers(0, 2**16),
)
def test_stream_matches_brute_force(window, n_sink, kind, hkv, group, d, dv, n, chunks, dtype, seed):
    pattern = {"window": pl.sliding_window(window),
               "sinks": pl.sinks(n_sink) | pl.sliding_window(window),
               "dense": pl.dense(causal=True),
               "sinks-only": pl.sinks(n_sink)}[kind]
    w, s = cache_spec(pattern)
    rng = np.random.default_rng(seed)
    q, k, v = _data(rng, hkv * group, hkv, n, d, dv, dtype)
    cache = sa.KVCache(pattern, heads=hkv, head_dim=d, dtype=dtype, value_dim=dv)
    got = _stream(cache, q, k, v, chunks)
    want = _brute(q, k, v, _mask(n, w, s))
    np.testing.assert_allclose(got, want, rtol=TOL[dtype], atol=TOL[dtype])
    assert cache.n_cached == (n if w is None else min(n, w + s))


def test_non_causal_patterns_keep_their_causal_part():
    """The cache computes causal(pattern): a non-causal window keeps its past half."""
    assert cache_spec(pl.sliding_window(9, causal=False)) == (5, 0)
    assert cache_spec(pl.dense()) == (None, 0)
    assert cache_spec(pl.sinks(3, causal=False) | pl.sliding_window(7)) == (7, 3)
    assert cache_spec(pl.sinks(2) | pl.dense()) == (None, 0)
    assert cache_spec(pl.causal(pl.sliding_window(4))) == (4, 0)
    rng = np.random.default_rng(2)
    n = 60
    q, k, v = _data(rng, 2, 1, n, 4, 4, np.float64)
    for pattern in (pl.sliding_window(9, causal=False), pl.sinks(3, causal=False) | pl.sliding_window(7)):
        mask = pattern.layout(n, block_size=None).to_dense()[0] & np.tri(n, dtype=bool)
        cache = sa.KVCache(pattern, 1, 4, dtype=np.float64)
        np.testing.assert_allclose(_stream(cache, q, k, v, [1, 6]), _brute(q, k, v, mask), atol=1e-12)


def test_gqa_and_backends_agree():
    rng = np.random.default_rng(3)
    q, k, v = _data(rng, 6, 2, 90, 5, 3, np.float64)
    pattern = pl.sinks(2) | pl.sliding_window(10)
    outs = []
    for be in ("cpu", "reference"):
        cache = sa.KVCache(pattern, 2, 5, dtype=np.float64, backend=be, value_dim=3)
        outs.append(_stream(cache, q, k, v, [1, 1, 12]))
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-12)
    # MQA: one key/value head for all six query heads
    qm, km, vm = q, k[:1], v[:1]
    cache = sa.KVCache(pattern, 1, 5, dtype=np.float64, value_dim=3)
    np.testing.assert_allclose(_stream(cache, qm, km, vm, [1]),
                               _brute(qm, km, vm, _mask(90, 10, 2)), atol=1e-12)


def test_attend_fewer_queries_and_lse():
    rng = np.random.default_rng(4)
    q, k, v = _data(rng, 2, 2, 50, 4, 4, np.float64)
    cache = sa.KVCache(pl.sliding_window(8), 2, 4, dtype=np.float64)
    cache.append(k[:, :30], v[:, :30])
    out, lse = cache.attend(q[:, 25:30], return_lse=True)
    want, want_lse = sa.attention(q[:, :30], k[:, :30], v[:, :30], pl.sliding_window(8),
                                  backend="reference", return_lse=True)
    np.testing.assert_allclose(out, want[:, 25:], atol=1e-12)
    np.testing.assert_allclose(lse, want_lse[:, 25:], atol=1e-12)
    out1, lse1 = cache.attend(q[:, 29:30], return_lse=True)  # decode path
    np.testing.assert_allclose(lse1, want_lse[:, 29:], atol=1e-12)
    assert cache.attend(q[:, :0]).shape == (2, 0, 4)


# ----------------------------------------------------------------------------- rotary positions


@pytest.mark.parametrize("chunks", [[1], [7, 1, 30]])
def test_rope_original_positions(chunks):
    """positions='original': the same as attention over keys and queries rotated in the stream."""
    rng = np.random.default_rng(5)
    n = 120
    q, k, v = _data(rng, 4, 2, n, 8, 8, np.float64)
    pattern = pl.sinks(4) | pl.sliding_window(16)
    pos = np.arange(n)
    want = sa.attention(rope(q, pos), rope(k, pos), v, pattern, backend="reference")
    cache = sa.KVCache(pattern, 2, 8, dtype=np.float64, rope=rope)
    np.testing.assert_allclose(_stream(cache, q, k, v, chunks), want, atol=1e-12)


def test_rope_cache_positions_streamingllm():
    """positions='cache' decodes as StreamingLLM: held keys at their index in the cache."""
    rng = np.random.default_rng(6)
    n, s, w = 80, 4, 12
    q, k, v = _data(rng, 2, 1, n, 8, 8, np.float64)
    cache = sa.KVCache(pl.sinks(s) | pl.sliding_window(w), 1, 8, dtype=np.float64, rope=rope,
                       positions="cache")
    for p in range(n):
        cache.append(k[:, p:p + 1], v[:, p:p + 1])
        got = cache.attend(q[:, p:p + 1])
        held = np.r_[np.arange(min(s, p + 1)), np.arange(max(s, p + 1 - w), p + 1)]
        m = held.shape[0]
        kk = rope(k[:, held], np.arange(m))
        qq = rope(q[:, p:p + 1], np.array([m - 1]))
        want = _brute(qq, kk, v[:, held], np.ones((1, m), bool))
        np.testing.assert_allclose(got, want, atol=1e-12)


def test_rope_cache_positions_window_only_equals_original():
    """Without sinks only relative positions exist: both conventions give the same outputs."""
    rng = np.random.default_rng(7)
    q, k, v = _data(rng, 2, 2, 100, 8, 8, np.float64)
    outs = [_stream(sa.KVCache(pl.sliding_window(10), 2, 8, dtype=np.float64, rope=rope,
                               positions=c), q, k, v, [1, 1, 9]) for c in ("original", "cache")]
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-10)


# ----------------------------------------------------------------------------- memory


def test_memory_flat_over_100k_token_stream():
    rng = np.random.default_rng(8)
    w, s = 64, 4
    cache = sa.KVCache(pl.sinks(s) | pl.sliding_window(w), 2, 8)
    kc = rng.standard_normal((2, 100, 8), dtype=np.float32)
    q1 = rng.standard_normal((4, 1, 8), dtype=np.float32)
    cache.append(kc, kc)
    cache.append(kc[:, :1], kc[:, :1])
    cache.attend(q1)
    base = cache.nbytes
    shapes = (cache._k.shape, cache._v.shape)
    for _ in range(999):  # 100,000 positions in all, in chunks, then single-token decode
        cache.append(kc, kc)
    assert cache.length == 100_001
    cache.append(kc[:, :1], kc[:, :1])
    cache.attend(q1)
    assert cache.nbytes == base and (cache._k.shape, cache._v.shape) == shapes
    assert cache.nbytes < 0.01 * cache.dense_nbytes()
    tracemalloc.start()
    for _ in range(50):
        cache.append(kc[:, :1], kc[:, :1])
        cache.attend(q1)
    first, _ = tracemalloc.get_traced_memory()
    for _ in range(2000):
        cache.append(kc[:, :1], kc[:, :1])
        cache.attend(q1)
    last, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert last - first < 16 * 1024 and peak - first < 64 * 1024  # nothing grows per token
    assert cache.nbytes == base


def test_dense_cache_grows_by_doubling():
    cache = sa.KVCache(pl.dense(causal=True), 1, 4, capacity=8)
    caps = set()
    x = np.ones((1, 1, 4), np.float32)
    for _ in range(1000):
        cache.append(x, x)
        caps.add(cache.capacity)
    assert sorted(caps) == [8 * 2**i for i in range(8)]  # 8 .. 1024: log2 reallocations
    assert cache.n_cached == 1000


# ----------------------------------------------------------------------------- stacks


def test_for_plan_reports_memory_saved():
    sw, full = pl.sliding_window(32), pl.dense(causal=True)
    stack = sa.KVCache.for_plan([sw, pl.sinks(4) | sw, sw, full], heads=2, head_dim=8)
    assert isinstance(stack, KVCacheStack) and len(stack) == 4
    assert [c.window for c in stack] == [32, 32, 32, None]
    x = np.ones((2, 1000, 8), np.float32)
    for c in stack:
        c.append(x, x)
    rep = stack.memory_report()
    per_pos = 2 * 16 * 4
    assert rep["dense_nbytes"] == 4 * 1000 * per_pos
    assert rep["nbytes"] == sum(c.buffer_nbytes for c in stack) <= stack.nbytes
    assert 0.5 < rep["saved_fraction"] < 0.75
    proj = stack.memory_report(length=100_000)
    assert proj["layers"][0]["nbytes"] == 32 * per_pos
    assert proj["layers"][1]["kind"] == "sinks(4) + window(32)"
    assert proj["saved_fraction"] > 0.74
    plan = pl.LayerPlan.hybrid(8, dense_every=4, sparse=pl.sinks(4) | sw)
    stack = sa.KVCache.for_plan(plan, heads=2, head_dim=8)
    assert [c.window for c in stack] == [32, 32, 32, None] * 2
    assert stack.memory_report(length=10_000)["saved_fraction"] > 0.74
    with pytest.raises(ValueError, match="layer 1"):
        sa.KVCache.for_plan([sw, pl.dilated(2)], heads=2, head_dim=8)


# ----------------------------------------------------------------------------- bad input


def test_unsupported_patterns_are_refused():
    for pattern in (pl.dilated(2), pl.sliding_window(4) & pl.sinks(2),
                    pl.per_head([pl.sliding_window(2), pl.dense()])):
        with pytest.raises(ValueError, match="sliding_window"):
            sa.KVCache(pattern, 1, 4)
    with pytest.raises(TypeError, match="pattern"):
        sa.KVCache("window", 1, 4)


def test_bad_arguments():
    pat = pl.sliding_window(4)
    with pytest.raises(TypeError, match="dtype"):
        sa.KVCache(pat, 1, 4, dtype=np.float16)
    with pytest.raises(ValueError, match="heads"):
        sa.KVCache(pat, 0, 4)
    with pytest.raises(TypeError, match="head_dim"):
        sa.KVCache(pat, 1, 4.0)
    with pytest.raises(ValueError, match="positions"):
        sa.KVCache(pat, 1, 4, positions="shifted")
    with pytest.raises(TypeError, match="rope"):
        sa.KVCache(pat, 1, 4, rope=3)
    with pytest.raises(ValueError, match="capacity"):
        sa.KVCache(pat, 1, 4, capacity=100)
    with pytest.raises(ValueError, match="scale"):
        sa.KVCache(pat, 1, 4, scale=-1.0)
    cache = sa.KVCache(pat, 2, 4, value_dim=3)
    x, y = np.zeros((2, 3, 4), np.float32), np.zeros((2, 3, 3), np.float32)
    with pytest.raises(ValueError, match=r"k_new must have shape \(heads=2"):
        cache.append(x[:1], y[:1])
    with pytest.raises(ValueError, match="v_new"):
        cache.append(x, x)
    with pytest.raises(TypeError, match="k_new"):
        cache.append(x.astype(int), y)
    cache.append(x, y)
    with pytest.raises(ValueError, match="multiple of heads=2"):
        cache.attend(np.zeros((3, 1, 4), np.float32))
    with pytest.raises(ValueError, match="only 3 positions"):
        cache.attend(np.zeros((2, 4, 4), np.float32))
    cache.append(x[:, :1], y[:, :1])
    with pytest.raises(ValueError, match="latest append"):
        cache.attend(np.zeros((2, 2, 4), np.float32))
    bad = sa.KVCache(pat, 2, 4, rope=lambda x, p: x[..., :2])
    with pytest.raises(ValueError, match="rope must return"):
        bad.append(x, x)


# ----------------------------------------------------------------------------- the decode kernel


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [0, 37, 3000])
@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("hkv", [1, 3])  # on 2 threads: split-K + merge; one region, no split
def test_cpu_decode_kernel_matches_reference(n, dtype, parallel, hkv, monkeypatch):
    """Serial and split-K parallel paths, any n (splits, partial tiles, no key at all)."""
    from sparseattn import config

    monkeypatch.setattr(config, "DECODE_PARALLEL_WORK", 0 if parallel else 2**62)
    rng = np.random.default_rng(9)
    cap = max(n, 1) + 5  # buffers longer than n: the tail must be ignored
    q = rng.standard_normal((6, 16)).astype(dtype)
    k = rng.standard_normal((hkv, cap, 16)).astype(dtype)
    v = rng.standard_normal((hkv, cap, 5)).astype(dtype)
    k[:, n:] = 1e3  # would dominate the softmax if read
    ws = {}
    for _ in range(2):  # the second call reuses the workspace
        out, lse = sa.backends.get("cpu").decode(q, k, v, n, 0.3, ws)
    ref_out, ref_lse = sa.backends.get("reference").decode(q, k, v, n, 0.3)
    np.testing.assert_allclose(out, ref_out, rtol=TOL[dtype], atol=TOL[dtype])
    np.testing.assert_allclose(lse, ref_lse, rtol=TOL[dtype], atol=TOL[dtype])
    if n == 0:
        assert np.all(out == 0) and np.all(lse == -np.inf)


@pytest.mark.parametrize("value", [np.nan, np.inf])
@pytest.mark.parametrize("n", [40, 3000])  # one split, several splits
def test_decode_kernel_bad_key_gives_nan_rows_like_the_reference(value, n):
    """A NaN/inf key a query head reads makes that head's row NaN (as ``sa.attention`` on the
    reference backend); the split-K merge must not drop the split that met it."""
    rng = np.random.default_rng(0)
    q = rng.standard_normal((4, 16))
    k = rng.standard_normal((2, n, 16))
    v = rng.standard_normal((2, n, 8))
    k[0, n // 2, 3] = value
    q[:, 3] = np.abs(q[:, 3]) + 0.1  # inf * positive = +inf score: NaN row in the reference
    out, lse = sa.backends.get("cpu").decode(q, k, v, n, 0.25)
    lay = sa.CSRLayout(np.array([0, n]), np.arange(n), (1, n))
    ref_o, ref_l = sa.attention(q[None, :, None], k[None], v[None], lay, scale=0.25,
                                backend="reference", return_lse=True)
    np.testing.assert_array_equal(np.isnan(lse), np.isnan(ref_l[0, :, 0]))
    assert np.isnan(lse[:2]).all() and np.isnan(out[:2]).all()
    np.testing.assert_allclose(out[2:], ref_o[0, 2:, 0], rtol=1e-12, atol=1e-12)
