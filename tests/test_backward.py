"""sa.attention_backward on the CPU backend: against the reference's analytic gradients, against
central finite differences of the forward pass, and on the edge cases (empty rows, rows holding
every key, GQA, batch broadcast, non-divisible blocks, float32 and float64, determinism)."""

import numba
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import sparseattn as sa
from conftest import assert_close as _close
from conftest import two_pass_token_kernel




def _layouts(mask, bs):
    csr = sa.CSRLayout.from_dense(mask)
    return csr, csr.to_block(bs)


@st.composite
def problems(draw):
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    hkv = draw(st.integers(1, 3))
    group = draw(st.integers(1, 3))
    hq = hkv * group
    n_q = draw(st.integers(1, 60))
    n_k = draw(st.integers(1, 60))
    d = draw(st.sampled_from([1, 3, 8, 16]))
    dv = draw(st.sampled_from([d, 5]))
    batch = draw(st.sampled_from([(), (2,), (1, 2), (2, 3)]))
    kv_batch = draw(st.sampled_from([batch, (), batch[:-1] + (1,)])) if batch else ()
    lay_heads = draw(st.sampled_from([1, hq]))
    density = draw(st.sampled_from([0.0, 0.1, 0.5, 1.0]))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    mask = rng.random((lay_heads, n_q, n_k)) < density
    mask[:, rng.integers(0, n_q)] = False  # an empty row
    mask[:, rng.integers(0, n_q)] = True  # a row holding every key
    q = rng.standard_normal(batch + (hq, n_q, d)).astype(dtype)
    k = rng.standard_normal(kv_batch + (hkv, n_k, d)).astype(dtype)
    v = rng.standard_normal(kv_batch + (hkv, n_k, dv)).astype(dtype)
    dout = rng.standard_normal(np.broadcast_shapes(batch, kv_batch) + (hq, n_q, dv)).astype(dtype)
    bs = draw(st.tuples(st.integers(1, 20), st.integers(1, 20)))
    return q, k, v, dout, mask, bs, dtype


@given(problems())
def test_cpu_gradients_match_reference(problem):
    q, k, v, dout, mask, bs, dtype = problem
    for lay in _layouts(mask, bs):
        out, lse = sa.attention(q, k, v, lay, backend="cpu", return_lse=True)
        got = sa.attention_backward(q, k, v, out, lse, dout, lay, backend="cpu")
        want = sa.attention_backward(q, k, v, out, lse, dout, lay, backend="reference")
        for g, w, x in zip(got, want, (q, k, v)):
            assert g.shape == x.shape and g.dtype == x.dtype
            assert np.isfinite(g).all()
            _close(g, w, dtype)


@given(problems())
def test_cpu_one_head_at_a_time_token_backward(problem):
    """The token backward for scattered rows of long sequences (both passes one key/value head at
    a time), forced onto small random problems: GQA, batch broadcast, empty and full rows."""
    q, k, v, dout, mask, _, dtype = problem
    lay = sa.CSRLayout.from_dense(mask)
    out, lse = sa.attention(q, k, v, lay, backend="cpu", return_lse=True)
    want = sa.attention_backward(q, k, v, out, lse, dout, lay, backend="reference")
    with two_pass_token_kernel() as calls:
        got = sa.attention_backward(q, k, v, out, lse, dout, lay, backend="cpu")
    assert [c.__name__ for c in calls] == ["csr_backward_by_head"] or q.size == 0 or k.size == 0
    for g, w in zip(got, want):
        assert np.isfinite(g).all()
        _close(g, w, dtype)


def _directional_check(q, k, v, lay, rng, eps=1e-5, n_dir=2):
    """d/dt L(x + t u) by central differences against <grad L, u>, L = sum(out * w), float64."""
    out = sa.attention(q, k, v, lay, backend="cpu")
    w = rng.standard_normal(out.shape)
    grads = sa.attention_backward(q, k, v, *sa.attention(q, k, v, lay, return_lse=True), w, lay)

    def loss(qq, kk, vv):
        return float(np.sum(sa.attention(qq, kk, vv, lay, backend="cpu") * w))

    for which in range(3):
        for _ in range(n_dir):
            u = rng.standard_normal((q, k, v)[which].shape)
            args_p, args_m = [q, k, v], [q, k, v]
            args_p[which] = args_p[which] + eps * u
            args_m[which] = args_m[which] - eps * u
            fd = (loss(*args_p) - loss(*args_m)) / (2 * eps)
            an = float(np.sum(grads[which] * u))
            assert abs(fd - an) <= 1e-6 * max(1.0, abs(an)), (which, fd, an)


