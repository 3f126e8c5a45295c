"""GPU backward timings (run on a machine with a CUDA GPU): the tiled block backward against the
token-level kernels, and the CUDA C++ tiled kernels against the Numba ones, in one run each;
causal sliding windows, B=1, H=16, D=128, float32. ``python asv_benchmarks/gpu_backward.py``."""

from __future__ import annotations

import time

import cupy as cp

import sparseattn as sa
from sparseattn import config

H, D = 16, 128


def seconds(fn, repeat=5):
    """Best time of ``fn()`` over ``repeat`` (after one warm-up call)."""
    fn()
    cp.cuda.runtime.deviceSynchronize()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        cp.cuda.runtime.deviceSynchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def problem(n, window, block=(64, 64)):
    gen = cp.random.default_rng(0)
    layout = sa.patterns.sliding_window(window).layout(n, n, block_size=block)
    q, k, v, dout = (gen.standard_normal((1, H, n, D), dtype=cp.float32) for _ in range(4))
    out, lse = sa.attention(q, k, v, layout, backend="cuda", return_lse=True)
    return layout, q, k, v, dout, out, lse


def main():
    layout, q, k, v, dout, out, lse = problem(16384, 1024)

    def backward(lay=layout):
        return sa.attention_backward(q, k, v, out, lse, dout, lay, backend="cuda")

    tiled = seconds(backward)
    csr = layout.to_csr()
    csr.transpose()  # built once, outside the timing
    token = seconds(lambda: backward(csr), repeat=2)
    head_dims = config.CUDA_SIMT_HEAD_DIMS
    config.CUDA_SIMT_HEAD_DIMS = ()  # the Numba tiled kernels
    numba = seconds(backward)
    config.CUDA_SIMT_HEAD_DIMS = head_dims
    print(f"W=1024 N=16384: tiled {tiled * 1e3:.2f} ms, token-level {token * 1e3:.1f} ms "
          f"(tiled / token {tiled / token:.3f}), Numba tiled {numba * 1e3:.2f} ms "
          f"(CUDA C++ / Numba {tiled / numba:.3f})", flush=True)
    for block in ((64, 64), (128, 128)):
        layout, q, k, v, dout, out, lse = problem(65536, 4096, block)
        fwd = seconds(lambda: sa.attention(q, k, v, layout, backend="cuda", return_lse=True))
        bwd = seconds(lambda: sa.attention_backward(q, k, v, out, lse, dout, layout, backend="cuda"))
        print(f"W=4096 N=65536 blocks {block}: forward {fwd * 1e3:.2f} ms, backward "
              f"{bwd * 1e3:.2f} ms ({10 * layout.nnz * H * D / bwd / 1e12:.1f} useful TFLOP/s), "
              f"backward / forward {bwd / fwd:.2f}", flush=True)


if __name__ == "__main__":
    main()
