"""Numerical safety: huge logits, -inf from masks, all-masked rows, identical keys, NaN/inf
inputs. A finite input never gives NaN or inf; results match the float64 reference."""

import contextlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from conftest import two_pass_token_kernel
from robust_helpers import random_mask, reference

import sparseattn as sa

BACKENDS = ["cpu", "reference"]
N, D = 40, 8  # 40: partial edge blocks with the 16x16 block layouts below


def _layouts(mask):
    csr = sa.CSRLayout.from_dense(mask)
    return {"csr": csr, "block": csr.to_block((16, 16))}


def _causal(n=N):
    return np.tril(np.ones((n, n), bool))


def _check(out, lse, ref_out, ref_lse, vmax, rtol):
    assert np.isfinite(out).all(), "NaN/inf output from finite input"
    assert not np.isnan(lse).any() and not np.isposinf(lse).any()
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(ref_lse))
    np.testing.assert_allclose(out, ref_out, rtol=0, atol=rtol * vmax)
    fin = np.isfinite(ref_lse)
    np.testing.assert_allclose(lse[fin], ref_lse[fin], rtol=rtol)


def _huge_inputs(rng, dtype, frac, sign_mix=False):
    """Keys along one direction with distinct lengths: logits up to ``frac * max`` that differ by
    >= 0.5 % of their size, so the answer (a one-hot softmax) is well conditioned."""
    big = np.finfo(dtype).max
    u = rng.standard_normal(D)
    u /= np.linalg.norm(u)
    q = np.broadcast_to(u * np.sqrt(frac * big), (2, N, D)).astype(dtype)
    lengths = np.sqrt(frac * big) * (1.0 - 0.005 * rng.permutation(N))
    if sign_mix:
        lengths *= np.where(np.arange(N) % 3 == 0, -1.0, 1.0)
    k = (lengths[:, None] * u[None, :])[None].repeat(2, 0).astype(dtype)
    v = rng.standard_normal((2, N, D)).astype(dtype)
    return q, k, v


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind", ["csr", "block"])
@pytest.mark.parametrize("frac", [0.9, 0.5, 1e-3])
@pytest.mark.parametrize("sign_mix", [False, True])
def test_huge_logits_match_float64(rng, dtype, kind, frac, sign_mix):
    q, k, v = _huge_inputs(rng, dtype, frac, sign_mix)
    lay = _layouts(_causal())[kind]
    ref_out, ref_lse = reference(q, k, v, lay, scale=1.0)
    for backend in BACKENDS:
        out, lse = sa.attention(q, k, v, lay, scale=1.0, backend=backend, return_lse=True)
        _check(out, lse, ref_out, ref_lse, np.abs(v).max(), 1e-5 if dtype == np.float32 else 1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind", ["csr", "block"])
def test_identical_keys_average_values(rng, dtype, kind):
    """All keys equal (also huge ones): the softmax is uniform, the output the mean of v."""
    for size in (1.0, np.sqrt(np.finfo(dtype).max / D) * 0.9):
        q = np.full((1, N, D), size, dtype)
        k = np.full((1, N, D), size, dtype)
        v = rng.standard_normal((1, N, D)).astype(dtype)
        mask = _causal()
        lay = _layouts(mask)[kind]
        out, lse = sa.attention(q, k, v, lay, scale=1.0, return_lse=True)
        want = np.cumsum(v[0].astype(np.float64), axis=0) / np.arange(1, N + 1)[:, None]
        assert np.isfinite(out).all() and np.isfinite(lse).all()
        np.testing.assert_allclose(out[0], want, atol=1e-5 if dtype == np.float32 else 1e-12)


@pytest.mark.parametrize("kind", ["csr", "block"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_masked_rows_and_partial_blocks(rng, kind, dtype):
    """Rows whose every key is masked (whole rows, and rows of partial blocks that the element
    mask empties): output 0, lse -inf, gradients 0, never NaN, also with large logits."""
    mask = random_mask(rng, 2, N, N, density=0.15)
    mask[:, 3:9] = False  # rows inside a 16x16 block: -inf from the partial block's mask
    mask[:, :, 20:] &= rng.random((2, N, N - 20)) < 0.5
    lay = _layouts(mask)[kind]
    for size in (1.0, 30.0):
        q, k, v = (size * rng.standard_normal((2, N, D))).astype(dtype), \
            (size * rng.standard_normal((2, N, D))).astype(dtype), rng.standard_normal((2, N, D)).astype(dtype)
        ref_out, ref_lse = reference(q, k, v, lay)
        out, lse = sa.attention(q, k, v, lay, return_lse=True)
        _check(out, lse, ref_out, ref_lse, 1.0, 2e-5 if dtype == np.float32 else 1e-11)
        empty = ~mask.any(-1)
        assert (out[empty] == 0).all() and np.isneginf(lse[empty]).all()
        dout = rng.standard_normal(out.shape).astype(dtype)
        grads = sa.attention_backward(q, k, v, out, lse, dout, lay)
        ref_grads = sa.attention_backward(q, k, v, out, lse, dout, lay, backend="reference")
        # float rounding of logits of size L moves P by ~ eps * L relatively: the conditioning
        logits = np.abs(np.einsum("hqd,hkd->hqk", q.astype(float), k.astype(float))).max() / np.sqrt(D)
        eps = np.finfo(dtype).eps
        for g, r in zip(grads, ref_grads):
            assert np.isfinite(g).all()
            scale = max(1.0, np.abs(r).max())
            np.testing.assert_allclose(g, r, atol=(1e3 * eps + 16 * eps * logits) * scale)
        assert (grads[0][empty] == 0).all()


def test_backward_large_logits_finite(rng):
    """Logits of order 1e4 (exp would overflow without the lse shift): finite gradients."""
    q = (100 * rng.standard_normal((2, N, D))).astype(np.float32)
    k = (100 * rng.standard_normal((2, N, D))).astype(np.float32)
    v = rng.standard_normal((2, N, D)).astype(np.float32)
    for lay in _layouts(_causal()).values():
        out, lse = sa.attention(q, k, v, lay, return_lse=True)
        grads = sa.attention_backward(q, k, v, out, lse, np.ones_like(out), lay)
        assert all(np.isfinite(g).all() for g in grads)


def test_float16_large_values(rng):
    """float16 inputs near their maximum compute in float32: finite, matches float64."""
    q = (6e4 * rng.uniform(0.9, 1, (1, N, D))).astype(np.float16)
    k = (6e4 * rng.uniform(0.9, 1, (1, N, D))).astype(np.float16)
    v = rng.standard_normal((1, N, D)).astype(np.float16)
    lay = _layouts(_causal())["block"]
    out = sa.attention(q, k, v, lay)
    assert out.dtype == np.float16 and np.isfinite(out).all()


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), kind=st.sampled_from(["csr", "block", "csr_two_pass"]),
       where=st.sampled_from(["q", "k", "v"]), value=st.sampled_from([np.nan, np.inf, -np.inf]),
       count=st.integers(1, 4))
def test_nonfinite_inputs_follow_the_reference(seed, kind, where, value, count):
    """NaN/inf in q, k or v: every backend gives the reference's answer: a row that attends the
    bad entry is NaN (or +-inf through v), every other row is exact. A NaN never vanishes into
    "no key" (0, -inf) and never leaks into rows that do not attend it. ``csr_two_pass``: the
    CPU kernel for scattered rows of long sequences, forced onto this small one."""
    rng = np.random.default_rng(seed)
    mask = random_mask(rng, 2, N, N, density=0.3)
    lay = _layouts(mask)[kind.replace("_two_pass", "")]
    arrs = {n: rng.standard_normal((2, N, D)).astype(np.float32) for n in "qkv"}
    for _ in range(count):
        arrs[where][rng.integers(0, 2), rng.integers(0, N), rng.integers(0, D)] = value
    ref_out, ref_lse = reference(arrs["q"], arrs["k"], arrs["v"], lay)
    with two_pass_token_kernel() if kind == "csr_two_pass" else contextlib.nullcontext():
        out, lse = sa.attention(arrs["q"], arrs["k"], arrs["v"], lay, return_lse=True)
    np.testing.assert_array_equal(np.isnan(out), np.isnan(ref_out))
    np.testing.assert_array_equal(np.isnan(lse), np.isnan(ref_lse))
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(ref_lse))
    fin = np.isfinite(ref_out)
    np.testing.assert_allclose(out[fin], ref_out[fin], atol=1e-5)
    np.testing.assert_array_equal(out[~fin & ~np.isnan(ref_out)], ref_out[~fin & ~np.isnan(ref_out)])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind", ["csr", "block"])
