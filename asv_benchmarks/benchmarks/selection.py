"""Content-based selection (``sa.select``): exact top-k, Reformer LSH, routing k-means.

The top-k target configuration is N=16384, H=8, D=64, top_k=64, float32. Exact top-k must score
every (query, key) pair, ``2 * H * N^2 * D`` = 275 GFLOP at N=16384 (half with ``causal``), so
its floor is the machine's float32 GEMM rate; the suite also times those score products alone
(``TopK.time_scores_only``) to show how close the selection runs to that floor.

(The module is not called ``select.py``: run as a script, that name would shadow the standard
library's ``select`` module, which ``subprocess`` imports.)

Run as a script for the figures of the closing note (time, recall on planted near-duplicates)::

    python asv_benchmarks/benchmarks/selection.py            # all figures
    python asv_benchmarks/benchmarks/selection.py topk 16384 # one selector, one size
"""

from __future__ import annotations

import sys
import time

import numpy as np

import sparseattn as sa

H, D, TOP_K = 8, 64, 64


def _qk(n, seed=0, heads=H, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((heads, n, D), dtype=np.float64).astype(dtype),
            rng.standard_normal((heads, n, D), dtype=np.float64).astype(dtype))


def planted(n, d=D, heads=H, noise=0.1, seed=0, dtype=np.float32):
    """Unit keys; query i is key perm[i] plus noise of norm ~``noise`` (its true nearest key)."""
    rng = np.random.default_rng(seed)
    k = rng.standard_normal((heads, n, d))
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    perm = np.stack([rng.permutation(n) for _ in range(heads)])
    q = np.take_along_axis(k, perm[:, :, None], 1) + noise / np.sqrt(d) * rng.standard_normal((heads, n, d))
    return q.astype(dtype), k.astype(dtype), perm


def recall(layout, perm):
    """Fraction of queries whose planted key is in their row (no dense mask: a sorted search)."""
    heads, n = perm.shape
    rows = np.arange(heads * n)
    lo, hi = layout.indptr[rows], layout.indptr[rows + 1]
    target = perm.reshape(-1)
    key = rows.astype(np.int64) * n + target
    flat = np.repeat(np.arange(heads * n, dtype=np.int64), hi - lo) * n + layout.indices
    pos = np.searchsorted(flat, key)
    return float(np.mean((pos < flat.size) & (flat[np.minimum(pos, flat.size - 1)] == key)))


class TopK:
    """Exact top-64 per query over all keys; peak memory stays O(N * top_k)."""

    params = ([4096, 16384], [False, True])
    param_names = ["n", "causal"]
    timeout = 600

    def setup(self, n, causal):
        self.q, self.k = _qk(n)
        sa.select.topk(self.q[:, :256], self.k[:, :256], TOP_K, causal=causal)  # compile

    def time_topk(self, n, causal):
        sa.select.topk(self.q, self.k, TOP_K, causal=causal)

    def peakmem_topk(self, n, causal):
        sa.select.topk(self.q, self.k, TOP_K, causal=causal)

    def time_scores_only(self, n, causal):
        """The floor: the same q.kT tile products without any selection (blocked NumPy matmul)."""
        step = 1024
        for h in range(H):
            for i0 in range(0, n, step):
                end = min(n, i0 + step) if causal else n
                self.q[h, i0:i0 + step] @ self.k[h, :end].T


class TopKWithin:
    """Top-16 inside a sliding window of 1024 keys (scattered-key path, O(nnz(within) * D))."""

    params = ([4096, 16384],)
    param_names = ["n"]

    def setup(self, n):
        self.q, self.k = _qk(n)
        band = sa.CSRLayout.from_dense(np.tril(np.ones((64, 64), bool)))  # tiny: compile only
        sa.select.topk(self.q[:, :64], self.k[:, :64], 16, within=band)
        self.within = _window_layout(n, 1024)

    def time_topk_within(self, n):
        sa.select.topk(self.q, self.k, 16, within=self.within)


def _window_layout(n, window):
    """Causal sliding window as a CSRLayout, built directly (no pattern dependency)."""
    i = np.arange(n)
    lo = np.maximum(0, i - window + 1)
    counts = i - lo + 1
    indptr = np.zeros(n + 1, np.int64)
    np.cumsum(counts, out=indptr[1:])
    indices = np.arange(indptr[-1]) - np.repeat(indptr[:-1], counts) + np.repeat(lo, counts)
    return sa.CSRLayout(indptr, indices, (n, n))


class LSH:
    """Reformer LSH, bucket_size 64, n_buckets = 2 * N / 64 (hashing + chunking)."""

    params = ([4096, 16384], [1, 4])
    param_names = ["n", "n_hashes"]
    timeout = 600

    def setup(self, n, n_hashes):
        self.q, self.k = _qk(n)
        sa.select.lsh(self.q[:, :256], self.k[:, :256], n_hashes, 64)

    def time_lsh(self, n, n_hashes):
        sa.select.lsh(self.q, self.k, n_hashes, 64)


