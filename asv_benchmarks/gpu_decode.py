"""GPU decode-step timings (run on a machine with a CUDA GPU): the CUDA C++ split-K kernel at a
few blocks-per-SM settings against the Numba kernel, one KVCache-style step timed from Python;
32 query heads over 8 key/value heads, float32. ``python asv_benchmarks/gpu_decode.py``."""

from __future__ import annotations

import time

import cupy as cp

import sparseattn as sa
from sparseattn import config

BACKEND = sa.backends.get("cuda")


def step_seconds(q, k, v, n, workspace, repeat=20):
    """Best time of one decode step over ``repeat`` (after one warm-up step)."""
    BACKEND.decode(q, k, v, n, 0.088, workspace)
    cp.cuda.runtime.deviceSynchronize()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        BACKEND.decode(q, k, v, n, 0.088, workspace)
        cp.cuda.runtime.deviceSynchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def main():
    gen = cp.random.default_rng(0)
    head_dims = config.CUDA_SIMT_HEAD_DIMS
    for d in (128, 64):
        q = gen.standard_normal((32, d), dtype=cp.float32)
        for n in (4096, 65536, 524288):
            k, v = (gen.standard_normal((8, n, d), dtype=cp.float32) for _ in range(2))
            nbytes = 2 * 8 * n * d * 4  # K and V read once per step
            cells = []
            for blocks in (4, 8, 16):
                config.CUDA_DECODE_FAST_BLOCKS_PER_SM = blocks
                t = step_seconds(q, k, v, n, {})
                cells.append(f"CUDA C++ {blocks}/SM {t * 1e3:.3f} ms {nbytes / t / 1e9:.0f} GB/s")
            config.CUDA_DECODE_FAST_BLOCKS_PER_SM = 8
            config.CUDA_SIMT_HEAD_DIMS = ()  # the Numba kernel
            t = step_seconds(q, k, v, n, {})
            config.CUDA_SIMT_HEAD_DIMS = head_dims
            cells.append(f"Numba {t * 1e3:.3f} ms {nbytes / t / 1e9:.0f} GB/s")
            print(f"D={d} n={n}: " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