def test_backward_huge_logits_match_float64(rng, kind, dtype):
    """Logits near the float's maximum: gradients finite and equal to the float64 reference (here
    the softmax is one-hot, so dq = dk = 0 and dv routes dout to the winning key). The CPU
    backend runs such calls in float64 (``backward.exact_backward``): ``s - lse`` in the input
    dtype would lose everything."""
    q, k, v = _huge_inputs(rng, dtype, 0.5)
    lay = _layouts(_causal())[kind]
    out, lse = sa.attention(q, k, v, lay, scale=1.0, return_lse=True)
    dout = rng.standard_normal(out.shape).astype(dtype)
    grads = sa.attention_backward(q, k, v, out, lse, dout, lay, scale=1.0)
    ref = sa.attention_backward(q, k, v, out, lse, dout, lay, scale=1.0, backend="reference")
    for g in grads:
        assert np.isfinite(g).all()
    np.testing.assert_allclose(grads[2], ref[2], atol=1e-4 * np.abs(ref[2]).max())  # dv
    # dq, dk are 0 in exact arithmetic; float32 rounding of delta = dout . out leaves ~eps of
    # |dout| |v| per key, times |k| (or |q|) ~ 1e19: compare on that natural scale
    unit = np.abs(dout).max() * np.abs(v).max() * N * max(np.abs(q).max(), np.abs(k).max())
    for g, r in zip(grads[:2], ref[:2]):
        np.testing.assert_allclose(g, r, atol=1e-5 * unit)