@given(problems())
def test_gradients_match_finite_differences(problem):
    q, k, v, _, mask, bs, _ = problem
    rng = np.random.default_rng(0)
    q, k, v = (x.astype(np.float64) for x in (q, k, v))
    for lay in _layouts(mask, bs):
        _directional_check(q, k, v, lay, rng, n_dir=1)


@pytest.mark.parametrize("block", [None, (8, 8), (7, 5), (64, 64)])
def test_finite_differences_elementwise(rng, block):
    """Every coordinate of a tiny GQA problem with a broadcast k/v, an empty and a full row."""
    q = rng.standard_normal((2, 2, 7, 3))
    k = rng.standard_normal((1, 6, 3))
    v = rng.standard_normal((1, 6, 2))
    mask = rng.random((7, 6)) < 0.4
    mask[0] = False
    mask[1] = True
    lay = sa.CSRLayout.from_dense(mask)
    lay = lay if block is None else lay.to_block(block)
    w = rng.standard_normal((2, 2, 7, 2))
    out, lse = sa.attention(q, k, v, lay, return_lse=True)
    grads = sa.attention_backward(q, k, v, out, lse, w, lay)
    eps = 1e-6
    for which, x in enumerate((q, k, v)):
        fd = np.empty_like(x)
        for idx in np.ndindex(x.shape):
            xp, xm = x.copy(), x.copy()
            xp[idx] += eps
            xm[idx] -= eps
            args_p, args_m = [q, k, v], [q, k, v]
            args_p[which], args_m[which] = xp, xm
            fd[idx] = (np.sum(sa.attention(*args_p, lay) * w) - np.sum(sa.attention(*args_m, lay) * w)) / (2 * eps)
        np.testing.assert_allclose(grads[which], fd, rtol=1e-6, atol=1e-8)
    assert (grads[0][:, :, 0] == 0).all()  # the empty row's query gets no gradient


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("block", [None, (16, 16)])
def test_empty_layout_gives_zero_gradients(dtype, block):
    rng = np.random.default_rng(3)
    q = rng.standard_normal((2, 20, 8)).astype(dtype)
    k = rng.standard_normal((2, 30, 8)).astype(dtype)
    v = rng.standard_normal((2, 30, 4)).astype(dtype)
    lay = sa.CSRLayout.from_dense(np.zeros((20, 30), bool))
    lay = lay if block is None else lay.to_block(block)
    out, lse = sa.attention(q, k, v, lay, return_lse=True)
    assert np.isneginf(lse).all()
    dout = rng.standard_normal(out.shape).astype(dtype)
    for g in sa.attention_backward(q, k, v, out, lse, dout, lay):
        assert (g == 0).all()


@pytest.mark.parametrize("block", [None, (16, 16)])
def test_rows_without_keys_never_give_nan(rng, block):
    """lse = -inf rows inside full and partial blocks, with large scores elsewhere."""
    q = 30 * rng.standard_normal((3, 40, 8)).astype(np.float32)
    k = 30 * rng.standard_normal((3, 40, 8)).astype(np.float32)
    v = rng.standard_normal((3, 40, 8)).astype(np.float32)
    mask = np.tril(np.ones((40, 40), bool))
    mask[5:9] = False
    lay = sa.CSRLayout.from_dense(mask)
    lay = lay if block is None else lay.to_block(block)
    out, lse = sa.attention(q, k, v, lay, return_lse=True)
    dout = rng.standard_normal(out.shape).astype(np.float32)
    dq, dk, dv = sa.attention_backward(q, k, v, out, lse, dout, lay)
    for g in (dq, dk, dv):
        assert np.isfinite(g).all()
    assert (dq[:, 5:9] == 0).all()
    want = sa.attention_backward(q, k, v, out, lse, dout, lay, backend="reference")
    for g, w in zip((dq, dk, dv), want):
        _close(g, w, np.float32, factor=100)  # scores of size 1e3: fp32 rounding grows with them


