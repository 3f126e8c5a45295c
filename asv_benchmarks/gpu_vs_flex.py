"""sparseattn's cuda backend against torch FlexAttention on the same masks, in one run, on one GPU.

Run on a machine with a CUDA GPU, CuPy, numba-cuda and torch (>= 2.5, FlexAttention):

    python asv_benchmarks/gpu_vs_flex.py [--quick] [--no-flex-fp32] [--big] [--no-accuracy]

Configurations (B=1, H=16, D=128, as in ../shared/device/README.md):

* causal sliding window W=4096 at N=65536 (layout from ``sa.patterns.sliding_window``);
* a random 10% of 128x128 blocks (plus the diagonal) at N=32768, per head;
* ``--big``: building the sliding-window layout at N=1,048,576 and one float16 forward there;
* first (unless ``--no-accuracy``): the max error of every precision (float32 exact, TF32, bfloat16,
  float16) against the float64 kernel on the same (rounded) inputs, causal W=4096 at N=16384.

Ours in every precision on each mask: float16, bfloat16 (tensor cores; the kernel straight and
``sa.attention`` on torch bfloat16 tensors), float32 exact (CUDA cores) and TF32 (tensor cores,
``sa.use_tf32()``), float64.

Useful TFLOP/s count only allowed pairs: ``4 * nnz * D`` per head (``layout.flops``).
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def _events_time(fn, reps, warm):
    import cupy as cp

    for _ in range(warm):
        fn()
    cp.cuda.runtime.deviceSynchronize()
    start, end = cp.cuda.Event(), cp.cuda.Event()
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return cp.cuda.get_elapsed_time(start, end) / reps / 1e3


def _torch_time(fn, reps, warm):
    import torch

    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(reps):
        fn()
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e) / reps / 1e3


def _line(name, seconds, flops):
    print(f"  {name:44s} {seconds * 1e3:9.2f} ms  {flops / seconds / 1e12:7.1f} useful TFLOP/s", flush=True)
    return seconds


def flex_block_mask(lay, mask_mod):
    """FlexAttention's BlockMask with exactly the blocks of a 128x128 block-CSR layout: full blocks
    as its "full" blocks (no mask_mod call), partial ones as masked blocks (mask_mod decides)."""
    import torch
    from torch.nn.attention.flex_attention import BlockMask

    nbq, nbk = lay.grid
    rows = np.repeat(np.arange(lay.heads * nbq), np.diff(lay.indptr))
    out = []
    for sel in (lay.mask_index >= 0, lay.mask_index < 0):
        r, c = rows[sel], lay.indices[sel]
        counts = np.bincount(r, minlength=lay.heads * nbq)
        width = nbk  # Flex transposes through a dense (rows, width) grid: columns must fit
        start = np.zeros_like(counts)
        start[1:] = np.cumsum(counts)[:-1]
        idx = np.zeros((lay.heads * nbq, width), np.int32)
        idx[r, np.arange(r.size) - start[r]] = c
        out.append(torch.from_numpy(counts.astype(np.int32).reshape(1, lay.heads, nbq)).cuda())
        out.append(torch.from_numpy(idx.reshape(1, lay.heads, nbq, width)).cuda())
    return BlockMask.from_kv_blocks(out[0], out[1], out[2], out[3], BLOCK_SIZE=128, mask_mod=mask_mod)


def run(args):
    import cupy as cp
    import torch
    from torch.nn.attention.flex_attention import flex_attention

    import sparseattn as sa
    from sparseattn import _bfloat16
    from sparseattn.backends.cuda import tensorcore

    torch.backends.cuda.matmul.allow_tf32 = False
    flex = torch.compile(flex_attention)
    B, H, D = 1, 16, 128
    scale = float(1.0 / np.sqrt(D))  # a Python float: dynamo would lift a NumPy scalar into a tensor
    reps = 3 if args.quick else 10
    print(f"GPU: {cp.cuda.runtime.getDeviceProperties(0)['name'].decode()}  torch {torch.__version__}  "
          f"cupy {cp.__version__}", flush=True)

    def ours(q, k, v, lay, name, flops, reps=reps, warm=2, **tc):
        if tc:  # the tensor-core kernel straight (float32 operands: TF32)
            from sparseattn.backends.cuda._device import device_layout

            dev = device_layout(lay)
            out = cp.empty(q.shape, q.dtype)
            lse = cp.empty(q.shape[:3], cp.float32)
            fn = lambda: tensorcore.block_forward(q, k, v, dev, lay.heads, lay.block_size,  # noqa: E731
                                                  scale, out, lse, **tc)
        else:
            fn = lambda: sa.attention(q, k, v, lay, scale=scale)  # noqa: E731
        return _line(name, _events_time(fn, reps, warm), flops)

    def both(N, lays, mask_mod, flops, label):
        """Ours (fp16 tensor cores, fp32) and FlexAttention (bf16, fp16, fp32) on one mask."""
        torch.manual_seed(0)
        tq, tk, tv = (torch.randn(B, H, N, D, device="cuda", dtype=torch.float16) for _ in range(3))
        q16, k16, v16 = (cp.from_dlpack(x) for x in (tq, tk, tv))
        lay128 = next(lay for lay in lays.values() if lay.block_size == (128, 128))
        t0 = time.perf_counter()
        bm = flex_block_mask(lay128, mask_mod)
        torch.cuda.synchronize()
        print(f"  flex BlockMask from our 128-block layout: {time.perf_counter() - t0:.2f} s", flush=True)
        res = {}
        for dt in (torch.bfloat16, torch.float16):
            a, b, c = (x.to(dt) for x in (tq, tk, tv))
            res[f"flex {dt}"] = _line(f"FlexAttention {str(dt)[6:]}", _torch_time(
                lambda: flex(a, b, c, block_mask=bm, scale=scale), reps, 3), flops)
        flex_out = flex(tq, tk, tv, block_mask=bm, scale=scale)
        for name, lay in lays.items():
            variants = [dict()] if args.quick else [dict(), dict(warps=4), dict(warps=4, qsmem=True, minb=2),
                                                    dict(warps=4, qsmem=True, minb=3)]
            for tc in variants:
                if tc.get("warps") == 8 and lay.block_size[0] % 128:
                    continue
                tag = "auto" if not tc else ",".join(f"{k}={v}" for k, v in tc.items())
                res[f"ours f16 {name} {tag}"] = ours(q16, k16, v16, lay, f"ours float16 tc [{name}] {tag}",
                                                     flops, **(tc or dict(warps=None)))
            out16 = sa.attention(q16, k16, v16, lay, scale=scale)
            diff = float(cp.abs(out16.astype(cp.float32) - cp.from_dlpack(flex_out).astype(cp.float32)).max())
            print(f"  max |ours f16 - flex f16| [{name}] = {diff:.2e}", flush=True)
        # bfloat16 on tensor cores: the kernel straight (where CuPy holds bfloat16) and through
        # sa.attention on torch bfloat16 tensors (viewed as int16 on the way in and out)
        tb = [x.to(torch.bfloat16) for x in (tq, tk, tv)]
        flex_bf = flex(*tb, block_mask=bm, scale=scale)
        for name, lay in lays.items():
            if _bfloat16.cupy_has_bfloat16():
                qb, kb, vb = (cp.from_dlpack(x.view(torch.int16)).view(_bfloat16.BFLOAT16) for x in tb)
                res[f"ours bf16 {name}"] = ours(qb, kb, vb, lay, f"ours bfloat16 tc [{name}]", flops,
                                                warps=None)
            res[f"ours bf16 api {name}"] = _line(f"ours bfloat16 sa.attention(torch) [{name}]", _events_time(
                lambda: sa.attention(*tb, lay, scale=scale), reps, 2), flops)
            diff = float((sa.attention(*tb, lay, scale=scale).float() - flex_bf.float()).abs().max())
            print(f"  max |ours bf16 - flex bf16| [{name}] = {diff:.2e}", flush=True)
        del flex_bf
        q32, k32, v32 = (x.astype(cp.float32) for x in (q16, k16, v16))
        for name, lay in lays.items():
            res[f"ours f32 {name}"] = ours(q32, k32, v32, lay, f"ours float32 (CuPy simt) [{name}]", flops,
                                           reps=max(1, reps // 3), warm=1)
        for name, lay in lays.items():
            res[f"ours tf32 {name}"] = ours(q32, k32, v32, lay, f"ours tf32 tc [{name}]", flops, warps=None)
            with sa.use_tf32():
                res[f"ours tf32 api {name}"] = ours(q32, k32, v32, lay, f"ours tf32 sa.attention [{name}]", flops)
                tf = sa.attention(q32, k32, v32, lay, scale=scale)
            diff = float(cp.abs(tf - sa.attention(q32, k32, v32, lay, scale=scale)).max())
            print(f"  max |ours tf32 - ours f32| [{name}] = {diff:.2e}", flush=True)
            del tf
        lay = next(iter(lays.values()))
        q64, k64, v64 = (x.astype(cp.float64) for x in (q16, k16, v16))
        ours(q64, k64, v64, lay, f"ours float64 (numba) [{lay.block_size}]", flops, reps=1, warm=1)
        del q64, k64, v64
        if not args.quick:  # tile geometries of the Numba float32 kernel, straight to the kernel
            from sparseattn.backends.cuda import forward as F
            from sparseattn.backends.cuda._device import device_layout, numba_array

            lay = next(iter(lays.values()))
            dev = {k_: numba_array(a_) for k_, a_ in device_layout(lay).items()}
            o32 = cp.empty_like(q32)
            l32 = cp.empty(q32.shape[:3], cp.float32)
            nb = [numba_array(x) for x in (q32, k32, v32, o32, l32)]
            for geom in args.geometries:
                g = F.Geometry(*geom)
                fn = lambda: F.block_forward(nb[0], nb[1], nb[2], dev["indptr"], dev["indices"],  # noqa: E731
                                             dev["mask_index"], dev["masks"], lay.heads, lay.block_size,
                                             scale, nb[3], nb[4], geometry=g)
                res[f"ours f32 geom {geom}"] = _line(f"ours float32 numba {geom} [{lay.block_size}]",
                                                     _events_time(fn, 2, 1), flops)
        if not args.no_flex_fp32:
            a, b, c = (x.to(torch.float32) for x in (tq, tk, tv))
            res["flex f32"] = _line("FlexAttention float32 (no TF32)", _torch_time(
                lambda: flex(a, b, c, block_mask=bm, scale=scale), 1, 1), flops)
        def best(prefix):
            return min(v for k, v in res.items() if k.startswith(prefix))

        fb = res["flex torch.bfloat16"]
        print(f"  => vs flex bf16 throughput: ours f16 best {fb / best('ours f16'):.2f}x, ours bf16 best "
              f"{fb / best('ours bf16'):.2f}x, ours tf32 best {fb / best('ours tf32'):.2f}x; useful TFLOP/s: "
              f"f32 {flops / best('ours f32') / 1e12:.1f}, tf32 {flops / best('ours tf32') / 1e12:.1f}, "
              f"bf16 {flops / best('ours bf16') / 1e12:.1f} [{label}]", flush=True)
        torch.cuda.empty_cache()
        cp.get_default_memory_pool().free_all_blocks()

    if not args.no_accuracy:
        accuracy(sa, cp, torch, H, D)

    # ---- causal sliding window
    N, W = 65536, 4096
    print(f"causal sliding window W={W}, N={N}, B={B}, H={H}, D={D}", flush=True)
    lays = {}
    for bs in (64, 128):
        t0 = time.perf_counter()
        lays[f"{bs}-blocks"] = sa.patterns.sliding_window(W).layout(N, block_size=(bs, bs))
        print(f"  layout {bs}x{bs}: {time.perf_counter() - t0:.3f} s, {lays[f'{bs}-blocks']}", flush=True)
    nnz = N * W - W * (W - 1) // 2
    assert lays["64-blocks"].nnz == nnz
    both(N, lays, lambda b, h, qi, ki: (qi >= ki) & (qi - ki < W), 4 * B * H * nnz * D, "SWA")

    # ---- random 10% of 128-blocks, per head
    N, bs = 32768, 128
    nb = N // bs
    print(f"random 10% of {bs}-blocks (+ diagonal), N={N}, B={B}, H={H}, D={D}", flush=True)
    g = torch.Generator(device="cuda").manual_seed(0)
    blk = torch.rand(H, nb, nb, device="cuda", generator=g) < 0.1
    blk |= torch.eye(nb, dtype=torch.bool, device="cuda")
    lay = sa.BlockCSRLayout.from_block_mask(blk.cpu().numpy(), bs)
    both(N, {"128-blocks": lay}, lambda b, h, qi, ki: blk[h, qi // bs, ki // bs],
         4 * B * int(blk.sum()) * bs * bs * D, "random 10%")

    if args.big:
        N = 1 << 20
        t0 = time.perf_counter()
        lay = sa.patterns.sliding_window(W).layout(N, block_size=(128, 128))
        t_build = time.perf_counter() - t0
        print(f"N={N}: layout build {t_build:.2f} s, {lay.nbytes / 2**20:.1f} MiB of index arrays, {lay}",
              flush=True)
        gen = cp.random.default_rng(1)
        q, k, v = (gen.standard_normal((1, H, N, D), dtype=cp.float32).astype(cp.float16) for _ in range(3))
        ours(q, k, v, lay, "ours float16 tc, N=1,048,576", lay.flops(D, q_heads=H), reps=1, warm=1)


def accuracy(sa, cp, torch, H, D, N=16384, W=4096):
    """Max error of each precision against the float64 kernel (within 1e-12 of the dense
    reference, tests/test_cuda.py) on the same inputs, rounded to that precision first."""
    lay = sa.patterns.sliding_window(W).layout(N, block_size=(128, 128))
    gen = cp.random.default_rng(2)
    x32 = [gen.standard_normal((1, H, N, D), dtype=cp.float32) for _ in range(3)]
    print(f"accuracy vs float64, causal W={W}, N={N}, H={H}, D={D}, q k v ~ N(0, 1):", flush=True)

    def report(name, out, xs):
        ref = sa.attention(*(x.astype(cp.float64) for x in xs), lay)
        err = cp.abs(out.astype(cp.float64) - ref)
        print(f"  {name:34s} max |err| {float(err.max()):.2e}  mean |err| {float(err.mean()):.2e}  "
              f"max |ref| {float(cp.abs(ref).max()):.2f}", flush=True)

    report("float32 (exact, CUDA cores)", sa.attention(*x32, lay), x32)
    with sa.use_tf32():
        report("float32 with use_tf32()", sa.attention(*x32, lay), x32)
    tb = [torch.from_dlpack(x).to(torch.bfloat16) for x in x32]
    report("bfloat16 (tensor cores)", cp.from_dlpack(sa.attention(*tb, lay).float()),
           [cp.from_dlpack(t.float()) for t in tb])
    x16 = [x.astype(cp.float16) for x in x32]
    report("float16 (tensor cores)", sa.attention(*x16, lay), x16)
    del x32, tb, x16
    cp.get_default_memory_pool().free_all_blocks()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer repetitions, no kernel variants")
    p.add_argument("--no-flex-fp32", action="store_true", help="skip FlexAttention in float32 (slow)")
    p.add_argument("--big", action="store_true", help="also N = 1,048,576")
    p.add_argument("--no-accuracy", action="store_true", help="skip the error of each precision vs float64")
    p.add_argument("--geometries", type=lambda t: [tuple(int(x) for x in g.split(",")) for g in t.split(";")],
                   default=[(16, 16, 4, 4, 32), (8, 16, 8, 4, 32)],
                   help="float32 Numba tile geometries to try, 'TY,TX,RY,RX,DC;...'")
    run(p.parse_args())
