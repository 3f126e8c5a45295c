"""A vectorisable ``exp`` for the CPU kernels.

Without Intel's SVML, Numba turns ``np.exp`` on float32 into one libm call per element, which LLVM
cannot vectorise: in the backward pass that call costs as much as the tile's BLAS products. The
float32 ``fast_exp`` below is branch-free arithmetic (Cody-Waite range reduction, the Cephes
degree-6 polynomial, the power of two built from its bits), so a loop over a tile compiles to SIMD
code. Its error is about 1 ulp on ``[-87, 0]``, the range of ``score - lse``; below -87 it returns 0
(so ``exp(-inf) = 0``), above 88 it saturates at 1.7e38 instead of overflowing, and NaN gives NaN.
float64 keeps ``np.exp``.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload
from numba.np.numpy_support import as_dtype

__all__ = ["FASTMATH", "fast_exp", "exp_row", "zero_of", "one_of", "neg_inf_of"]

#: Fast-math flags of the CPU kernels: the compiler may reassociate sums (vectorised reductions)
#: and contract to FMA, but must keep infinities and NaN: masked scores are -inf.
FASTMATH = {"reassoc", "contract", "nsz", "arcp"}


@intrinsic
def _bits_to_f32(typingctx, x):
    """Reinterpret the bits of an int32 as a float32 (no conversion)."""
    sig = types.float32(types.int32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


def fast_exp(x):
    """``exp(x)``; inside Numba code float32 takes the vectorisable path."""
    return np.exp(x)


@overload(fast_exp, jit_options={"cache": True})
def _fast_exp_overload(x):
    if isinstance(x, types.Float) and x.bitwidth == 32:

        def impl(x):
            xc = min(max(x, np.float32(-87.0)), np.float32(88.0))
            n = np.floor(xc * np.float32(1.4426950408889634) + np.float32(0.5))
            # ln 2 split in two so that n * ln2_hi is exact
            f = xc - n * np.float32(0.693359375) - n * np.float32(-2.12194440e-4)
            p = np.float32(1.9875691500e-4)
            p = p * f + np.float32(1.3981999507e-3)
            p = p * f + np.float32(8.3334519073e-3)
            p = p * f + np.float32(4.1665795894e-2)
            p = p * f + np.float32(1.6666665459e-1)
            p = p * f + np.float32(5.0000001201e-1)
            p = p * (f * f) + f + np.float32(1.0)
            e = p * _bits_to_f32((np.int32(n) + np.int32(127)) << np.int32(23))
            # NaN must stay NaN (a bad input shows, never vanishes into 0): both tests fail for it
            return e if x > np.float32(-87.0) else (np.float32(0.0) if x <= np.float32(-87.0) else x)

        return impl
    return lambda x: np.exp(x)


@njit(cache=True, fastmath=FASTMATH)
def exp_row(x, n, shift):
    """``x[:n] = exp(x[:n] - shift)`` in place (0 for -inf); returns the sum, in x's dtype.

    The online-softmax step of every CPU kernel: one vectorised pass over a row of scores.
    """
    total = shift - shift
    for j in range(n):
        e = fast_exp(x[j] - shift)
        x[j] = e
        total += e
    return total


def zero_of(x):
    """``0`` in the dtype of array ``x``.

    In Numba code a literal ``0.0`` is float64, and ``acc = 0.0; acc += a * b`` then sums float32
    products in float64: half as many lanes per instruction and, through ``np.exp``, one libm call
    per score. Kernels start their float32 sums from this instead.
    """
    return x.dtype.type(0)


def one_of(x):
    """``1`` in the dtype of array ``x`` (see :func:`zero_of`)."""
    return x.dtype.type(1)


def neg_inf_of(x):
    """``-inf`` in the dtype of array ``x`` (see :func:`zero_of`)."""
    return x.dtype.type(-np.inf)


def _constant_of(value):
    def typer(x):
        if isinstance(x, types.Array) and isinstance(x.dtype, types.Float):
            c = as_dtype(x.dtype).type(value)
            return lambda x: c
        return None

    return typer


overload(zero_of, jit_options={"cache": True})(_constant_of(0))
overload(one_of, jit_options={"cache": True})(_constant_of(1))
overload(neg_inf_of, jit_options={"cache": True})(_constant_of(-np.inf))