def test_batch_broadcast_and_gqa_shapes(rng):
    """k/v broadcast along some batch dims, q along others; MQA; per-head layout."""
    q = rng.standard_normal((1, 3, 4, 17, 8))
    k = rng.standard_normal((2, 1, 1, 23, 8))
    v = rng.standard_normal((2, 1, 1, 23, 6))
    mask = rng.random((4, 17, 23)) < 0.3
    for lay in _layouts(mask, (5, 7)):
        out, lse = sa.attention(q, k, v, lay, return_lse=True)
        assert out.shape == (2, 3, 4, 17, 6)
        dout = rng.standard_normal(out.shape)
        got = sa.attention_backward(q, k, v, out, lse, dout, lay)
        want = sa.attention_backward(q, k, v, out, lse, dout, lay, backend="reference")
        # the reference fold, written out: expand q/k/v to the broadcast batch and sum back
        for g, w, x in zip(got, want, (q, k, v)):
            assert g.shape == x.shape
            _close(g, w, np.float64)


def test_float16_gradients(rng):
    q = rng.standard_normal((2, 33, 8)).astype(np.float16)
    k = rng.standard_normal((2, 33, 8)).astype(np.float16)
    v = rng.standard_normal((2, 33, 8)).astype(np.float16)
    lay = sa.CSRLayout.from_dense(np.tril(np.ones((33, 33), bool))).to_block((8, 8))
    out, lse = sa.attention(q, k, v, lay, return_lse=True)
    dout = rng.standard_normal(out.shape).astype(np.float16)
    got = sa.attention_backward(q, k, v, out, lse, dout, lay)
    want = sa.attention_backward(*(x.astype(np.float64) for x in (q, k, v, out, lse, dout)), lay,
                                 backend="reference")
    for g, w in zip(got, want):
        assert g.dtype == np.float16
        np.testing.assert_allclose(g.astype(np.float64), w, atol=2e-2 * max(1, np.abs(w).max()))


@pytest.mark.parametrize("block", [None, (16, 16)])
def test_deterministic(rng, block):
    """Same inputs and thread count, same bits. The token path and the two-pass block path do not
    depend on the thread count at all (each task owns its rows); the fused block pass sums its
    per-chunk partials in chunk order, so another thread count may change the last bits only."""
    q = rng.standard_normal((2, 4, 70, 16)).astype(np.float32)
    k = rng.standard_normal((2, 2, 70, 16)).astype(np.float32)
    v = rng.standard_normal((2, 2, 70, 16)).astype(np.float32)
    lay = sa.CSRLayout.from_dense(np.tril(np.ones((70, 70), bool)) & (rng.random((70, 70)) < 0.5))
    lay = lay if block is None else lay.to_block(block)
    out, lse = sa.attention(q, k, v, lay, return_lse=True)
    dout = rng.standard_normal(out.shape).astype(np.float32)
    first = sa.attention_backward(q, k, v, out, lse, dout, lay)
    old = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        single = sa.attention_backward(q, k, v, out, lse, dout, lay)
    finally:
        numba.set_num_threads(old)
    again = sa.attention_backward(q, k, v, out, lse, dout, lay)
    for a, b, c in zip(first, single, again):
        assert np.array_equal(a, c)
        if block is None:
            assert np.array_equal(a, b)
        else:
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(a).max())


@pytest.mark.parametrize("limit", [0.0, np.inf])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fused_and_two_pass_block_paths(monkeypatch, rng, limit, dtype):
    """Both block strategies: the fused pass with per-chunk partials, and the two passes."""
    monkeypatch.setattr(sa.config, "CPU_BACKWARD_MAX_PARTIALS", limit)
    q = rng.standard_normal((2, 4, 45, 8)).astype(dtype)
    k = rng.standard_normal((1, 2, 38, 8)).astype(dtype)
    v = rng.standard_normal((1, 2, 38, 5)).astype(dtype)
    mask = rng.random((4, 45, 38)) < 0.4
    mask[:, 3] = False
    mask[:, 9] = True
    lay = sa.CSRLayout.from_dense(mask).to_block((8, 6))
    out, lse = sa.attention(q, k, v, lay, return_lse=True)
    dout = rng.standard_normal(out.shape).astype(dtype)
    got = sa.attention_backward(q, k, v, out, lse, dout, lay)
    want = sa.attention_backward(q, k, v, out, lse, dout, lay, backend="reference")
    for g, w in zip(got, want):
        _close(g, w, dtype)


