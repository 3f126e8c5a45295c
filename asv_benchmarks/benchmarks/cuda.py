"""CUDA backend forward and backward passes (skipped cleanly where no usable GPU is found).

B=1, H=16, D=128 as in ``shared/device/README.md``: causal sliding window W=4096 and a random
10% of 128x128 blocks plus the diagonal, in float16 (tensor cores), float32 and float64.
Timed with CUDA events around the kernel; useful TFLOP/s = 4 * nnz * D * H / time. The same
configurations against torch FlexAttention: ``python asv_benchmarks/gpu_vs_flex.py``.
"""

from __future__ import annotations

import numpy as np

import sparseattn as sa

H, D, W = 16, 128, 4096


def _pattern(name, n):
    if name == "sliding_window":
        return sa.patterns.sliding_window(W)
    nb = n // 128
    mask = np.random.default_rng(0).random((nb, nb)) < 0.1
    np.fill_diagonal(mask, True)
    return sa.patterns.block_sparse(mask, 128)


class _CUDAPass:
    """Arrays, layout and CUDA-event timing shared by the forward and backward classes."""

    params = (["sliding_window", "block_sparse"], [16384, 65536], ["float16", "float32", "float64"])
    param_names = ["pattern", "n", "dtype"]
    timeout = 600
    flops_per_layout_flop = 1.0  # useful work per ``layout.flops`` (4 * nnz * D)

    def setup(self, pattern, n, dtype):
        if "cuda" not in sa.backends.available():
            raise NotImplementedError(sa.backends.why_unavailable("cuda"))  # asv: skipped
        import cupy as cp

        self.cp = cp
        gen = cp.random.default_rng(0)
        self.q, self.k, self.v = (gen.standard_normal((1, H, n, D), dtype=cp.float32).astype(dtype)
                                  for _ in range(3))
        self.layout = _pattern(pattern, n).layout(n, block_size=(128, 128))
        self._prepare()
        self._run()  # compile and move the layout outside the timing
        cp.cuda.runtime.deviceSynchronize()

    def _prepare(self):
        pass

    def _seconds(self, reps=3):
        cp = self.cp
        start, end = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        for _ in range(reps):
            self._run()
        end.record()
        end.synchronize()
        return cp.cuda.get_elapsed_time(start, end) / reps / 1e3

    def _time(self):
        self._run()
        self.cp.cuda.runtime.deviceSynchronize()

    def track_useful_tflops(self, pattern, n, dtype):
        return self.flops_per_layout_flop * self.layout.flops(D, q_heads=H) / self._seconds() / 1e12

    track_useful_tflops.unit = "TFLOP/s"


class CUDAForward(_CUDAPass):
    """``sa.attention`` on CuPy arrays, backend ``cuda``."""

    def _run(self):
        return sa.attention(self.q, self.k, self.v, self.layout, backend="cuda")

    def time_forward(self, pattern, n, dtype):
        self._time()


class CUDABackward(_CUDAPass):
    """``sa.attention_backward`` on CuPy arrays (tiled kernels for these block layouts), float32
    and float64; useful TFLOP/s count ``10 * nnz * D`` (the five products of each pair)."""

    params = (["sliding_window", "block_sparse"], [16384, 65536], ["float32", "float64"])
    flops_per_layout_flop = 2.5

    def _prepare(self):
        self.out, self.lse = sa.attention(self.q, self.k, self.v, self.layout, backend="cuda",
                                          return_lse=True)
        self.dout = self.cp.ones_like(self.out)

    def _run(self):
        return sa.attention_backward(self.q, self.k, self.v, self.out, self.lse, self.dout,
                                     self.layout, backend="cuda")

    def time_backward(self, pattern, n, dtype):
        self._time()


class LayoutBuild:
    """Building the sliding-window block layout at N = 1,048,576 (host side, no GPU needed there,
    but part of the GPU story: FlexAttention's default mask builder ran out of memory at 65536)."""

    params = [[65536, 1048576]]
    param_names = ["n"]

    def time_sliding_window_layout(self, n):
        sa.patterns.sliding_window(W).layout(n, block_size=(128, 128))

    def peakmem_sliding_window_layout(self, n):
        sa.patterns.sliding_window(W).layout(n, block_size=(128, 128))


class CUDASelect:
    """The selectors on CuPy arrays, backend ``cuda``: top-k (k=64, causal), LSH (4 rounds of
    64-key chunks) and routing (sqrt(N) clusters, 2 k-means iterations); H=16, D=128, float32."""

    params = (["topk", "lsh", "routing"], [4096, 16384])
    param_names = ["selector", "n"]
    timeout = 600

    def setup(self, selector, n):
        if "cuda" not in sa.backends.available():
            raise NotImplementedError(sa.backends.why_unavailable("cuda"))  # asv: skipped
        import cupy as cp

        self.cp = cp
        gen = cp.random.default_rng(0)
        self.q, self.k = (gen.standard_normal((H, n, D), dtype=cp.float32) for _ in range(2))
        self.time_select(selector, n)  # compile outside the timing

    def time_select(self, selector, n):
        if selector == "topk":
            sa.select.topk(self.q, self.k, 64, causal=True, backend="cuda")
        elif selector == "lsh":
            sa.select.lsh(self.q, self.k, n_hashes=4, bucket_size=64, backend="cuda")
        else:
            sa.select.routing(self.q, self.k, int(n ** 0.5), iters=2, backend="cuda")
        self.cp.cuda.runtime.deviceSynchronize()


class CUDADecode:
    """One decode step on the GPU (split-K kernel): 32 query heads over 8 key/value heads,
    D=128, float32, against caches of n positions; bandwidth = bytes of K and V read / time."""

    params = [[4096, 65536, 524288]]
    param_names = ["n"]

    def setup(self, n):
        if "cuda" not in sa.backends.available():
            raise NotImplementedError(sa.backends.why_unavailable("cuda"))  # asv: skipped
        import cupy as cp

        self.cp = cp
        gen = cp.random.default_rng(0)
        self.q = gen.standard_normal((32, 128), dtype=cp.float32)
        self.k, self.v = (gen.standard_normal((8, n, 128), dtype=cp.float32) for _ in range(2))
        self.be = sa.backends.get("cuda")
        self.ws = {}
        self.time_step(n)

    def time_step(self, n):
        self.be.decode(self.q, self.k, self.v, n, 0.088, self.ws)
        self.cp.cuda.runtime.deviceSynchronize()
