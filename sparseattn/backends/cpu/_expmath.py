"""A vectorisable ``exp2`` for the softmax inner loops.

Numba calls libm's scalar ``exp`` once per element, which costs as much as the tile products
themselves (PyPI's llvmlite has no SVML). This version is plain arithmetic that LLVM turns into
AVX2/AVX-512 code: ``2**t = 2**n * 2**f`` with ``n = round(t)``, ``f`` in [-0.5, 0.5],
``2**f = exp(f ln 2)`` by a degree-12 Taylor polynomial (relative error below 1e-15, so the same
code serves float32 and float64 within the contract), and ``2**n`` written straight into the
exponent bits of an integer buffer of the float's width viewed as floats.

``ExpConsts`` packs the per-dtype constants; build it with :func:`exp_consts`.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

# The compiler may reassociate sums (vectorised reductions) and contract to FMA, but must keep
# infinities: masked scores are -inf.
FASTMATH = {"reassoc", "contract", "nsz", "arcp"}

_DEGREE = 12


def exp_consts(dtype):
    """Constants for :func:`exp2_row` in ``dtype``.

    Returns ``coef`` (float, the Taylor coefficients of ``exp(y)`` for degrees 0..12, then
    ``ln 2``, the smallest exponent kept (below it the result is 0), ``0.5`` and ``0``),
    ``params`` (int of the float's width: exponent bias, mantissa bits) and an empty integer array
    of that width (the bit buffer's prototype). Every constant has the tile's own type: a float64
    or int64 constant in a float32 loop would widen the whole loop and halve its SIMD width.
    """
    dtype = np.dtype(dtype)
    if dtype == np.float32:
        ints, tmin, bias, width = np.int32, -126.0, 127, 23
    elif dtype == np.float64:
        ints, tmin, bias, width = np.int64, -1022.0, 1023, 52
    else:  # pragma: no cover - the API only passes float32/float64
        raise TypeError(f"no exp2 constants for {dtype}")
    taylor = [1.0 / math.factorial(i) for i in range(_DEGREE + 1)]
    coef = np.array(taylor + [math.log(2.0), tmin, 0.5, 0.0], dtype)
    return coef, np.array([bias, width], ints), np.empty(0, ints)


@njit(cache=True, fastmath=FASTMATH)
def exp2_row(x, n, shift, coef, params, bits):
    """``x[:n] = 2 ** (x[:n] - shift)`` in place, 0 where the result underflows; returns the sum.

    ``bits`` is an integer scratch array of the float's width, at least ``n`` long.
    """
    c0 = coef[0]; c1 = coef[1]; c2 = coef[2]; c3 = coef[3]; c4 = coef[4]  # noqa: E702
    c5 = coef[5]; c6 = coef[6]; c7 = coef[7]; c8 = coef[8]; c9 = coef[9]  # noqa: E702
    c10 = coef[10]; c11 = coef[11]; c12 = coef[12]; ln2 = coef[13]  # noqa: E702
    tmin = coef[14]; half = coef[15]; zero = coef[16]  # noqa: E702
    bias = params[0]
    width = params[1]
    for j in range(n):
        t = x[j] - shift
        keep = t >= tmin
        t = t if keep else tmin
        # round(t) without libm's floor (which blocks vectorisation): t <= 0 here, so truncating
        # half - t >= 0 is a floor. The int goes through the bit buffer, the float through x[j].
        bits[j] = half - t
        r = bits[j]
        x[j] = r
        y = (t + x[j]) * ln2
        p = c12
        p = p * y + c11
        p = p * y + c10
        p = p * y + c9
        p = p * y + c8
        p = p * y + c7
        p = p * y + c6
        p = p * y + c5
        p = p * y + c4
        p = p * y + c3
        p = p * y + c2
        p = p * y + c1
        p = p * y + c0
        x[j] = p if keep else zero
        bits[j] = (bias - r) << width
    scale = bits[:n].view(x.dtype)
    total = zero
    for j in range(n):
        e = x[j] * scale[j]
        x[j] = e
        total += e
    return total
