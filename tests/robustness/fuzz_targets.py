"""Fuzz targets over the public API: each takes ``bytes`` and either returns normally (a correct
result, or a ValueError/TypeError/MemoryError with a message: bad input refused) or raises
something else / fails an assertion (a bug). The same targets run under atheris
(coverage-guided, ``fuzz.py``) and under hypothesis (``test_robust_fuzz.py``)."""

from __future__ import annotations

import numpy as np

import sparseattn as sa

ALLOWED = (ValueError, TypeError, MemoryError)
INT_DTYPES = [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint32, np.uint64]
SPECIAL = [0.0, -0.0, 1.0, -1.0, np.nan, np.inf, -np.inf, 1e-45, 3e38, -3e38, 1e30, 65504.0]


class Reader:
    """Deterministic choices from a byte string (zeros once it runs out)."""

    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0

    def byte(self):
        b = self.data[self.pos] if self.pos < len(self.data) else 0
        self.pos += 1
        return b

    def int(self, lo, hi):
        """Uniform-ish in [lo, hi]."""
        span = hi - lo + 1
        x = 0
        for _ in range(max(1, (span.bit_length() + 7) // 8)):
            x = (x << 8) | self.byte()
        return lo + x % span

    def choice(self, seq):
        return seq[self.int(0, len(seq) - 1)]

    def flag(self, p256=128):
        return self.byte() < p256

    def seed(self):
        return self.int(0, 2**32 - 1)


def _sprinkle(r, x):
    """Replace a few entries with special values (NaN, inf, huge, tiny)."""
    if x.size == 0 or not r.flag(64):
        return x
    flat = x.reshape(-1)
    for _ in range(r.int(1, 3)):
        flat[r.int(0, flat.size - 1)] = r.choice(SPECIAL)
    return x


def _maybe_view(r, x):
    """A non-contiguous or read-only view of the same values, sometimes."""
    c = r.int(0, 3)
    if c == 1:
        big = np.zeros(x.shape[:-1] + (2 * x.shape[-1],), x.dtype)
        big[..., ::2] = x
        x = big[..., ::2]
    elif c == 2:
        x = x.copy()
        x.flags.writeable = False
    return x


def _random_layout(r, rng, heads, n_q, n_k):
    kind = r.int(0, 4)
    if kind == 0:
        return sa.CSRLayout.from_dense(rng.random((heads, n_q, n_k)) < r.int(0, 100) / 100)
    if kind == 1:
        m = rng.random((heads, n_q, n_k)) < r.int(0, 100) / 100
        return sa.BlockCSRLayout.from_dense(m, (r.int(1, 9), r.int(1, 9)))
    pats = [sa.patterns.sliding_window(r.int(1, 9), causal=r.flag()),
            sa.patterns.dilated(r.int(1, 4), window=r.choice([None, r.int(1, 9)])),
            sa.patterns.strided(r.int(1, 6)), sa.patterns.sinks(r.int(1, 4)),
            sa.patterns.dense(causal=r.flag())]
    p = r.choice(pats)
    if r.flag(64):
        p = p | r.choice(pats)
    return p


def _check_against_reference(q, k, v, lay, scale, out, lse):
    ref_out, ref_lse = sa.attention(q, k, v, lay, scale=scale, backend="reference", return_lse=True)
    np.testing.assert_array_equal(np.isnan(lse), np.isnan(ref_lse))
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(ref_lse))
    finite_in = all(np.isfinite(np.asarray(x, np.float64)).all() for x in (q, k, v))
    if finite_in:
        assert np.isfinite(out).all(), "NaN/inf out of a finite input"
        vmax = float(np.abs(np.asarray(v, np.float64)).max(initial=0.0))
        # outputs are convex combinations of v rows: bounded whatever the conditioning
        assert np.abs(out.astype(np.float64)).max(initial=0.0) <= vmax * (1 + 1e-3) + 1e-30
        # and match the float64 reference within the rounding of the logits
        eps = np.finfo(np.result_type(q, k, v, np.float32)).eps
        qa, ka = np.abs(np.asarray(q, np.float64)), np.abs(np.asarray(k, np.float64))
        logit = float(scale or 1 / np.sqrt(q.shape[-1])) * qa.max(initial=0) * ka.max(initial=0) * q.shape[-1]
        tol = (64 * eps + 16 * eps * logit) * max(vmax, 1e-30)
        if tol < vmax:
            np.testing.assert_allclose(out, ref_out, rtol=0, atol=tol)
    else:
        np.testing.assert_array_equal(np.isnan(out), np.isnan(ref_out))


def target_layout(data: bytes):
    """Build CSR / block-CSR layouts from fuzzed arrays, dtypes and shapes; whatever is accepted
    must be a valid layout that attention handles exactly like the reference."""
    r = Reader(data)
    rng = np.random.default_rng(r.seed())
    heads, n_q, n_k = r.int(1, 3), r.int(0, 10), r.int(0, 10)
    block = r.flag()
    bq, bk = r.int(1, 5), r.int(1, 5)
    rows = heads * (-(-n_q // bq) if block else n_q)
    cols = -(-n_k // bk) if block else n_k
    counts = [r.int(0, cols + 1) for _ in range(rows + r.int(-1, 1) * r.flag(32))]
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    if r.flag(40) and indptr.size > 1:
        indptr[r.int(0, indptr.size - 1)] = r.choice([-1, 2**31, 2**62, int(indptr[-1]) + 1])
    nnz = int(indptr[-1]) if indptr[-1] < 10**4 else r.int(0, 20)
    indices = []
    for c in counts:
        indices.extend(sorted(rng.choice(max(cols, 1), size=min(c, max(cols, 1)), replace=False)))
    indices = np.array(indices[:nnz] + [r.int(-3, cols + 3) for _ in range(max(0, nnz - len(indices)))],
                       np.int64)
    if r.flag(40) and indices.size:
        indices[r.int(0, indices.size - 1)] = r.choice([-1, cols, 2**31 - 1, 2**31, 2**32 + 1, -2**40])
    if r.flag(40) and indices.size > 1:
        i = r.int(0, indices.size - 2)
        indices[i], indices[i + 1] = indices[i + 1], indices[i]
    dtypes = [r.choice(INT_DTYPES) for _ in range(2)]
    try:
        ip = indptr.astype(dtypes[0])
        ix = indices.astype(dtypes[1])
        if block:
            nmask = r.int(0, 3)
            masks = rng.random((nmask, bq, bk)) < 0.5
            mi = np.array([r.int(-2, nmask) for _ in range(ix.size)], np.int64)
            lay = sa.BlockCSRLayout(ip, ix, (n_q, n_k), (bq, bk), heads, mask_index=mi, masks=masks)
        else:
            lay = sa.CSRLayout(ip, ix, (n_q, n_k), heads)
    except ALLOWED:
        return
    # accepted: the arrays must describe a valid layout (checked independently of the library)
    csr = lay.to_csr()
    assert csr.indptr[0] == 0 and (np.diff(csr.indptr) >= 0).all()
    assert csr.indptr[-1] == csr.indices.size
    if csr.indices.size:
        assert csr.indices.min() >= 0 and csr.indices.max() < n_k
    dense = lay.to_dense()
    assert dense.shape == (heads, n_q, n_k) and dense.sum() == lay.nnz
    d = r.choice([1, 2, 3, 8])
    dtype = r.choice([np.float32, np.float64])
    q = rng.standard_normal((heads, n_q, d)).astype(dtype)
    k = rng.standard_normal((1, n_k, d)).astype(dtype)
    v = rng.standard_normal((1, n_k, r.choice([1, 4]))).astype(dtype)
    out, lse = sa.attention(q, k, v, lay, return_lse=True)
    _check_against_reference(q, k, v, lay, None, out, lse)
    g = sa.attention_backward(q, k, v, out, lse, np.ones_like(out), lay)
    assert all(np.isfinite(x).all() for x in g)


def target_attention(data: bytes):
    """Fuzzed shapes, dtypes, values (NaN/inf/huge), views, scales, patterns and backends."""
    r = Reader(data)
    rng = np.random.default_rng(r.seed())
    hkv = r.int(1, 2)
    hq = hkv * r.int(1, 2)
    n_q, n_k = r.int(0, 12), r.int(0, 12)
    d, dv = r.choice([1, 2, 4, 7, 16]), r.choice([1, 3, 4])
    dtype = r.choice([np.float16, np.float32, np.float64])
    mag = r.choice([1.0, 1.0, 10.0, 1e3, 1e18])
    q = (mag * rng.standard_normal((hq, n_q, d))).astype(dtype)
    k = (mag * rng.standard_normal((hkv, n_k, d))).astype(dtype)
    v = rng.standard_normal((hkv, n_k, dv)).astype(dtype)
    if r.flag(40):
        k[:] = k[:, :1]  # identical keys
    q, k, v = (_maybe_view(r, _sprinkle(r, x)) for x in (q, k, v))
    if r.flag(30):  # a mismatched shape
        which = r.int(0, 2)
        bad = np.zeros((hq + 1, n_q, d + r.int(0, 1)), dtype)
        q, k, v = [bad if i == which else x for i, x in enumerate((q, k, v))]
    scale = r.choice([None, None, 1.0, 0.01, 1e-30, 1e30, -1.0, np.nan, 0.0])
    lay_heads = r.choice([1, hq, hq + 1])
    try:
        lay = _random_layout(r, rng, lay_heads, n_q, n_k)
    except ALLOWED:
        return
    backend = r.choice(["cpu", "cpu", "reference"])
    try:
        out, lse = sa.attention(q, k, v, lay, scale=scale, backend=backend, return_lse=True)
    except ALLOWED as e:
        assert str(e)
        return
    want = ((q.shape[0], q.shape[1], v.shape[-1]), np.result_type(q, k, v))
    assert (out.shape, out.dtype) == want, ((out.shape, out.dtype), want)
    _check_against_reference(q, k, v, lay, scale, out, lse)
    if r.flag(80):
        try:
            sa.attention_backward(q, k, v, out, lse, np.ones_like(out), lay, scale=scale,
                                  backend=backend)
        except ALLOWED as e:
            assert str(e)


def target_patterns(data: bytes):
    """Pattern constructors with fuzzed arguments; every layout built is exact: its CSR and
    block forms describe the same mask."""
    r = Reader(data)
    args = [r.choice([-1, 0, 1, 2, 3, 5, 8, 2**40, 2.5, True, None]) for _ in range(3)]
    makers = [
        lambda: sa.patterns.sliding_window(args[0], causal=r.flag()),
        lambda: sa.patterns.dilated(args[0], window=args[1]),
        lambda: sa.patterns.strided(args[0]),
        lambda: sa.patterns.fixed(args[0], summary=args[1]),
        lambda: sa.patterns.sinks(args[0]),
        lambda: sa.patterns.longformer(args[0], [r.int(-2, 12) for _ in range(r.int(0, 3))]),
        lambda: sa.patterns.bigbird(args[0], window_blocks=args[1], global_blocks=args[2],
                                    random_blocks=r.int(0, 3), seed=r.int(0, 9)),
        lambda: sa.patterns.block_sparse(np.random.default_rng(r.int(0, 99)).random(
            (r.int(1, 2), r.int(0, 4), r.int(0, 4))) < 0.5, args[0]),
        lambda: sa.patterns.dense(causal=r.flag()),
    ]
    try:
        p = r.choice(makers)()
        if r.flag(64):
            p = p & r.choice(makers)() if r.flag() else p | r.choice(makers)()
        n_q = r.choice([0, 1, 5, 13, 16, 2**40, -1])
        n_k = r.choice([None, 0, 7, 16, 20])
        heads = r.choice([None, 1, 2])
        lay = p.layout(n_q, n_k, heads=heads)
        blk = p.layout(n_q, n_k, heads=heads, block_size=(r.int(1, 6), r.int(1, 6)))
    except ALLOWED as e:
        assert str(e)
        return
    np.testing.assert_array_equal(lay.to_dense(), blk.to_dense())


def target_select(data: bytes):
    """top-k / LSH / routing with fuzzed parameters and inputs."""
    r = Reader(data)
    rng = np.random.default_rng(r.seed())
    hq, n_q, n_k, d = r.int(1, 2), r.int(0, 10), r.int(0, 10), r.choice([1, 3, 8])
    q = rng.standard_normal((hq, n_q, d)).astype(r.choice([np.float32, np.float64]))
    k = rng.standard_normal((1, n_k, d)).astype(q.dtype)
    q, k = _sprinkle(r, q), _sprinkle(r, k)
    which = r.int(0, 2)
    try:
        if which == 0:
            lay = sa.select.topk(q, k, r.choice([0, 1, 3, 10**12, -1, 2.0]), causal=r.flag())
        elif which == 1:
            lay = sa.select.lsh(q, k, r.choice([0, 1, 2, 3]), r.choice([0, 1, 4, 10**9]),
                                seed=r.int(0, 9), causal=r.flag())
        else:
            lay = sa.select.routing(q, k, r.choice([0, 1, 2, 3, 10**9]), seed=r.int(0, 9),
                                    causal=r.flag())
    except ALLOWED as e:
        assert str(e)
        return
    assert lay.shape == (n_q, n_k) and lay.heads == hq
    csr = lay.to_csr()
    if csr.indices.size:
        assert csr.indices.min() >= 0 and csr.indices.max() < n_k


TARGETS = {f.__name__[len("target_"):]: f for f in
           (target_layout, target_attention, target_patterns, target_select)}
NAMES = sorted(TARGETS)


def target_all(data: bytes):
    """Every target in one process (one interpreter start-up for a short CI session): the first
    byte picks the target, the rest is its input."""
    if data:
        TARGETS[NAMES[data[0] % len(NAMES)]](data[1:])


def all_corpus(dest):
    """The stored corpora as inputs of :func:`target_all` (each prefixed with its target byte)."""
    from pathlib import Path

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    root = Path(__file__).resolve().parent / "corpus"
    for i, name in enumerate(NAMES):
        for f in (root / name).glob("*"):
            (dest / f"{name}-{f.name}").write_bytes(bytes([i]) + f.read_bytes())
    return dest
