"""Command line: ``python -m sparseattn`` (also installed as ``sparseattn``).

Commands
--------
info
    Version, backends (and why one is not available), threads, BLAS, GPU.
demo
    The README's main job: every pattern family on a long synthetic sequence, checked against
    exact dense attention on sampled rows; a table and a picture.
bench
    Pattern x N x backend sweeps: a table, CSV/JSON, and a log-log plot of time against N with
    the fitted slopes (dense O(n^2) against each sparse pattern).
show
    Draw one pattern's mask (element and block views) to a PNG.

Every command takes ``--help``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import sys
import time

import numpy as np

from . import _families

__all__ = ["main", "build_parser"]

_DEMO_DEFAULT = ["sliding_window", "dilated", "strided", "fixed", "longformer", "bigbird",
                 "block_sparse", "sinks"]
_BENCH_DEFAULT = ["sliding_window", "strided", "bigbird", "block_sparse"]
#: pattern options for which 0 is a meaningful value (none, or a seed)
_ZERO_OK = {"span", "sinks", "seed", "global_tokens", "random_blocks", "global_blocks"}


class CLIError(Exception):
    """A usage problem the command reports through its parser (exit status 2)."""


# ----------------------------------------------------------------------------- helpers


def _progress(iterable=None, **kwargs):
    """tqdm on stderr when installed, else the plain iterable (the bar is a convenience)."""
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency; keep working without it
        return _NoBar(iterable)
    kwargs.setdefault("file", sys.stderr)
    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("leave", False)
    return tqdm(iterable, **kwargs)


class _NoBar:
    def __init__(self, iterable):
        self._it = iterable

    def __iter__(self):
        return iter(self._it)

    def set_postfix_str(self, *_a, **_k):
        pass

    def update(self, *_a):
        pass

    def close(self):
        pass


def _add_pattern_options(p, what):
    g = p.add_argument_group(
        "pattern options", f"{what}; each has a default (see `sparseattn show --help`)")
    for name, (typ, help_) in _families.OPTIONS.items():
        flag = "--" + name.replace("_", "-")
        if typ is bool:
            g.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None,
                           help=help_)
        else:
            g.add_argument(flag, dest=name, type=_positive(typ, allow_zero=name in _ZERO_OK),
                           default=None, metavar=typ.__name__.upper(), help=help_)


def _positive(typ, allow_zero=False):
    def conv(text):
        try:
            val = typ(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {typ.__name__} value: {text!r}") from None
        if not math.isfinite(val) or val < 0 or (val == 0 and not allow_zero):
            raise argparse.ArgumentTypeError(
                f"must be {'>= 0' if allow_zero else '> 0'}, got {text}")
        return val

    conv.__name__ = typ.__name__
    return conv


def _given_options(args):
    return {k: getattr(args, k) for k in _families.OPTIONS if getattr(args, k, None) is not None}


def _options_for(family, given):
    return {k: v for k, v in given.items() if k in _families.FAMILIES[family].defaults}


def _check_options_used(families, given):
    unused = [k for k in given if not any(k in _families.FAMILIES[f].defaults for f in families)]
    if unused:
        flags = ", ".join("--" + k.replace("_", "-") for k in unused)
        raise CLIError(f"{flags} does not apply to the pattern(s) {', '.join(families)}")


def _build_pattern(family, n, options):
    try:
        return _families.build(family, n, **options)
    except (TypeError, ValueError) as exc:
        raise CLIError(f"{family}: {exc}") from None


def _check_families(names, default):
    names = list(names or default)
    bad = [f for f in names if f not in _families.FAMILIES]
    if bad:
        raise CLIError(f"unknown pattern {', '.join(bad)}; choose from {', '.join(_families.FAMILIES)}")
    return names


def _pick_backend(name):
    import sparseattn as sa

    if name is None:
        name = "cuda" if "cuda" in sa.backends.available() else "cpu"
    known = sorted(sa.backends._REGISTRY)
    if name not in known:
        raise CLIError(f"unknown backend {name!r}; choose one of {', '.join(known)}")
    why = sa.backends.why_unavailable(name)
    if why:
        raise CLIError(f"backend {name!r} is not available here: {why}")
    return sa.backends.get(name)


def _sync(backend):
    if backend.name == "cuda":  # pragma: no cover - needs a GPU
        import cupy

        cupy.cuda.Device().synchronize()


def _best_time(fn, repeat, sync=lambda: None):
    best = math.inf
    out = None
    for _ in range(max(1, repeat)):
        t0 = time.perf_counter()
        out = fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best, out


def _dense_rows(q, k, v, rows, scale):
    """Exact dense attention of some query rows against all keys (float32 BLAS), ``(H, len(rows), Dv)``."""
    s = np.matmul(q[:, rows], k.transpose(0, 2, 1))
    s *= scale
    s -= s.max(axis=-1, keepdims=True)
    np.exp(s, out=s)
    s /= s.sum(axis=-1, keepdims=True)
    return np.matmul(s, v)


def _dense_time(q, k, v, scale, mode, chunk=1024):
    """Time of full dense NumPy attention: measured over query chunks or estimated from one chunk.

    Returns (seconds, description).
    """
    n = q.shape[1]
    chunk = min(chunk, n)
    if mode == "measure":
        t0 = time.perf_counter()
        for lo in range(0, n, chunk):
            _dense_rows(q, k, v, slice(lo, lo + chunk), scale)
        return time.perf_counter() - t0, f"measured in {chunk}-query chunks"
    _dense_rows(q, k, v, slice(0, chunk), scale)  # warm the BLAS
    t, _ = _best_time(lambda: _dense_rows(q, k, v, slice(0, chunk), scale), 2)
    return t * n / chunk, f"estimated from a timed {chunk}-query chunk (x{n / chunk:g})"


def _exact_rows(q, k, v, mask_of_head, rows, scale):
    """Dense masked attention in float64 for the sampled rows only: ``(H, len(rows), Dv)``."""
    heads = q.shape[0]
    out = np.zeros((heads, len(rows), v.shape[2]))
    for h in range(heads):  # loop over heads (few), never over tokens
        mask = mask_of_head(h)
        s = (q[h, rows].astype(np.float64) @ k[h].astype(np.float64).T) * scale
        s = np.where(mask, s, -np.inf)
        has = mask.any(axis=1)
        m = np.where(has, s.max(axis=1, initial=-np.inf), 0.0)
        p = np.exp(s - m[:, None])
        den = p.sum(axis=1)
        out[h] = np.where(has[:, None], (p @ v[h].astype(np.float64)) / np.where(has, den, 1.0)[:, None], 0.0)
    return out


def _fmt_time(s):
    if s is None or not math.isfinite(s):
        return "-"
    return f"{s * 1e3:.1f} ms" if s < 10 else f"{s:.1f} s"


def _write_records(records, path_csv, path_json, meta):
    cols = list(dict.fromkeys(k for r in records for k in r))
    with open(path_csv, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(records)
    with open(path_json, "w") as f:
        json.dump({"meta": meta, "records": records}, f, indent=1, default=float)


# ----------------------------------------------------------------------------- info


def cmd_info(args):
    import numba
    import scipy

    import sparseattn as sa

    print(f"sparseattn {sa.__version__}")
    print(f"python {platform.python_version()} on {platform.platform()}")
    print(f"numpy {np.__version__}, numba {numba.__version__}, scipy {scipy.__version__}")
    print("backends:")
    for name in sorted(sa.backends._REGISTRY):
        why = sa.backends.why_unavailable(name)
        print(f"  {name:<10} {'available' if not why else 'unavailable: ' + why}")
    env = os.environ.get("SPARSEATTN_BACKEND")
    print(f"default backend: {env or 'cpu (cuda for GPU arrays)'}"
          + (" (from SPARSEATTN_BACKEND)" if env else ""))
    print(f"numba threads: {numba.get_num_threads()} of {numba.config.NUMBA_NUM_THREADS} "
          f"(threading layer: {_threading_layer()}); CPU cores: {os.cpu_count()}")
    try:
        from threadpoolctl import threadpool_info

        pools = threadpool_info()
    except Exception as exc:  # pragma: no cover - threadpoolctl is a dependency
        pools, why = [], str(exc)
    else:
        why = "none loaded"
    if not pools:
        print(f"BLAS: {why}")
    for pool in pools:
        print(f"BLAS/OpenMP: {pool.get('internal_api')} {pool.get('version') or '(version unknown)'} "
              f"({pool.get('user_api')}, {pool.get('num_threads')} threads"
              + (f", {pool['architecture']}" if pool.get("architecture") else "") + ")")
    print(f"GPU: {_gpu_name()}")
    return 0


def _threading_layer():
    import numba

    try:
        return numba.threading_layer()
    except ValueError:  # no parallel region has run yet
        return f"not started, configured {numba.config.THREADING_LAYER}"


def _gpu_name():
    try:
        import cupy

        props = cupy.cuda.runtime.getDeviceProperties(0)
        name = props["name"]
        return name.decode() if isinstance(name, bytes) else str(name)
    except Exception:
        pass
    import shutil
    import subprocess

    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            res = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10)
            if res.returncode == 0 and res.stdout.strip():
                return res.stdout.strip().splitlines()[0] + " (CuPy not installed: pip install 'sparseattn[cuda12]')"
        except Exception:  # pragma: no cover
            pass
    return "none found"


# ----------------------------------------------------------------------------- demo


def cmd_demo(args):
    import sparseattn as sa
    from sparseattn.analysis import format_table, mask_rows
    from sparseattn.api import resolve_layout

    if args.n < 16:
        raise CLIError(f"--n must be >= 16, got {args.n}")
    families = _check_families(args.patterns, _DEMO_DEFAULT)
    given = _given_options(args)
    _check_options_used(families, given)
    be = _pick_backend(args.backend)
    n, heads, dim = args.n, args.heads, args.dim
    dtype = np.dtype(args.dtype)
    rng = np.random.default_rng(args.data_seed)
    q, k, v = (rng.standard_normal((heads, n, dim), dtype=np.float64).astype(dtype) for _ in range(3))
    scale = 1.0 / math.sqrt(dim)
    n_rows = min(args.rows, n)
    rows = np.unique(np.concatenate([[0, n - 1], rng.choice(n, n_rows, replace=False)]))[:max(n_rows, 2)]
    import numba

    print(f"sparseattn {sa.__version__} demo: N={n}, heads={heads}, head dim={dim}, {dtype.name}, "
          f"backend {be.name} ({numba.get_num_threads()} threads); "
          f"checking {len(rows)} sampled rows against exact dense attention", flush=True)

    t_dense, how = _dense_time(q, k, v, scale, args.dense)
    print(f"dense attention (NumPy on the CPU, all {n}x{n} pairs per head): {_fmt_time(t_dense)}, {how}",
          flush=True)

    qb, kb, vb = (be.asarray(x) for x in (q, k, v))
    tol = 2e-4 if dtype == np.float32 else 1e-9
    table, built, failures = [], {}, []
    bar = _progress(families, desc="demo", unit="pattern")
    for fam in bar:
        bar.set_postfix_str(fam)
        pattern = _build_pattern(fam, n, _options_for(fam, given))
        t0 = time.perf_counter()
        lay = resolve_layout(pattern, n, n, heads, be.block_size)  # cached: the call reuses it
        t_build = time.perf_counter() - t0
        built[fam] = lay
        sa.attention(qb, kb, vb, pattern, backend=be.name)  # compile (first call) and warm up
        t, out = _best_time(lambda: sa.attention(qb, kb, vb, pattern, backend=be.name), args.repeat,
                            lambda: _sync(be))
        out = be.to_numpy(out)
        exact = _exact_rows(q, k, v, lambda h: mask_rows(lay, rows, h), rows, scale)
        err = float(np.max(np.abs(out[:, rows].astype(np.float64) - exact))) if rows.size else 0.0
        if not err <= tol:
            failures.append(fam)
        nnz = lay.nnz * (heads // lay.heads)
        table.append({
            "pattern": fam,
            "keys/query": nnz / (heads * n),
            "nnz": nnz,
            "density": lay.density,
            "build": _fmt_time(t_build),
            "time": _fmt_time(t),
            "vs dense": t_dense / t,
            "GFLOP/s": 4 * nnz * dim / t / 1e9,
            "max error": err,
        })
    bar.close()
    print(format_table(table, formats={"keys/query": "{:.1f}", "density": "{:.4f}", "vs dense": "{:.1f}x",
                                       "GFLOP/s": "{:.1f}", "max error": "{:.1e}"}))
    print(f"time: {'best of ' + str(args.repeat) if args.repeat > 1 else 'one'} forward pass"
          f"{'es' if args.repeat > 1 else ''} after a warm-up call; vs dense: dense NumPy "
          f"time ({how}) / time; GFLOP/s: useful, 4*nnz*D/time; max error: over {len(rows)} sampled "
          f"rows x {heads} heads, against float64 dense attention on those rows (tolerance {tol:g})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"n": n, "heads": heads, "dim": dim, "dtype": dtype.name, "backend": be.name,
                       "dense_s": t_dense, "dense_how": how, "rows": table}, f, indent=1, default=str)
    if args.output and args.output != "-":
        _demo_picture(built, n, args.output)
    if failures:
        print(f"FAILED: {', '.join(failures)} differ from exact attention by more than {tol:g}",
              file=sys.stderr)
        return 1
    return 0


def _demo_picture(layouts, n, path):
    try:
        from sparseattn import plot
        fig = plot.plot_patterns(layouts, n, ncols=4, resolution=512, zoom=min(n, 1024))
    except ImportError as exc:
        print(f"picture skipped: {exc}", file=sys.stderr)
        return
    fig.suptitle(f"sparseattn patterns at N={n}: whole masks, then the first {min(n, 1024)} positions "
                 f"(shade: fraction of allowed pairs per pixel)", fontsize=10)
    plot.savefig(fig, path)
    print(f"picture of the patterns: {path}")


# ----------------------------------------------------------------------------- bench


def cmd_bench(args):
    import sparseattn as sa
    from sparseattn.analysis import format_table, loglog_slope
    from sparseattn.api import resolve_layout

    families = _check_families(args.patterns, _BENCH_DEFAULT)
    given = _given_options(args)
    _check_options_used(families, given)
    ns = sorted(set(args.n))
    if min(ns) < 16:
        raise CLIError(f"--n values must be >= 16, got {min(ns)}")
    backends = [_pick_backend(b) for b in (args.backends or [None])]
    flex = None
    if args.vs == "flex":
        flex = _flex_runner()
        if isinstance(flex, str):
            print(f"flex: skipped ({flex})", file=sys.stderr)
            flex = None
    heads, dim = args.heads, args.dim
    dtype = np.dtype(args.dtype)
    scale = 1.0 / math.sqrt(dim)
    rng = np.random.default_rng(args.data_seed)
    jobs = [(n, "dense", None) for n in ns if n <= args.dense_max]
    jobs += [(n, fam, be) for n in ns for fam in families for be in backends]
    if flex:
        jobs += [(n, fam, "flex") for n in ns for fam in families]
    records = []
    data = {}
    bar = _progress(jobs, desc="bench", unit="run")
    for n, fam, be in bar:
        if n not in data:
            data = {n: tuple(rng.standard_normal((heads, n, dim), dtype=np.float64).astype(dtype)
                             for _ in range(3))}
        q, k, v = data[n]
        bar.set_postfix_str(f"{fam} N={n} {getattr(be, 'name', be or 'numpy')}")
        rec = {"pattern": fam, "n": n, "heads": heads, "dim": dim, "dtype": dtype.name}
        if fam == "dense":
            t, _ = _best_time(lambda: [_dense_rows(q, k, v, slice(lo, lo + 1024), scale)
                                       for lo in range(0, n, 1024)], args.repeat)
            rec.update(backend="numpy", nnz=heads * n * n, time_s=t)
        else:
            pattern = _build_pattern(fam, n, _options_for(fam, given))
            if be == "flex":
                lay = resolve_layout(pattern, n, n, heads, None)
                t = flex(q, k, v, lay, args.repeat)
                rec.update(backend="flex")
            else:
                lay = resolve_layout(pattern, n, n, heads, be.block_size)
                qb, kb, vb = (be.asarray(x) for x in (q, k, v))
                sa.attention(qb, kb, vb, pattern, backend=be.name)
                t, _ = _best_time(lambda: sa.attention(qb, kb, vb, pattern, backend=be.name),
                                  args.repeat, lambda: _sync(be))
                rec.update(backend=be.name)
            rec.update(nnz=lay.nnz * (heads // lay.heads), time_s=t)
        rec["density"] = rec["nnz"] / (heads * n * n)
        rec["gflops"] = 4 * rec["nnz"] * dim / rec["time_s"] / 1e9
        records.append(rec)
    bar.close()
    for r in records:
        r["series"] = r["pattern"] if r["backend"] in ("numpy",) else f"{r['pattern']} [{r['backend']}]"
    print(format_table(records, ["series", "n", "nnz", "density", "time_s", "gflops"],
                       formats={"time_s": _fmt_time, "gflops": "{:.1f}", "density": "{:.4f}"}))
    slopes = {}
    for s in dict.fromkeys(r["series"] for r in records):
        pts = [(r["n"], r["time_s"]) for r in records if r["series"] == s]
        if len(pts) >= 2:
            slopes[s] = loglog_slope(*zip(*pts))
    if slopes:
        print("fitted slope of log(time) against log(N) (dense attention: 2, fixed keys per query: 1):")
        for s, v in slopes.items():
            print(f"  {s:<32} {v:.2f}")
    os.makedirs(args.output, exist_ok=True)
    meta = {"heads": heads, "dim": dim, "dtype": dtype.name, "repeat": args.repeat,
            "options": given, "slopes": slopes, "threads": _threads()}
    csv_path = os.path.join(args.output, "bench.csv")
    json_path = os.path.join(args.output, "bench.json")
    _write_records(records, csv_path, json_path, meta)
    print(f"records: {csv_path}, {json_path}")
    if not args.no_plot:
        try:
            from sparseattn import plot

            ax = plot.plot_scaling(records, by="series")
            ax.set_title(f"forward time, H={heads}, D={dim}, {dtype.name}", fontsize=10)
            path = plot.savefig(ax, os.path.join(args.output, "bench.png"))
            print(f"plot: {path}")
        except ImportError as exc:
            print(f"plot skipped: {exc}", file=sys.stderr)
    return 0


def _threads():
    import numba

    return numba.get_num_threads()


def _flex_runner():
    """A function timing torch FlexAttention (compiled, CPU) on a layout, or why it cannot run."""
    try:
        import torch
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError as exc:
        return f"torch with FlexAttention is not installed ({exc}); pip install torch to compare"
    from sparseattn.compat.flex import block_mask

    compiled = torch.compile(flex_attention)

    def run(q, k, v, layout, repeat):
        # exact for every pattern, without an n x n table: see sparseattn.compat.flex
        bm = block_mask(layout, heads=q.shape[0])
        tq, tk, tv = (torch.from_numpy(np.ascontiguousarray(x))[None] for x in (q, k, v))
        compiled(tq, tk, tv, block_mask=bm)
        t, _ = _best_time(lambda: compiled(tq, tk, tv, block_mask=bm), repeat)
        return t

    return run


# ----------------------------------------------------------------------------- show


def cmd_show(args):
    from sparseattn.analysis import cost

    given = _given_options(args)
    fam = args.pattern
    unused = [k for k in given if k not in _families.FAMILIES[fam].defaults]
    if unused:
        flags = ", ".join("--" + k.replace("_", "-") for k in unused)
        takes = ", ".join("--" + k.replace("_", "-") for k in _families.FAMILIES[fam].defaults)
        raise CLIError(f"{flags} does not apply to {fam}; its options: {takes}")
    if args.resolution < 8:
        raise CLIError(f"--resolution must be >= 8, got {args.resolution}")
    pattern = _build_pattern(fam, args.n, given)
    from sparseattn import plot

    try:
        plt = plot._pyplot()
    except ImportError as exc:
        print(f"sparseattn show: error: {exc}", file=sys.stderr)
        return 1
    try:
        c = cost(pattern, args.n, block_size=tuple(args.block_size))
    except (TypeError, ValueError) as exc:
        raise CLIError(f"{fam}: {exc}") from None
    views = ["element", "block"] if args.view == "both" else [args.view]
    fig, axes = plt.subplots(1, len(views), figsize=(4.2 * len(views), 4.4), constrained_layout=True,
                             squeeze=False)
    for view, ax in zip(views, axes[0]):
        plot.plot_mask(pattern, args.n, view=view, ax=ax, resolution=args.resolution,
                       block_size=tuple(args.block_size), title=f"{view} view")
    fig.suptitle(f"{pattern!r}\nn={args.n}, {c['keys_per_query']:.1f} keys/query, "
                 f"density {c['density']:.4g}", fontsize=9)
    out = args.output or f"sparseattn-{fam}.png"
    plot.savefig(fig, out)
    print(f"{pattern!r}: n={args.n}, nnz={c['nnz']:,}, density={c['density']:.4g}, "
          f"{c['blocks']:,} blocks of {args.block_size[0]}x{args.block_size[1]} -> {out}")
    return 0


# ----------------------------------------------------------------------------- parser


def build_parser():
    """The argument parser of ``python -m sparseattn``."""
    import sparseattn as sa

    p = argparse.ArgumentParser(
        prog="sparseattn", description="Exact sparse attention for NumPy: demo, benchmarks, pictures.")
    p.add_argument("--version", action="version", version=f"sparseattn {sa.__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    s = sub.add_parser("info", help="version, backends, threads, BLAS, GPU",
                       description="Print the version, the backends (and why one is unavailable), "
                                   "Numba threads, BLAS libraries and the GPU.")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("demo", help="every pattern family on a long sequence, checked, with a table and picture",
                       description="Run every pattern family on a synthetic sequence with the best "
                                   "backend, check sampled rows against exact dense attention, print a "
                                   "table and write a picture of the patterns.")
    s.add_argument("--n", type=_positive(int), default=16384, help="sequence length (default 16384)")
    s.add_argument("--heads", type=_positive(int), default=8, help="attention heads (default 8)")
    s.add_argument("--dim", type=_positive(int), default=64, help="head dimension (default 64)")
    s.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    s.add_argument("--rows", type=_positive(int), default=64,
                   help="query rows checked against exact dense attention (default 64)")
    s.add_argument("--repeat", type=_positive(int), default=1,
                   help="timed runs per pattern after the warm-up call, best kept (default 1)")
    s.add_argument("--dense", choices=["estimate", "measure"], default="estimate",
                   help="dense NumPy baseline: estimated from a timed 1024-query chunk (default) or "
                        "measured over all query chunks")
    s.add_argument("--backend", default=None, help="cpu, cuda or reference (default: cuda if available, else cpu)")
    s.add_argument("--patterns", nargs="+", metavar="PATTERN",
                   help=f"families to run (default: {' '.join(_DEMO_DEFAULT)})")
    s.add_argument("--data-seed", dest="data_seed", type=_positive(int, True), default=0,
                   help="seed of the random q, k, v (default 0)")
    s.add_argument("-o", "--output", default="sparseattn-demo.png",
                   help="picture of the patterns (default sparseattn-demo.png; '-' for none)")
    s.add_argument("--json", default=None, help="also write the table as JSON to this path")
    _add_pattern_options(s, "applied to every family that takes them")
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser("bench", help="pattern x N x backend sweep: table, CSV/JSON, log-log plot",
                       description="Time the forward pass over patterns, sequence lengths and "
                                   "backends, against dense NumPy attention; print a table and the "
                                   "fitted log-log slopes, write CSV, JSON and a plot.")
    s.add_argument("--n", type=_positive(int), nargs="+", default=[1024, 2048, 4096, 8192],
                   help="sequence lengths (default 1024 2048 4096 8192)")
    s.add_argument("--patterns", nargs="+", metavar="PATTERN",
                   help=f"families (default: {' '.join(_BENCH_DEFAULT)})")
    s.add_argument("--backends", nargs="+", metavar="BACKEND", help="backends (default: the best one)")
    s.add_argument("--heads", type=_positive(int), default=8)
    s.add_argument("--dim", type=_positive(int), default=64)
    s.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    s.add_argument("--repeat", type=_positive(int), default=3, help="timed runs, best kept (default 3)")
    s.add_argument("--dense-max", type=_positive(int, True), default=8192,
                   help="largest N for the dense NumPy baseline (default 8192; 0: none)")
    s.add_argument("--vs", choices=["flex"], default=None,
                   help="also time torch FlexAttention (compiled, CPU); skipped if torch is missing")
    s.add_argument("-o", "--output", default="bench-out", help="output folder (default bench-out)")
    s.add_argument("--no-plot", action="store_true", help="do not draw bench.png")
    s.add_argument("--data-seed", dest="data_seed", type=_positive(int, True), default=0,
                   help="seed of the random q, k, v (default 0)")
    _add_pattern_options(s, "applied to every family that takes them")
    s.set_defaults(func=cmd_bench)

    fam_help = "; ".join(
        f"{f.name} ({', '.join(f'{k}={v}' for k, v in f.defaults.items())})" for f in _families.FAMILIES.values())
    s = sub.add_parser("show", help="draw one pattern's mask to a PNG",
                       description="Draw a pattern's mask: the element view (allowed pairs; a "
                                   "fraction per pixel for large n) and the block view (tiles the "
                                   "kernel visits, full or partial). Families and defaults: " + fam_help)
    s.add_argument("pattern", choices=list(_families.FAMILIES), metavar="PATTERN",
                   help="one of " + ", ".join(_families.FAMILIES))
    s.add_argument("--n", type=_positive(int), default=2048, help="sequence length (default 2048)")
    s.add_argument("--view", choices=["element", "block", "both"], default="both")
    s.add_argument("--block-size", type=_positive(int), nargs=2, default=[64, 64], metavar=("BQ", "BK"),
                   help="block size of the block view (default 64 64)")
    s.add_argument("--resolution", type=_positive(int), default=512, help="largest image side in pixels")
    s.add_argument("-o", "--output", default=None, help="PNG path (default sparseattn-PATTERN.png)")
    _add_pattern_options(s, "only those the pattern takes")
    s.set_defaults(func=cmd_show)
    return p


def main(argv=None):
    """Entry point of ``python -m sparseattn`` and the ``sparseattn`` script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    sub = parser._subparsers._group_actions[0].choices[args.command]
    try:
        return args.func(args)
    except CLIError as exc:
        sub.error(str(exc))
    except KeyboardInterrupt:  # pragma: no cover
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
