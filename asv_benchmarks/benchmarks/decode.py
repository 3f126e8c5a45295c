"""Decoding through a pattern-shaped KVCache: per-token latency, prefill throughput, exactness.

asv times one decode step (append one token + attend its query) in the steady state of a rolling
cache, and the prefill of a chunk. Run as a script for the long checks::

    python asv_benchmarks/benchmarks/decode.py check --steps 10000   # every step vs sa.attention
    python asv_benchmarks/benchmarks/decode.py memory --tokens 100000 # flat memory (tracemalloc)
    python asv_benchmarks/benchmarks/decode.py latency                # per-token decode, prefill
"""

from __future__ import annotations

import numpy as np

import sparseattn as sa

HQ, HKV, D = 8, 2, 64  # GQA 8:2, as Mistral-style configurations


def _pattern(kind, window):
    P = sa.patterns
    return {"window": P.sliding_window(window),
            "sinks+window": P.sinks(4) | P.sliding_window(window),
            "dense": P.dense(causal=True)}[kind]


def _filled_cache(kind, window, n, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    cache = sa.KVCache(_pattern(kind, window), HKV, D, dtype=dtype)
    k = rng.standard_normal((HKV, n, D)).astype(dtype)
    cache.append(k[:, :-1], k[:, :-1])
    cache.append(k[:, -1:], k[:, -1:])  # a single-token append releases the prefill's context
    return cache


class DecodeStep:
    """One token: append its key/value, attend its query (rolling buffer already full)."""

    params = (["window", "sinks+window", "dense"], [1024, 4096])
    param_names = ["pattern", "window"]

    def setup(self, kind, window):
        rng = np.random.default_rng(1)
        self.cache = _filled_cache(kind, window, window)
        self.k = rng.standard_normal((HKV, 1, D)).astype(np.float32)
        self.q = rng.standard_normal((HQ, 1, D)).astype(np.float32)
        self.time_step()  # compile outside the timing

    def time_step(self, *params):
        self.cache.append(self.k, self.k)
        self.cache.attend(self.q)

    def time_attend(self, *params):
        self.cache.attend(self.q)


class Prefill:
    """A prefill chunk of ``chunk`` tokens into a window-4096 cache (cache already full)."""

    params = ([512, 4096], ["window", "sinks+window"])
    param_names = ["chunk", "pattern"]
    timeout = 120

    def setup(self, chunk, kind):
        rng = np.random.default_rng(2)
        self.cache = _filled_cache(kind, 4096, 4096)
        self.k = rng.standard_normal((HKV, chunk, D)).astype(np.float32)
        self.q = rng.standard_normal((HQ, chunk, D)).astype(np.float32)
        self.time_chunk(chunk, kind)

    def time_chunk(self, chunk, kind):
        self.cache.append(self.k, self.k)
        self.cache.attend(self.q)

    def track_tokens_per_second(self, chunk, kind):
        import time

        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            self.time_chunk(chunk, kind)
            best = min(best, time.perf_counter() - t0)
        return chunk / best

    track_tokens_per_second.unit = "tokens/s"


class CacheMemory:
    """Bytes held after a long stream: flat for rolling caches."""

    params = (["window", "sinks+window", "dense"],)
    param_names = ["pattern"]

    def track_nbytes_after_100k(self, kind):
        cache = _filled_cache(kind, 4096, 100_000)
        return cache.nbytes

    track_nbytes_after_100k.unit = "bytes"


# ----------------------------------------------------------------------------- script checks


def check(steps, window, dtype, kinds, backend=None):
    """Decode ``steps`` tokens one by one; compare every step with sa.attention over the stream."""
    import time

    rng = np.random.default_rng(3)
    q = rng.standard_normal((HQ, steps, D)).astype(dtype)
    k = rng.standard_normal((HKV, steps, D)).astype(dtype)
    v = rng.standard_normal((HKV, steps, D)).astype(dtype)
    for kind in kinds:
        pattern = _pattern(kind, window)
        t0 = time.perf_counter()
        want = sa.attention(q, k, v, pattern, backend="cpu")
        cache = sa.KVCache(pattern, HKV, D, dtype=dtype, backend=backend)
        be = sa.backends.get(backend or "cpu")
        worst = 0.0
        scale = float(np.abs(want).max())
        for p in range(steps):
            cache.append(k[:, p:p + 1], v[:, p:p + 1])
            got = be.to_numpy(cache.attend(q[:, p:p + 1]))
            worst = max(worst, float(np.abs(got[:, 0] - want[:, p]).max()))
        print(f"{kind:13s} window={window} steps={steps} {np.dtype(dtype).name} on "
              f"{be.name}: max |decode - "
              f"attention| over all steps = {worst:.3g} (max |out| {scale:.3g}); "
              f"cache nbytes {cache.nbytes}; {time.perf_counter() - t0:.1f} s")


def memory(tokens, window):
    """Stream ``tokens`` single-token decode steps; report nbytes and tracemalloc growth."""
    import tracemalloc

    rng = np.random.default_rng(4)
    k = rng.standard_normal((HKV, 1, D)).astype(np.float32)
    q = rng.standard_normal((HQ, 1, D)).astype(np.float32)
    for kind in ("window", "sinks+window"):
        cache = sa.KVCache(_pattern(kind, window), HKV, D)
        for _ in range(10):
            cache.append(k, k)
            cache.attend(q)
        tracemalloc.start()
        base, _ = tracemalloc.get_traced_memory()
        marks = []
        for i in range(tokens):
            cache.append(k, k)
            cache.attend(q)
            if (i + 1) % (tokens // 5) == 0:
                marks.append((i + 1, tracemalloc.get_traced_memory()[0] - base, cache.nbytes))
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        print(f"{kind:13s} window={window}: after (tokens, traced growth B, nbytes) {marks}; "
              f"peak growth {peak - base} B; all-dense would hold {cache.dense_nbytes()} B")


def latency(window, reps):
    """Per-token decode latency and prefill throughput at the benchmark configuration."""
    import time

    import numba

    for kind in ("window", "sinks+window"):
        b = DecodeStep()
        b.setup(kind, window)
        best = cpu = float("inf")
        for _ in range(5):
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(reps):
                b.time_step()
            best = min(best, (time.perf_counter() - t0) / reps)
            cpu = min(cpu, (time.process_time() - c0) / reps)
        # CPU time (all threads) is the robust figure on a shared, loaded machine
        print(f"decode {kind:13s} window={window} H={HQ} (GQA {HQ}:{HKV}) D={D} float32, "
              f"{numba.get_num_threads()} threads: {best * 1e3:.3f} ms/token wall, "
              f"{cpu * 1e3:.3f} ms/token CPU")
    # the same step through the generic path (forward kernel + a one-row layout), for comparison
    from sparseattn.backends import Backend, get

    be = get("cpu")
    rng = np.random.default_rng(6)
    q = rng.standard_normal((HQ, D)).astype(np.float32)
    kv = rng.standard_normal((HKV, window, D)).astype(np.float32)
    for name, fn in (("decode kernel", lambda: be.decode(q, kv, kv, window, 0.125, ws)),
                     ("forward + layout", lambda: Backend.decode(be, q, kv, kv, window, 0.125))):
        ws = {}
        fn()
        best = cpu = float("inf")
        for _ in range(5):
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(reps):
                fn()
            best = min(best, (time.perf_counter() - t0) / reps)
            cpu = min(cpu, (time.process_time() - c0) / reps)
        print(f"attention step alone via {name}: {best * 1e3:.3f} ms wall, {cpu * 1e3:.3f} ms CPU")
    for chunk in (512, 4096):
        p = Prefill()
        p.setup(chunk, "window")
        print(f"prefill chunk={chunk} into a full window-4096 cache: "
              f"{p.track_tokens_per_second(chunk, 'window'):.0f} tokens/s")
    p = Prefill()
    rng = np.random.default_rng(5)
    kk = rng.standard_normal((HKV, 4096, D)).astype(np.float32)
    qq = rng.standard_normal((HQ, 4096, D)).astype(np.float32)
    cache = sa.KVCache(_pattern("window", 4096), HKV, D)
    cache.append(kk, kk)
    cache.attend(qq)
    best = cpu = float("inf")
    for _ in range(3):
        cache.reset()
        t0, c0 = time.perf_counter(), time.process_time()
        cache.append(kk, kk)
        cache.attend(qq)
        best = min(best, time.perf_counter() - t0)
        cpu = min(cpu, time.process_time() - c0)
    print(f"prefill of a 4096-token prompt into an empty window-4096 cache: {4096 / best:.0f} "
          f"tokens/s ({best * 1e3:.0f} ms wall, {cpu * 1e3:.0f} ms CPU)")
    t0 = time.perf_counter()
    sa.attention(qq, kk, kk, _pattern("window", 4096))
    print(f"  (sa.attention on the same prompt: {(time.perf_counter() - t0) * 1e3:.0f} ms wall)")


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["check", "memory", "latency"])
    ap.add_argument("--steps", type=int, default=10_000)
    ap.add_argument("--tokens", type=int, default=100_000)
    ap.add_argument("--window", type=int, default=None)
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--kinds", default="window,sinks+window,dense")
    ap.add_argument("--backend", default=None)
    a = ap.parse_args()
    if a.what == "check":
        check(a.steps, a.window or 256, np.dtype(a.dtype), a.kinds.split(","), a.backend)
    elif a.what == "memory":
        memory(a.tokens, a.window or 4096)
    else:
        latency(a.window or 4096, a.reps)
