"""bfloat16 operands (``ml_dtypes.bfloat16`` NumPy arrays, torch tensors) on the CPU-side backends,
and the TF32 switch (``sa.use_tf32``, ``SPARSEATTN_TF32``, ``config.CUDA_ALLOW_TF32``).

bfloat16 computes in float32 and rounds the output once, so the result must be exactly the float32
computation on the widened inputs, rounded to bfloat16. The GPU tensor-core paths are checked
against these backends in tests/test_cuda.py.
"""

import numpy as np
import pytest

import sparseattn as sa
from sparseattn import _bfloat16

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)


def _case(rng, B=2, Bk=1, Hq=4, Hkv=2, Nq=70, Nk=90, D=16, Dv=8):
    q, k, v = (rng.standard_normal(s).astype(BF16)
               for s in ((B, Hq, Nq, D), (Bk, Hkv, Nk, D), (Bk, Hkv, Nk, Dv)))
    m = rng.random((Hq, Nq, Nk)) < 0.3
    m[:, 3] = False  # an empty row
    return q, k, v, m


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("kind", ["block", "block_odd", "csr"])
def test_bfloat16_is_float32_rounded_once(rng, backend, kind):
    q, k, v, m = _case(rng)
    lay = {"block": lambda: sa.BlockCSRLayout.from_dense(m, (32, 32)),
           "block_odd": lambda: sa.BlockCSRLayout.from_dense(m[:1], (24, 40)),
           "csr": lambda: sa.CSRLayout.from_dense(m)}[kind]()
    out, lse = sa.attention(q, k, v, lay, backend=backend, return_lse=True)
    f32 = [x.astype(np.float32) for x in (q, k, v)]
    want, want_lse = sa.attention(*f32, lay, backend=backend, return_lse=True)
    assert out.dtype == BF16 and lse.dtype == np.float32 and out.shape == want.shape
    np.testing.assert_array_equal(out.view(np.uint16), want.astype(BF16).view(np.uint16))
    np.testing.assert_array_equal(lse, want_lse)
    assert np.all(out[:, :, 3].astype(np.float32) == 0) and np.all(np.isneginf(lse[:, :, 3]))


def test_bfloat16_backward_and_mixed_dtypes(rng):
    q, k, v, m = _case(rng, Nq=40, Nk=50)
    lay = sa.BlockCSRLayout.from_dense(m, (16, 16))
    out, lse = sa.attention(q, k, v, lay, backend="cpu", return_lse=True)
    dout = rng.standard_normal(out.shape).astype(BF16)
    grads = sa.attention_backward(q, k, v, out, lse, dout, lay, backend="cpu")
    f32 = [x.astype(np.float32) for x in (q, k, v, out, lse, dout)]
    want = sa.attention_backward(*f32, lay, backend="cpu")
    for g, w, x in zip(grads, want, (q, k, v)):
        assert g.dtype == BF16 and g.shape == x.shape
        np.testing.assert_array_equal(g.view(np.uint16), w.astype(BF16).view(np.uint16))
    # bfloat16 with float16 has no common dtype: float32 out; with float64, float64
    assert sa.attention(q, k.astype(np.float16), v, lay, backend="cpu").dtype == np.float32
    assert sa.attention(q, k.astype(np.float64), v, lay, backend="cpu").dtype == np.float64


def test_bfloat16_torch_tensors_give_torch_tensors(rng):
    torch = pytest.importorskip("torch")
    q, k, v, m = _case(rng)
    lay = sa.BlockCSRLayout.from_dense(m, (32, 32))
    tq, tk, tv = (torch.from_numpy(x.view(np.int16)).view(torch.bfloat16) for x in (q, k, v))
    out, lse = sa.attention(tq, tk, tv, lay, backend="cpu", return_lse=True)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.bfloat16
    assert isinstance(lse, torch.Tensor) and lse.dtype == torch.float32
    want, want_lse = sa.attention(q, k, v, lay, backend="cpu", return_lse=True)
    np.testing.assert_array_equal(out.view(torch.int16).numpy(), want.view(np.int16))
    np.testing.assert_array_equal(lse.numpy(), want_lse)


def test_round_to_nearest_even_bits_match_ml_dtypes(rng):
    """The bit-pattern rounding the cuda backend uses where CuPy has no bfloat16 cast."""
    x = np.concatenate([rng.standard_normal(4000).astype(np.float32) * 10.0 ** rng.integers(-40, 38, 4000),
                        np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1 + 2**-8, 1 + 3 * 2**-8,
                                  3.3895314e38, 1e-45, -1e-45], np.float32)])
    got = _bfloat16._rne_bits(x, np)
    want = x.astype(BF16).view(np.uint16)
    nan = np.isnan(x)
    np.testing.assert_array_equal(got[~nan], want[~nan])
    assert np.all(np.isnan(got[nan].view(BF16).astype(np.float32)))
    np.testing.assert_array_equal(_bfloat16.widen(got.view(BF16)), got.view(BF16).astype(np.float32))


def test_dtype_errors_name_bfloat16():
    q = np.zeros((1, 2, 4), np.int32)
    with pytest.raises(TypeError, match="bfloat16"):
        sa.attention(q, q, q, sa.CSRLayout.from_dense(np.ones((2, 2), bool)))


def test_tf32_switch_precedence(monkeypatch):
    from sparseattn import config
    from sparseattn.backends import tf32_enabled

    monkeypatch.delenv("SPARSEATTN_TF32", raising=False)
    assert tf32_enabled() is False  # exactness is the default
    monkeypatch.setattr(config, "CUDA_ALLOW_TF32", True)
    assert tf32_enabled() is True
    monkeypatch.setenv("SPARSEATTN_TF32", "0")
    assert tf32_enabled() is False
    with sa.use_tf32():
        assert tf32_enabled() is True
        with sa.use_tf32(False):
            assert tf32_enabled() is False
        assert tf32_enabled() is True
    monkeypatch.setenv("SPARSEATTN_TF32", "maybe")
    with pytest.raises(ValueError, match="SPARSEATTN_TF32"):
        tf32_enabled()


def test_tf32_leaves_cpu_results_exact(rng):
    q, k, v, m = _case(rng)
    f32 = [x.astype(np.float32) for x in (q, k, v)]
    lay = sa.BlockCSRLayout.from_dense(m, (32, 32))
    want = sa.attention(*f32, lay, backend="cpu")
    with sa.use_tf32():
        np.testing.assert_array_equal(sa.attention(*f32, lay, backend="cpu"), want)


@pytest.mark.parametrize("bad", ["0", 1, None])
def test_use_tf32_takes_only_a_bool(bad):
    with pytest.raises(TypeError, match="use_tf32\\(enabled\\) must be a bool"):
        with sa.use_tf32(bad):
            pass
