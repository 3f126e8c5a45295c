"""CPU forward pass: sliding window and random block-sparse layouts against dense NumPy attention.

The configurations are those of the peer figures (``shared/bench/README.md``): B=1, H=8, D=64,
causal sliding window W=512, and random 10% of 64x64 blocks plus the diagonal.
Useful GFLOP/s = 4 * nnz * D * H / time.
"""

from __future__ import annotations

import numpy as np

import sparseattn as sa

H, D, W, BLOCK, DENSITY = 8, 64, 512, 64, 0.1


def random_block_pattern(n, block=BLOCK, density=DENSITY, seed=0):
    """Random ``density`` of the ``block x block`` tiles, diagonal always on."""
    nb = -(-n // block)
    mask = np.random.default_rng(seed).random((nb, nb)) < density
    np.fill_diagonal(mask, True)
    return sa.patterns.block_sparse(mask, block)


def make_pattern(name, n):
    if name == "sliding_window":
        return sa.patterns.sliding_window(W)
    if name == "block_sparse":
        return random_block_pattern(n)
    raise ValueError(name)


def make_qkv(n, dtype, heads=H, dim=D, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal((heads, n, dim)).astype(dtype) for _ in range(3))


class Forward:
    """``sa.attention`` on the CPU backend (layout built and kernel compiled in setup)."""

    params = (["sliding_window", "block_sparse"], [4096, 16384], ["float32", "float64"])
    param_names = ["pattern", "n", "dtype"]
    timeout = 600

    def setup(self, pattern, n, dtype):
        self.q, self.k, self.v = make_qkv(n, np.dtype(dtype))
        self.layout = make_pattern(pattern, n).layout(n, block_size=sa.config.CPU_BLOCK_SIZE)
        sa.attention(self.q, self.k, self.v, self.layout, backend="cpu")

    def time_forward(self, pattern, n, dtype):
        sa.attention(self.q, self.k, self.v, self.layout, backend="cpu")

    def peakmem_forward(self, pattern, n, dtype):
        sa.attention(self.q, self.k, self.v, self.layout, backend="cpu")

    def track_useful_gflops(self, pattern, n, dtype):
        import time

        t0 = time.perf_counter()
        sa.attention(self.q, self.k, self.v, self.layout, backend="cpu")
        return 4 * self.layout.nnz * D * H / (time.perf_counter() - t0) / 1e9

    track_useful_gflops.unit = "GFLOP/s"


class DenseNumPy:
    """Dense NumPy attention in 1024-query chunks: the baseline the sparse kernels are compared to."""

    params = ([4096], ["float32"])
    param_names = ["n", "dtype"]
    timeout = 600

    def setup(self, n, dtype):
        self.q, self.k, self.v = make_qkv(n, np.dtype(dtype))
        self.scale = 1.0 / np.sqrt(D)

    def _run(self):
        q, k, v = self.q, self.k, self.v
        for lo in range(0, q.shape[1], 1024):
            s = np.matmul(q[:, lo:lo + 1024], k.transpose(0, 2, 1)) * self.scale
            s -= s.max(axis=-1, keepdims=True)
            np.exp(s, out=s)
            s /= s.sum(axis=-1, keepdims=True)
            np.matmul(s, v)

    def time_dense(self, n, dtype):
        self._run()

    def peakmem_dense(self, n, dtype):
        self._run()


def _topk_like_layout(n, heads, top_k=64, seed=0):
    """Token-level CSR with ``top_k`` scattered keys per query (what ``select.topk`` returns),
    built directly so that the benchmark times attention, not selection."""
    rng = np.random.default_rng(seed)
    cols = np.sort(rng.integers(0, n - top_k, size=(heads * n, top_k)), axis=1) + np.arange(top_k)
    indptr = np.arange(heads * n + 1, dtype=np.int64) * top_k
    return sa.CSRLayout(indptr, cols.ravel(), (n, n), heads)


class CPUTargets:
    """The CPU performance targets beyond the peer configurations (N=16384, H=8, float32):
    BigBird at 64-blocks, a D=128 window, and token-level CSR with 64 scattered keys per query.
    ``asv_benchmarks/cpu_vs_flex.py`` times the same against FlexAttention."""

    params = (["bigbird64", "window_d128", "csr_topk64"],)
    param_names = ["config"]
    timeout = 600

    def setup(self, config):
        n, dim = 16384, (128 if config == "window_d128" else D)
        self.q, self.k, self.v = make_qkv(n, np.float32, dim=dim)
        if config == "bigbird64":
            pattern = sa.patterns.bigbird(64, window_blocks=3, global_blocks=2, random_blocks=3)
            self.layout = pattern.layout(n, heads=H, block_size=sa.config.CPU_BLOCK_SIZE)
        elif config == "window_d128":
            self.layout = sa.patterns.sliding_window(W).layout(n, block_size=sa.config.CPU_BLOCK_SIZE)
        else:
            self.layout = _topk_like_layout(n, H)
        sa.attention(self.q, self.k, self.v, self.layout, backend="cpu")

    def time_forward(self, config):
        sa.attention(self.q, self.k, self.v, self.layout, backend="cpu")

    def track_useful_gflops(self, config):
        import time

        t0 = time.perf_counter()
        sa.attention(self.q, self.k, self.v, self.layout, backend="cpu")
        nnz = self.layout.nnz * (H // self.layout.heads)
        return 4 * nnz * self.q.shape[-1] / (time.perf_counter() - t0) / 1e9

    track_useful_gflops.unit = "GFLOP/s"
