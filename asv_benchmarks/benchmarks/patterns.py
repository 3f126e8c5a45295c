"""Building static pattern layouts (issue 3): time and peak memory.

Targets: causal sliding window W=4096 at N=1,048,576 as a 64x64 BlockCSRLayout in < 1 s and
< 300 MB peak; its token-level CSR at N=65,536 in < 2 s.
"""

import numpy as np

import sparseattn as sa

P = sa.patterns
BLOCK = (64, 64)


class SlidingWindowBlock:
    """Causal sliding window W=4096 as a 64x64 block layout."""

    params = ([65536, 262144, 1048576],)
    param_names = ["n"]
    timeout = 120

    def setup(self, n):
        self.pattern = P.sliding_window(4096)
        self.pattern.layout(8192, block_size=BLOCK)  # warm: Numba/imports outside the timing

    def time_build(self, n):
        self.pattern.layout(n, block_size=BLOCK)

    def peakmem_build(self, n):
        self.pattern.layout(n, block_size=BLOCK)

    def track_distinct_masks(self, n):
        return self.pattern.layout(n, block_size=BLOCK).masks.shape[0]


class SlidingWindowCSR:
    """Causal sliding window W=4096 as a token-level CSR layout (N=65536: 260M entries)."""

    params = ([16384, 65536],)
    param_names = ["n"]
    timeout = 120

    def setup(self, n):
        self.pattern = P.sliding_window(4096)
        self.pattern.layout(8192)

    def time_build(self, n):
        self.pattern.layout(n)

    def peakmem_build(self, n):
        self.pattern.layout(n)


FAMILIES = {
    "dense_causal": P.dense(causal=True),
    "sinks+window": P.sinks(4) | P.sliding_window(1024),
    "dilated_per_head": P.dilated([1, 2, 4, 8], window=4096),
    "strided": P.strided(128),
    "fixed": P.fixed(128, 8),
    "longformer": P.longformer(512, [0, 1, 2, 3, 1000, 5000]),
    "bigbird": P.bigbird(64, 3, 2, 3),
    "bigbird_16": P.bigbird(16, 3, 2, 3),
    "block_sparse": P.block_sparse(np.random.default_rng(0).random((256, 256)) < 0.1, 64),
    "causal(bigbird)": P.causal(P.bigbird(64)),
    "window&dilated": P.sliding_window(2048) & P.dilated(2),
}


class Families:
    """Every family at N=16384: block layout (64x64) and token CSR."""

    params = (list(FAMILIES), ["block", "csr"])
    param_names = ["pattern", "kind"]
    timeout = 120

    def setup(self, name, kind):
        self.pattern = FAMILIES[name]
        self.bs = BLOCK if kind == "block" else None
        self.pattern.layout(1024, heads=4, block_size=self.bs)

    def time_build(self, name, kind):
        self.pattern.layout(16384, heads=4, block_size=self.bs)

    def peakmem_build(self, name, kind):
        self.pattern.layout(16384, heads=4, block_size=self.bs)


class DeepSpeedLayouts:
    """DeepSpeed-compatible make_layout at seq_len 16384, block 16 (1024 x 1024 blocks)."""

    params = (["fixed", "variable", "bigbird", "bslongformer", "local"],)
    param_names = ["config"]

    def setup(self, name):
        ds = sa.compat.deepspeed
        self.cfg = {
            "fixed": ds.FixedSparsityConfig(16, different_layout_per_head=True, num_different_global_patterns=4),
            "variable": ds.VariableSparsityConfig(16, num_random_blocks=2, local_window_blocks=[4, 8]),
            "bigbird": ds.BigBirdSparsityConfig(16, num_random_blocks=2),
            "bslongformer": ds.BSLongformerSparsityConfig(16, global_block_indices=[0, 100]),
            "local": ds.LocalSlidingWindowSparsityConfig(16),
        }[name]

    def time_make_layout(self, name):
        self.cfg.make_layout(16384)

    def time_to_layout(self, name):
        self.cfg.to_layout(16384)


class LayoutSetOps:
    """Union and intersection of two token-level layouts (a linear merge per row) at N=8192:
    ``dilated(2)`` with ``dilated(3)`` (causal, 11-17 M pairs each), built once in setup."""

    params = (["union", "intersection"],)
    param_names = ["op"]
    timeout = 120

    def setup(self, op):
        self.a = P.dilated(2).layout(8192)
        self.b = P.dilated(3).layout(8192)
        self.time_op(op)  # compile outside the timing

    def time_op(self, op):
        return (self.a | self.b) if op == "union" else (self.a & self.b)
