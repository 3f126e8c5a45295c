"""sa.autograd: the NumPy vjp pair, and the PyTorch / JAX adapters where those are installed."""

import pathlib
import runpy

import numpy as np
import pytest

import sparseattn as sa

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _problem(rng, dtype=np.float64):
    q = rng.standard_normal((2, 4, 19, 8)).astype(dtype)
    k = rng.standard_normal((2, 2, 23, 8)).astype(dtype)
    v = rng.standard_normal((2, 2, 23, 5)).astype(dtype)
    mask = rng.random((19, 23)) < 0.3
    mask[3] = False
    return q, k, v, sa.CSRLayout.from_dense(mask).to_block((8, 8))


def _reference(q, k, v, lay, dout):
    out, lse = sa.attention(q, k, v, lay, backend="reference", return_lse=True)
    return out, sa.attention_backward(q, k, v, out, lse, dout, lay, backend="reference")


def test_attention_vjp_matches_reference(rng):
    q, k, v, lay = _problem(rng)
    out, vjp = sa.autograd.attention_vjp(q, k, v, lay)
    dout = rng.standard_normal(out.shape)
    want_out, want = _reference(q, k, v, lay, dout)
    np.testing.assert_allclose(out, want_out, atol=1e-12)
    for _ in range(2):  # the closure can be called again
        for g, w in zip(vjp(dout), want):
            np.testing.assert_allclose(g, w, atol=1e-11)


def test_fwd_bwd_pair(rng):
    q, k, v, lay = _problem(rng, np.float32)
    out, res = sa.autograd.attention_fwd(q, k, v, lay, scale=0.3)
    assert isinstance(res, sa.autograd.Residuals) and res.scale == 0.3
    np.testing.assert_array_equal(out, sa.attention(q, k, v, lay, scale=0.3))
    dout = rng.standard_normal(out.shape).astype(np.float32)
    out_ref, lse = sa.attention(q, k, v, lay, scale=0.3, return_lse=True)
    want = sa.attention_backward(q, k, v, out_ref, lse, dout, lay, scale=0.3)
    for g, w in zip(sa.autograd.attention_bwd(res, dout), want):
        np.testing.assert_array_equal(g, w)
    with pytest.raises(TypeError, match="residuals"):
        sa.autograd.attention_bwd((q, k, v), dout)


def test_torch_adapter(rng):
    torch = pytest.importorskip("torch")
    q, k, v, lay = _problem(rng)
    tq, tk, tv = (torch.tensor(x, requires_grad=True) for x in (q, k, v))
    out = sa.autograd.torch_attention(tq, tk, tv, lay)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float64
    dout = rng.standard_normal(out.shape)
    (out * torch.tensor(dout)).sum().backward()
    want_out, want = _reference(q, k, v, lay, dout)
    np.testing.assert_allclose(out.detach().numpy(), want_out, atol=1e-12)
    for t, w in zip((tq, tk, tv), want):
        np.testing.assert_allclose(t.grad.numpy(), w, atol=1e-11)
    # float32 and bfloat16 tensors; only some inputs need gradients
    q32 = torch.tensor(q, dtype=torch.float32, requires_grad=True)
    out32 = sa.autograd.torch_attention(q32, torch.tensor(k, dtype=torch.float32),
                                        torch.tensor(v, dtype=torch.float32), lay)
    out32.sum().backward()
    assert q32.grad.dtype == torch.float32 and torch.isfinite(q32.grad).all()
    qb = torch.tensor(q, dtype=torch.bfloat16, requires_grad=True)
    outb = sa.autograd.torch_attention(qb, qb[:, :2, :19].detach(), qb[:, :2, :19, :5].detach(),
                                       sa.CSRLayout.from_dense(np.ones((19, 19), bool)))
    outb.float().sum().backward()
    assert outb.dtype == torch.bfloat16 and qb.grad.dtype == torch.bfloat16


def test_torch_gradcheck(rng):
    torch = pytest.importorskip("torch")
    shapes = ((1, 2, 5, 3), (1, 1, 6, 3), (1, 1, 6, 2))
    args = tuple(torch.tensor(rng.standard_normal(s), requires_grad=True) for s in shapes)
    small = sa.CSRLayout.from_dense(rng.random((5, 6)) < 0.5)
    assert torch.autograd.gradcheck(lambda a, b, c: sa.autograd.torch_attention(a, b, c, small), args)


def test_jax_adapter(rng):
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    q, k, v, lay = (x.astype(np.float32) if isinstance(x, np.ndarray) else x for x in _problem(rng))
    dout = rng.standard_normal((2, 4, 19, 5)).astype(np.float32)

    def loss(a, b, c):
        return jnp.sum(sa.autograd.jax_attention(a, b, c, lay) * dout)

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    _, want = _reference(q, k, v, lay, dout)
    for g, w in zip(grads, want):
        assert g.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(g), w, atol=1e-4)
    out = sa.autograd.jax_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), lay)
    np.testing.assert_allclose(np.asarray(out), sa.attention(q, k, v, lay), atol=1e-6)


def test_training_example_loss_falls():
    """The docs example, shortened: the sparse model learns the long-range retrieval task."""
    ns = runpy.run_path(str(ROOT / "docs" / "examples" / "train_numpy.py"))
    losses = ns["train"](n=256, steps=80, batch=4, seed=0, log_every=0, lr=5e-2)
    assert losses[0] > 2.5  # chance: log(16) = 2.77
    assert np.mean(losses[-5:]) < 0.3