def test_transpose_is_cached_on_the_layout(rng):
    q = rng.standard_normal((2, 30, 8))
    lay = sa.CSRLayout.from_dense(rng.random((30, 30)) < 0.5).to_block((8, 8))
    out, lse = sa.attention(q, q, q, lay, return_lse=True)
    sa.attention_backward(q, q, q, out, lse, out, lay)
    t = lay.transpose()
    sa.attention_backward(q, q, q, out, lse, out, lay)
    assert lay.transpose() is t


def test_bad_shapes_are_refused(rng):
    q = rng.standard_normal((2, 10, 8))
    lay = sa.CSRLayout.from_dense(np.ones((10, 10), bool))
    out, lse = sa.attention(q, q, q, lay, return_lse=True)
    with pytest.raises(ValueError, match="dout"):
        sa.attention_backward(q, q, q, out, lse, out[:, :5], lay)
    with pytest.raises(ValueError, match="lse"):
        sa.attention_backward(q, q, q, out, lse[None], out, lay)
    with pytest.raises(ValueError, match="out"):
        sa.attention_backward(q, q, q, out[..., :4], lse, out, lay)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nan_reaches_the_gradients_that_use_it(rng, dtype):
    """A NaN in q never vanishes into 0: the pairs that use it get NaN gradients; on a token
    layout nothing else does; on a block layout it may spread within its tiles, not beyond."""
    q = rng.standard_normal((2, 40, 8)).astype(dtype)
    k = rng.standard_normal((2, 40, 8)).astype(dtype)
    v = rng.standard_normal((2, 40, 8)).astype(dtype)
    q[0, 4, 2] = np.nan
    mask = rng.random((40, 40)) < 0.3
    mask[4, [1, 7, 33]] = True
    seen = mask[4]
    for lay in (sa.CSRLayout.from_dense(mask), sa.CSRLayout.from_dense(mask).to_block((8, 8))):
        out, lse = sa.attention(q, k, v, lay, return_lse=True)
        dout = rng.standard_normal(out.shape).astype(dtype)
        dq, dk, dv = sa.attention_backward(q, k, v, out, lse, dout, lay)
        assert np.isnan(dq[0, 4]).all() and np.isnan(dk[0, seen]).all() and np.isnan(dv[0, seen]).all()
        assert np.isfinite(dq[1]).all() and np.isfinite(dk[1]).all() and np.isfinite(dv[1]).all()
        if isinstance(lay, sa.CSRLayout):
            assert np.isfinite(np.delete(dq[0], 4, axis=0)).all()
            assert np.isfinite(dk[0, ~seen]).all() and np.isfinite(dv[0, ~seen]).all()
        else:
            assert np.isfinite(dq[0, 8:]).all()  # other query blocks


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kv_batch", [1, 2])
def test_exact_backward_matches_reference(rng, dtype, kv_batch):
    """The float64 fallback for huge logits (``backward.exact_backward``) on ordinary inputs, GQA,
    batch broadcast, per-head layouts with an empty row: the reference's gradients."""
    from sparseattn.backends.cpu.backward import exact_backward

    q = rng.standard_normal((2, 4, 21, 8)).astype(dtype)
    k = rng.standard_normal((kv_batch, 2, 17, 8)).astype(dtype)
    v = rng.standard_normal((kv_batch, 2, 17, 5)).astype(dtype)
    dout = rng.standard_normal((2, 4, 21, 5)).astype(dtype)
    mask = rng.random((4, 21, 17)) < 0.4
    mask[:, 2] = False
    lay = sa.CSRLayout.from_dense(mask).to_block((8, 6))
    ref = sa.backends.get("reference")
    out, lse = ref.forward(q, k, v, lay, 0.3)
    got = exact_backward(q, k, v, dout, lay, 0.3, np.empty_like(q), np.empty_like(k), np.empty_like(v))
    for g, w in zip(got, ref.backward(q, k, v, out, lse, dout, lay, 0.3)):
        _close(g, w, dtype, factor=1)
