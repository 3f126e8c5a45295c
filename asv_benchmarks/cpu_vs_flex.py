"""CPU targets of the performance issue, ours against torch FlexAttention in the same run.

Usage (torch is optional; without it only our figures are printed)::

    .venv/bin/python asv_benchmarks/cpu_vs_flex.py [--quick] [--threads 2] [--only NAME ...]

Each configuration is timed alternately, ours then FlexAttention's, best of ``--repeat`` runs,
so that the ratio is measured under the same machine load. Useful GFLOP/s count only allowed
pairs: ``4 * nnz * D * H / time`` (the convention of ``shared/bench``).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

import sparseattn as sa


def best_of(fns, repeat):
    """Time each function ``repeat`` times, interleaved; return the best time of each."""
    for f in fns:
        f()  # warm-up: compile / load caches
    times = [[] for _ in fns]
    for _ in range(repeat):
        for i, f in enumerate(fns):
            t = time.perf_counter()
            f()
            times[i].append(time.perf_counter() - t)
    return [min(t) for t in times]


def _flex():
    try:
        import torch
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except Exception as exc:  # noqa: BLE001 - any import failure means "no comparison"
        return None, f"no FlexAttention ({exc})"
    return (torch, create_block_mask, torch.compile(flex_attention)), ""


def flex_runner(flex, q, k, v, n, heads, kind, arg):
    """A callable running FlexAttention on the same mask as ours."""
    torch, create_block_mask, fa = flex
    tq, tk, tv = (torch.from_numpy(x) for x in (q, k, v))
    if kind == "window":
        w = arg

        def mask_mod(b, h, qi, ki):
            return (qi >= ki) & (qi - ki < w)

        bm = _block_mask(create_block_mask, mask_mod, heads, n)
    else:  # a 64-block table shared by the heads (indexing it by head trips an inductor bug)
        table = torch.from_numpy(arg)

        def mask_mod(b, h, qi, ki):
            return table[qi // 64, ki // 64]

        bm = _block_mask(create_block_mask, mask_mod, heads, n)
    return lambda: fa(tq, tk, tv, block_mask=bm)


def _block_mask(create_block_mask, mask_mod, heads, n):
    """FlexAttention's block mask; its default builder materialises n x n (34 GB at n=65536), so
    large n asks for the compiled builder."""
    if n <= 16384:
        return create_block_mask(mask_mod, 1, heads, n, n, device="cpu")
    return create_block_mask(mask_mod, 1, heads, n, n, device="cpu", _compile=True)


def configs(quick):
    rng = np.random.default_rng(0)
    n16 = 4096 if quick else 16384
    n64 = 8192 if quick else 65536
    nb = n16 // 64
    rand = rng.random((1, nb, nb)) < 0.10
    rand[:, np.arange(nb), np.arange(nb)] = True
    bigbird = sa.patterns.bigbird(64, window_blocks=3, global_blocks=2, random_blocks=3, seed=0)
    return [
        ("swa512_n16k", n16, 64, sa.patterns.sliding_window(512), "window", 512),
        ("swa512_n64k", n64, 64, sa.patterns.sliding_window(512), "window", 512),
        ("bigbird64_n16k", n16, 64, bigbird, "table", None),
        ("random10pct_n16k", n16, 64, sa.patterns.block_sparse(rand, 64), "table", None),
        ("swa512_d128_n16k", n16, 128, sa.patterns.sliding_window(512), "window", 512),
    ]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--only", nargs="*", default=None)
    p.add_argument("--no-flex", action="store_true")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    args = p.parse_args(argv)
    flex, why = (None, "--no-flex") if args.no_flex else _flex()
    if flex is None:
        print(f"FlexAttention: skipped ({why})")
    else:
        flex[0].set_num_threads(sa.backends.get("cpu") and __import__("numba").get_num_threads())
    H = args.heads
    rng = np.random.default_rng(0)
    rows = []
    fwd_times = {}
    for name, n, d, pattern, kind, arg in configs(args.quick):
        if args.only and name not in args.only:
            continue
        q, k, v = (rng.standard_normal((1, H, n, d)).astype(args.dtype) for _ in range(3))
        lay = pattern.layout(n, heads=H, block_size=(64, 64))
        fns = [lambda: sa.attention(q, k, v, pattern)]
        if flex is not None and args.dtype == "float32":
            try:
                if kind == "table":
                    arg = np.ascontiguousarray(lay.block_mask()[0])  # heads = 1 here
                fns.append(flex_runner(flex, q, k, v, n, H, kind, arg))
            except Exception as exc:  # noqa: BLE001 - e.g. out of memory building its mask
                print(f"{name}: FlexAttention failed: {type(exc).__name__}: {exc}")
        ts = best_of(fns, args.repeat)
        nnz = lay.nnz * (H // lay.heads)
        gf = 4 * nnz * d / ts[0] / 1e9
        fwd_times[name] = ts[0]
        row = {"config": name, "n": n, "d": d, "ours_ms": ts[0] * 1e3, "ours_gflops": gf}
        if len(ts) > 1:
            row.update(flex_ms=ts[1] * 1e3, flex_gflops=4 * nnz * d / ts[1] / 1e9, ratio=ts[0] / ts[1])
        rows.append(row)
        print(_fmt(row), flush=True)
    extra(args, rng, fwd_times)


def extra(args, rng, fwd_times):
    """Top-k CSR throughput, backward/forward ratio, linear growth, cold start."""
    H = args.heads
    n = 4096 if args.quick else 16384
    only = args.only
    if not only or "peak" in only:  # what the machine gives now: the shared host's speed varies
        a = rng.standard_normal((2048, 2048)).astype(np.float32)
        (t,) = best_of([lambda: a @ a], args.repeat)
        print(f"machine now: NumPy float32 2048^3 matmul {2 * 2048 ** 3 / t / 1e9:.1f} GFLOP/s "
              "(the issue quotes ~89 on a quiet machine)")
    if not only or "topk" in only:
        q, k, v = (rng.standard_normal((1, H, n, 64)).astype(args.dtype) for _ in range(3))
        lay = sa.select.topk(q[0], k[0], 64)
        out, lse = sa.attention(q, k, v, lay, return_lse=True)
        dout = rng.standard_normal(out.shape).astype(args.dtype)
        limit = sa.config.CSR_BY_HEAD_MIN_BYTES

        def all_heads_at_once(fn):  # the kernels these rows took before the one-head-at-a-time ones
            def run():
                sa.config.CSR_BY_HEAD_MIN_BYTES = 1 << 62
                try:
                    return fn()
                finally:
                    sa.config.CSR_BY_HEAD_MIN_BYTES = limit
            return run

        def forward():
            return sa.attention(q, k, v, lay)

        def backward():
            return sa.attention_backward(q, k, v, out, lse, dout, lay)

        t, t1, tb, tb1 = best_of([forward, all_heads_at_once(forward), backward,
                                  all_heads_at_once(backward)], args.repeat)
        print(f"topk64_csr_n{n}: ours {t * 1e3:.1f} ms, {4 * lay.nnz * 64 / t / 1e9:.1f} useful GFLOP/s "
              f"(one-pass kernel {t1 * 1e3:.1f} ms, ratio {t / t1:.2f}); backward {tb * 1e3:.1f} ms, "
              f"{tb / t:.2f}x the forward (all heads at once {tb1 * 1e3:.1f} ms, ratio {tb / tb1:.2f})")
    if not only or "backward" in only:
        q, k, v = (rng.standard_normal((1, H, n, 64)).astype(args.dtype) for _ in range(3))
        pat = sa.patterns.sliding_window(512)
        out, lse = sa.attention(q, k, v, pat, return_lse=True)
        dout = rng.standard_normal(out.shape).astype(args.dtype)
        tf, tb = best_of([lambda: sa.attention(q, k, v, pat, return_lse=True),
                          lambda: sa.attention_backward(q, k, v, out, lse, dout, pat)], args.repeat)
        print(f"backward_swa512_n{n}: forward {tf * 1e3:.1f} ms, backward {tb * 1e3:.1f} ms, ratio {tb / tf:.2f}")
    if "swa512_n16k" in fwd_times and "swa512_n64k" in fwd_times:
        r = fwd_times["swa512_n64k"] / fwd_times["swa512_n16k"]
        print(f"linear growth: time(4N)/time(N) = {r:.2f} (ideal 4.0)")
    if not only or "coldstart" in only:
        code = ("import time; t=time.perf_counter(); import numpy as np, sparseattn as sa; "
                "q=np.ones((1,8,1024,64),np.float32); sa.attention(q,q,q,sa.patterns.sliding_window(128)); "
                "print(time.perf_counter()-t)")
        t = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                 check=True).stdout)
        print(f"cold start (fresh process, Numba cache on disk): {t:.2f} s")
        with tempfile.TemporaryDirectory() as empty:  # nothing cached: every kernel compiles
            env = dict(os.environ, NUMBA_CACHE_DIR=empty)
            t = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                     check=True, env=env).stdout)
        print(f"cold start (fresh process, empty Numba cache): {t:.2f} s")


def _fmt(row):
    s = f"{row['config']}: ours {row['ours_ms']:.1f} ms ({row['ours_gflops']:.1f} GFLOP/s)"
    if "flex_ms" in row:
        s += f", flex {row['flex_ms']:.1f} ms ({row['flex_gflops']:.1f} GFLOP/s), ours/flex = {row['ratio']:.2f}"
    return s


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
