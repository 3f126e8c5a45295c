"""Software prefetch for the CPU kernels that gather scattered rows.

A token-level CSR row names keys anywhere in the sequence, so the hardware prefetchers (which follow
strides) cannot guess the next K/V row and every gather waits for memory: at N=16384 with 64
scattered keys per query that wait was two thirds of the kernel's time. :func:`prefetch` asks for a
row's cache lines a few keys ahead, while the current keys are being computed on.
"""

from __future__ import annotations

import numpy as np
from llvmlite import binding as llvm
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from ... import config

__all__ = ["CACHE_LINE", "prefetch", "scattered"]

_OPAQUE_POINTERS = llvm.llvm_version_info[0] >= 15

#: Bytes per cache line on the CPUs we target (x86-64, most AArch64).
CACHE_LINE = 64


@intrinsic
def prefetch(typingctx, arr, i0, i1, i2, i3):
    """Hint that ``arr[i0, i1, i2, i3]`` (a 4-d array) will be read soon; never faults.

    Compiles to one ``llvm.prefetch`` (read, keep in all cache levels): no bounds check, since a
    prefetch of any address is harmless, though callers pass valid indices anyway.
    """
    if not (isinstance(arr, types.Array) and arr.ndim == 4):
        return None
    sig = types.void(arr, i0, i1, i2, i3)

    def codegen(context, builder, signature, args):
        aryty = signature.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        inds = [context.cast(builder, a, t, types.intp) for a, t in zip(args[1:], signature.args[1:])]
        ptr = cgutils.get_item_pointer2(context, builder, data=ary.data,
                                        shape=cgutils.unpack_tuple(builder, ary.shape),
                                        strides=cgutils.unpack_tuple(builder, ary.strides),
                                        layout=aryty.layout, inds=inds, wraparound=False)
        i32 = ir.IntType(32)
        if _OPAQUE_POINTERS:
            name = "llvm.prefetch.p0"
        else:  # LLVM 14 (numba < 0.61): typed pointers, the intrinsic takes an i8*
            ptr = builder.bitcast(ptr, ir.IntType(8).as_pointer())
            name = "llvm.prefetch.p0i8"
        fnty = ir.FunctionType(ir.VoidType(), [ptr.type, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, name)
        # (address, rw=read, locality=3: keep in every level, cache type=data)
        builder.call(fn, [ptr, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return sig, codegen


def scattered(layout):
    """Whether most steps between consecutive keys of a token layout's rows are longer than
    ``config.CSR_PREFETCH_MIN_GAP`` keys (from up to 1024 sampled rows; cached): then the kernel
    prefetches K/V rows.

    Top-k or LSH rows jump ~N / k keys and prefetching halves their time; windows, dilations and
    the local part of strided rows step by a few keys, which the hardware prefetchers follow,
    and prefetches would cost them up to 1.7x."""
    cached = layout._cache.get("scattered")
    if cached is None:
        ptr, idx = layout.indptr, layout.indices
        n_rows = ptr.shape[0] - 1
        rows = np.unique(np.linspace(0, max(n_rows - 1, 0), min(n_rows, 1024)).astype(np.int64))
        lens = ptr[rows + 1] - ptr[rows]
        pos = np.repeat(ptr[rows] - np.cumsum(lens) + lens, lens) + np.arange(int(lens.sum()))
        steps = np.diff(idx[pos].astype(np.int64))
        inside = np.ones(steps.shape[0] + 1, bool)  # steps across two sampled rows do not count
        inside[np.cumsum(lens)[:-1][lens[:-1] > 0] - 1] = False
        steps = steps[inside[: steps.shape[0]]]
        cached = bool(steps.size) and float(np.mean(steps > config.CSR_PREFETCH_MIN_GAP)) > 0.5
        layout._cache["scattered"] = cached
    return cached
