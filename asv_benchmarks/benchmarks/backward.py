"""CPU backward pass against the forward pass on the same layout.

The configuration is the peer figures' (``shared/bench/README.md``): B=1, H=8, D=64, causal sliding
window W=512, float32, at N=16384 and smaller. The issue's target: backward at most 2.5x forward.
``track_backward_over_forward`` measures that ratio with the two passes interleaved in one run, so
machine load moves both alike.

Run alone for a quick table (best of ``--repeat`` interleaved runs)::

    .venv/bin/python asv_benchmarks/benchmarks/backward.py [--n 4096 16384] [--repeat 5]
"""

from __future__ import annotations

import time

import numpy as np

import sparseattn as sa

H, D, W = 8, 64, 512


def make_problem(n, dtype, seed=0):
    """q, k, v, dout, the block layout the CPU backend uses, and the forward's out and lse."""
    rng = np.random.default_rng(seed)
    q, k, v, dout = (rng.standard_normal((H, n, D)).astype(dtype) for _ in range(4))
    layout = sa.patterns.sliding_window(W).layout(n, block_size=sa.config.CPU_BLOCK_SIZE)
    out, lse = sa.attention(q, k, v, layout, backend="cpu", return_lse=True)
    return q, k, v, dout, layout, out, lse


def interleaved_best(fns, repeat):
    """Best time of each function over ``repeat`` rounds that run them in turn."""
    best = [np.inf] * len(fns)
    for _ in range(repeat):
        for i, f in enumerate(fns):
            t = time.perf_counter()
            f()
            best[i] = min(best[i], time.perf_counter() - t)
    return best


class Backward:
    """``sa.attention_backward`` on the CPU backend (kernels compiled, transpose cached in setup)."""

    params = ([4096, 16384], ["float32", "float64"])
    param_names = ["n", "dtype"]
    timeout = 900

    def setup(self, n, dtype):
        self.q, self.k, self.v, self.dout, self.layout, self.out, self.lse = make_problem(n, np.dtype(dtype))
        self._backward()

    def _forward(self):
        sa.attention(self.q, self.k, self.v, self.layout, backend="cpu", return_lse=True)

    def _backward(self):
        sa.attention_backward(self.q, self.k, self.v, self.out, self.lse, self.dout, self.layout,
                              backend="cpu")

    def time_backward(self, n, dtype):
        self._backward()

    def peakmem_backward(self, n, dtype):
        self._backward()

    def track_backward_over_forward(self, n, dtype):
        fwd, bwd = interleaved_best([self._forward, self._backward], 3)
        return bwd / fwd

    track_backward_over_forward.unit = "ratio"


def main():
    import argparse

    ap = argparse.ArgumentParser(description="CPU backward vs forward, sliding window W=512")
    ap.add_argument("--n", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    import numba

    print(f"B=1 H={H} D={D} causal sliding window W={W}, {args.dtype}, "
          f"{numba.get_num_threads()} threads, best of {args.repeat} interleaved runs")
    for n in args.n:
        bench = Backward()
        bench.setup(n, args.dtype)
        bench._forward()
        fwd, bwd = interleaved_best([bench._forward, bench._backward], args.repeat)
        print(f"N={n:6d}  forward {fwd * 1e3:8.1f} ms  backward {bwd * 1e3:8.1f} ms  "
              f"ratio {bwd / fwd:.2f}")


if __name__ == "__main__":
    main()