class Routing:
    """Routing k-means, sqrt(N) clusters, 10 iterations, capacity 2 x N / C."""

    params = ([4096, 16384],)
    param_names = ["n"]
    timeout = 600

    def setup(self, n):
        self.q, self.k = _qk(n)
        self.c = int(round(np.sqrt(n)))
        sa.select.routing(self.q[:, :256], self.k[:, :256], 8)

    def time_routing(self, n):
        sa.select.routing(self.q, self.k, self.c)

    def time_routing_reuse_centroids(self, n):
        """One refinement step from the previous step's centroids (the steady state)."""
        if not hasattr(self, "cent"):
            _, self.cent = sa.select.routing(self.q, self.k, self.c, iters=0, return_centroids=True)
        sa.select.routing(self.q, self.k, self.c, centroids=self.cent, iters=1)


# ----------------------------------------------------------------------------- script mode


def _best(f, repeat=3):
    best = np.inf
    for _ in range(repeat):
        t = time.perf_counter()
        out = f()
        best = min(best, time.perf_counter() - t)
    return best, out


def figures(which=("topk", "lsh", "routing"), sizes=(4096, 16384)):
    import os

    import numba

    print(f"# numba threads={numba.get_num_threads()} load average={os.getloadavg()[0]:.1f}")
    if "topk" in which:
        for n in sizes:
            q, k = _qk(n)
            sa.select.topk(q[:, :256], k[:, :256], TOP_K)
            sa.select.topk(q[:, :256], k[:, :256], TOP_K, causal=True)
            for causal in (False, True):
                t, lay = _best(lambda: sa.select.topk(q, k, TOP_K, causal=causal), 2)
                bench = TopK()
                bench.q, bench.k = q, k
                g, _ = _best(lambda: bench.time_scores_only(n, causal), 2)
                flops = 2 * H * D * (n * n if not causal else n * (n + 1) / 2)
                print(f"topk N={n} H={H} D={D} top_k={TOP_K} causal={causal}: {t:.3f} s "
                      f"({flops / t / 1e9:.1f} GFLOP/s of scores); score matmuls alone {g:.3f} s; "
                      f"index bytes {lay.nbytes / 2**20:.1f} MiB")
    if "lsh" in which or "routing" in which:
        q, k, perm = planted(4096, 64, 8, noise=0.1)
        base = f"planted near-duplicates N=4096 D=64 H=8 noise=0.1 (float32)"
        if "lsh" in which:
            sa.select.lsh(q[:, :256], k[:, :256], 1, 64)
            for nh in (1, 2, 4, 8):
                t, lay = _best(lambda: sa.select.lsh(q, k, nh, 64, seed=0), 2)
                print(f"lsh {base} n_hashes={nh} bucket_size=64: recall {recall(lay, perm):.4f}, "
                      f"keys/query {lay.nnz / (8 * 4096):.0f} ({lay.density:.3f}), {t:.3f} s")
        if "routing" in which:
            sa.select.routing(q[:, :256], k[:, :256], 8)
            for c in (16, 64):
                t, lay = _best(lambda: sa.select.routing(q, k, c, seed=0), 2)
                print(f"routing {base} n_clusters={c} iters=10 capacity_factor=2: recall "
                      f"{recall(lay, perm):.4f}, keys/query {lay.nnz / (8 * 4096):.0f} "
                      f"({lay.density:.3f}), {t:.3f} s")
    for n in sizes:
        q, k = _qk(n)
        if "lsh" in which:
            for nh in (1, 4):
                t, lay = _best(lambda: sa.select.lsh(q, k, nh, 64), 2)
                print(f"lsh N={n} H={H} D={D} n_hashes={nh} bucket_size=64: {t:.3f} s, nnz {lay.nnz}")
        if "routing" in which:
            c = int(round(np.sqrt(n)))
            t, (lay, cent) = _best(lambda: sa.select.routing(q, k, c, return_centroids=True), 2)
            t1, _ = _best(lambda: sa.select.routing(q, k, c, centroids=cent, iters=1), 2)
            print(f"routing N={n} H={H} D={D} n_clusters={c} iters=10: {t:.3f} s "
                  f"(reusing centroids, iters=1: {t1:.3f} s), nnz {lay.nnz}")


if __name__ == "__main__":
    args = sys.argv[1:]
    which = tuple(a for a in args if not a.isdigit()) or ("topk", "lsh", "routing")
    sizes = tuple(int(a) for a in args if a.isdigit()) or (4096, 16384)
    figures(which, sizes)
