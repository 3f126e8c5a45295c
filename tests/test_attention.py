"""sa.attention on every host backend against the dense masked-softmax reference."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import sparseattn as sa
from conftest import assert_close as _close
from conftest import two_pass_token_kernel


@st.composite
def problems(draw):
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    hkv = draw(st.integers(1, 3))
    group = draw(st.integers(1, 3))
    hq = hkv * group
    n_q = draw(st.integers(1, 70))
    n_k = draw(st.integers(1, 70))
    d = draw(st.sampled_from([1, 3, 8, 16]))
    dv = draw(st.sampled_from([d, 5]))
    batch = draw(st.sampled_from([(), (2,), (1, 2)]))
    kv_batch = draw(st.sampled_from([batch, ()])) if batch else ()
    lay_heads = draw(st.sampled_from([1, hq]))
    density = draw(st.sampled_from([0.0, 0.1, 0.5, 1.0]))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    mask = rng.random((lay_heads, n_q, n_k)) < density
    mask[:, rng.integers(0, n_q)] = False  # at least one empty row
    q = rng.standard_normal(batch + (hq, n_q, d)).astype(dtype)
    k = rng.standard_normal(kv_batch + (hkv, n_k, d)).astype(dtype)
    v = rng.standard_normal(kv_batch + (hkv, n_k, dv)).astype(dtype)
    bs = draw(st.tuples(st.integers(1, 20), st.integers(1, 20)))
    return q, k, v, mask, bs, dtype


@given(problems())
def test_cpu_matches_reference(problem):
    q, k, v, mask, bs, dtype = problem
    csr = sa.CSRLayout.from_dense(mask)
    ref_out, ref_lse = sa.attention(q, k, v, csr, backend="reference", return_lse=True)
    empty = ~mask.any(-1)
    assert np.isneginf(ref_lse[..., np.broadcast_to(empty, ref_lse.shape[-2:]) if mask.shape[0] > 1 else empty[0]]).all()
    for lay in (csr, csr.to_block(bs)):
        out, lse = sa.attention(q, k, v, lay, backend="cpu", return_lse=True)
        assert out.dtype == dtype and lse.dtype == dtype
        assert out.shape == ref_out.shape and lse.shape == ref_lse.shape
        assert not np.isnan(out).any() and not np.isnan(lse).any()
        _close(out, ref_out, dtype)
        finite = np.isfinite(ref_lse)
        assert np.array_equal(np.isfinite(lse), finite)
        _close(lse[finite], ref_lse[finite], dtype)
        assert (out[~np.isfinite(lse)] == 0).all()


@given(problems(), st.sampled_from([1, 7, 1 << 21]))
def test_cpu_two_pass_token_kernel_matches_reference(problem, buffer):
    """The kernel for scattered rows of long sequences, on small random problems (GQA, batch
    broadcast, empty rows, odd sizes), with weight buffers that cut heads into segments."""
    q, k, v, mask, _, dtype = problem
    csr = sa.CSRLayout.from_dense(mask)
    ref_out, ref_lse = sa.attention(q, k, v, csr, backend="reference", return_lse=True)
    with two_pass_token_kernel(buffer) as calls:
        out, lse = sa.attention(q, k, v, csr, backend="cpu", return_lse=True)
    assert len(calls) == 1
    _close(out, ref_out, dtype)
    finite = np.isfinite(ref_lse)
    assert np.array_equal(np.isfinite(lse), finite)
    _close(lse[finite], ref_lse[finite], dtype)
    assert (out[~finite] == 0).all()

def test_dense_rows_and_big_blocks(rng):
    """Rows that hold every key, tiles larger than the sequence, a single key per row."""
    q = rng.standard_normal((2, 130, 16))
    k = rng.standard_normal((2, 77, 16))
    v = rng.standard_normal((2, 77, 16))
    full = np.ones((130, 77), bool)
    ref = sa.attention(q, k, v, sa.CSRLayout.from_dense(full), backend="reference")
    for bs in [(64, 64), (200, 200), (1, 1), (130, 77)]:
        _close(sa.attention(q, k, v, sa.BlockCSRLayout.from_dense(full, bs)), ref, np.float64)
    one = np.zeros((130, 77), bool)
    one[np.arange(130), np.arange(130) % 77] = True
    out = sa.attention(q, k, v, sa.CSRLayout.from_dense(one))
    _close(out, v[:, np.arange(130) % 77], np.float64)


def test_float16_accumulates_in_float32(rng):
    q = rng.standard_normal((2, 40, 8)).astype(np.float16)
    k = rng.standard_normal((2, 40, 8)).astype(np.float16)
    v = rng.standard_normal((2, 40, 8)).astype(np.float16)
    lay = sa.CSRLayout.from_dense(np.tril(np.ones((40, 40), bool)))
    out, lse = sa.attention(q, k, v, lay.to_block(16), return_lse=True)
    assert out.dtype == np.float16 and lse.dtype == np.float32
    ref = sa.attention(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64), lay, backend="reference")
    np.testing.assert_allclose(out.astype(np.float64), ref, atol=2e-3)


def test_mixed_precision_promotes(rng):
    q = rng.standard_normal((1, 5, 4)).astype(np.float32)
    k = rng.standard_normal((1, 5, 4))
    lay = sa.CSRLayout.from_dense(np.ones((5, 5), bool))
    assert sa.attention(q, k, k, lay).dtype == np.float64


def test_non_contiguous_and_read_only(rng):
    base = rng.standard_normal((3, 50, 16))
    q = base[:, ::2, :8]  # strided view
    k = np.asfortranarray(rng.standard_normal((3, 25, 8)))
    v = rng.standard_normal((3, 25, 8))
    v.flags.writeable = False
    lay = sa.CSRLayout.from_dense(rng.random((25, 25)) < 0.5)
    want = sa.attention(np.ascontiguousarray(q), np.ascontiguousarray(k), v.copy(), lay, backend="reference")
    _close(sa.attention(q, k, v, lay), want, np.float64)


def test_scale(rng):
    q, k, v = (rng.standard_normal((1, 9, 4)) for _ in range(3))
    lay = sa.CSRLayout.from_dense(np.ones((9, 9), bool))
    a = sa.attention(q, k, v, lay, scale=0.5)
    b = sa.attention(q * 0.5 * 2, k, v, lay)  # default scale 1/sqrt(4) = 0.5
    _close(a, b, np.float64)


def test_empty_sizes(rng):
    lay = sa.CSRLayout.from_dense(np.zeros((0, 6), bool))
    out, lse = sa.attention(np.zeros((2, 0, 4)), np.ones((2, 6, 4)), np.ones((2, 6, 3)), lay, return_lse=True)
    assert out.shape == (2, 0, 3) and lse.shape == (2, 0)
    lay = sa.CSRLayout.from_dense(np.zeros((5, 0), bool))
    out, lse = sa.attention(np.ones((2, 5, 4)), np.ones((2, 0, 4)), np.ones((2, 0, 3)), lay.to_block(4), return_lse=True)
    assert (out == 0).all() and np.isneginf(lse).all()
    out = sa.attention(np.ones((0, 2, 5, 4)), np.ones((2, 5, 4)), np.ones((2, 5, 3)), sa.CSRLayout.from_dense(np.ones((5, 5), bool)))
    assert out.shape == (0, 2, 5, 3)


def test_deterministic(rng):
    q = rng.standard_normal((4, 200, 32)).astype(np.float32)
    k = rng.standard_normal((2, 200, 32)).astype(np.float32)
    lay = sa.CSRLayout.from_dense(rng.random((200, 200)) < 0.3)
    blk = lay.to_block(32)
    a = sa.attention(q, k, k, blk)
    b = sa.attention(q, k, k, blk)
    assert np.array_equal(a, b)
    # batch split does not change bits
    qq = np.stack([q, q[::-1]])
    both = sa.attention(qq, k, k, blk)
    assert np.array_equal(both[0], a)


@pytest.mark.parametrize(
    "q_shape, k_shape, v_shape, match",
    [
        ((5, 4), (1, 5, 4), (1, 5, 4), "rank >= 3"),
        ((2, 5, 4), (1, 5, 3), (1, 5, 4), "last dimension"),
        ((3, 5, 4), (2, 5, 4), (2, 5, 4), "multiple of key/value heads"),
        ((2, 5, 4), (2, 5, 4), (2, 6, 4), "v must have k's heads"),
        ((2, 2, 5, 4), (3, 2, 5, 4), (3, 2, 5, 4), "do not broadcast"),
        ((2, 5, 4), (2, 2, 5, 4), (3, 2, 5, 4), "same batch"),
        ((2, 5, 0), (2, 5, 0), (2, 5, 4), ">= 1"),
    ],
)
def test_shape_errors(q_shape, k_shape, v_shape, match):
    lay = sa.CSRLayout.from_dense(np.ones((5, 5), bool))
    with pytest.raises(ValueError, match=match):
        sa.attention(np.ones(q_shape), np.ones(k_shape), np.ones(v_shape), lay)


def test_argument_errors():
    q = np.ones((2, 5, 4))
    lay = sa.CSRLayout.from_dense(np.ones((5, 5), bool))
    with pytest.raises(TypeError, match="q must be float16, float32 or float64"):
        sa.attention(q.astype(int), q, q, lay)
    with pytest.raises(ValueError, match="scale"):
        sa.attention(q, q, q, lay, scale=np.nan)
    with pytest.raises(ValueError, match="scale"):
        sa.attention(q, q, q, lay, scale=0)
    with pytest.raises(TypeError, match="scale"):
        sa.attention(q, q, q, lay, scale="x")
    with pytest.raises(ValueError, match=r"shape \(4, 5\)"):
        sa.attention(q, q, q, sa.CSRLayout.from_dense(np.ones((4, 5), bool)))
    with pytest.raises(ValueError, match="3 heads"):
        sa.attention(q, q, q, sa.CSRLayout.from_dense(np.ones((3, 5, 5), bool)))
    with pytest.raises(TypeError, match="pattern"):
        sa.attention(q, q, q, np.ones((5, 5), bool))
    with pytest.raises(ValueError, match="unknown backend"):
        sa.attention(q, q, q, lay, backend="tpu")
    with pytest.raises(TypeError, match="q must be an array"):
        sa.attention(None, q, q, lay)
