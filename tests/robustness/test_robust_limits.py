"""Index width, memory limits, concurrency and determinism."""

import threading
import tracemalloc
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from robust_helpers import reference, run_python

import sparseattn as sa
from sparseattn import _validation, config

# ----------------------------------------------------------------------------- index width


def test_int64_switch_everywhere(rng, monkeypatch):
    """Beyond config.INT32_NNZ_LIMIT non-zeros (lowered here) every layout path stores int64
    indices, and the kernels give the same bits as with int32."""
    mask = rng.random((2, 37, 45)) < 0.4
    q = rng.standard_normal((2, 37, 8)).astype(np.float32)
    k = rng.standard_normal((2, 45, 8)).astype(np.float32)
    v = rng.standard_normal((2, 45, 8)).astype(np.float32)
    want_csr = sa.CSRLayout.from_dense(mask)
    want = {kind: sa.attention(q, k, v, lay, return_lse=True) for kind, lay in
            (("csr", want_csr), ("block", want_csr.to_block((16, 16))))}
    pat = sa.patterns.sliding_window(7) | sa.patterns.sinks(2)
    want_pat = sa.attention(q, k, v, pat)
    monkeypatch.setattr(config, "INT32_NNZ_LIMIT", 10)
    csr = sa.CSRLayout.from_dense(mask)
    built = {
        "from_dense": csr, "ctor": sa.CSRLayout(csr.indptr, csr.indices, csr.shape, 2),
        "transpose": csr.transpose(), "union": csr | csr.head(0), "scipy": sa.CSRLayout.from_scipy(
            csr.to_scipy(), heads=2), "to_csr": csr.to_block((8, 8)).to_csr(),
        "pattern": pat.layout(37, 45),
    }
    for name, lay in built.items():
        assert lay.indices.dtype == np.int64, name
    blk = sa.BlockCSRLayout.from_block_mask(rng.random((2, 3, 3)) < 0.7, 16, (37, 45))
    assert sa.BlockCSRLayout.from_csr(csr, (16, 16)).to_csr().indices.dtype == np.int64
    assert blk.nnz > 10
    for kind, lay in (("csr", csr), ("block", csr.to_block((16, 16)))):
        out, lse = sa.attention(q, k, v, lay, return_lse=True)
        np.testing.assert_array_equal(out, want[kind][0])
        np.testing.assert_array_equal(lse, want[kind][1])
        if kind == "block":  # (each int64 specialisation is one more compile: keep CI short)
            continue
        g64 = sa.attention_backward(q, k, v, out, lse, np.ones_like(out), lay)
        monkeypatch.setattr(config, "INT32_NNZ_LIMIT", 2**31 - 1)
        lay32 = sa.CSRLayout.from_dense(mask)
        lay32 = lay32 if kind == "csr" else lay32.to_block((16, 16))
        g32 = sa.attention_backward(q, k, v, out, lse, np.ones_like(out), lay32)
        monkeypatch.setattr(config, "INT32_NNZ_LIMIT", 10)
        for a, b in zip(g64, g32):
            np.testing.assert_array_equal(a, b)
    sa.api._LAYOUT_CACHE.clear()
    np.testing.assert_array_equal(sa.attention(q, k, v, pat), want_pat)
    sa.api._LAYOUT_CACHE.clear()


# ----------------------------------------------------------------------------- memory


@pytest.mark.parametrize("call, words", [
    (lambda: sa.patterns.dense().layout(10**7, 10**7), ["layout", "GiB"]),
    (lambda: sa.patterns.sliding_window(4).layout(10**12, 10**12), ["n_q", "GiB"]),
    (lambda: sa.CSRLayout([0, 0], [], (1, 10**13)).to_dense(), ["dense", "GiB"]),
    (lambda: sa.attention(np.zeros((2, 64, 4), np.float32), np.zeros((2, 64, 4), np.float32),
                          np.zeros((2, 64, 4), np.float32), sa.CSRLayout([0] * 65, [], (64, 64))),
     None),
])
def test_oversized_requests_fail_early(call, words, monkeypatch):
    """A request needing more than the machine has is refused before allocating, with the size."""
    if words is None:  # the attention call fits: shrink the machine to see it refused
        monkeypatch.setattr(_validation, "physical_memory", lambda: 1024)
        words = ["attention output", "needs 4.5 KiB", "1.0 KiB"]
    with pytest.raises(MemoryError) as err:
        call()
    for w in words:
        assert w in str(err.value), str(err.value)


def test_topk_huge_k_is_clamped(rng):
    """top_k beyond the key count keeps every key (was a SystemError from a kernel allocation)."""
    q = rng.standard_normal((2, 8, 4)).astype(np.float32)
    lay = sa.select.topk(q, q, 10**15)
    assert lay.nnz == 2 * 8 * 8


@pytest.mark.parametrize("kind", ["csr", "block"])
def test_attention_peak_memory_is_linear(rng, kind):
    """Peak traced memory of one call is O(output + layout + a tile per thread): far below one
    Nq x Nk score array, and it grows ~linearly with N (checked at two sizes)."""
    peaks = []
    for n in (1024, 2048):
        q = rng.standard_normal((1, 2, n, 32)).astype(np.float32)
        lay = sa.patterns.sliding_window(64).layout(n, n, block_size=(64, 64) if kind == "block" else None)
        sa.attention(q, q, q, lay)  # compile / warm caches outside the measurement
        tracemalloc.start()
        tracemalloc.reset_peak()
        out = sa.attention(q, q, q, lay)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        tile = 8 * 64 * config.CPU_MAX_KEY_TILE * 4 * 8  # generous: per-thread scratch, 8 threads
        budget = 3 * out.nbytes + 3 * q.nbytes + lay.nbytes + tile
        assert peak < budget, (n, peak, budget)
        assert peak < 2 * n * n * 4 / 4  # a quarter of one head's dense score matrix
        peaks.append(peak)
    assert peaks[1] < 3 * peaks[0]


# ----------------------------------------------------------------------------- concurrency


def _inputs(seed):
    r = np.random.default_rng(seed)
    return [r.standard_normal((2, 96, 16)).astype(np.float32) for _ in range(3)]


def test_threads_match_serial_and_share_a_layout():
    """Eight threads, each with its own inputs, one layout object shared by all (fresh, so the
    threads race to fill its transpose/CSR caches): results equal the serial ones bit for bit."""
    mask = np.random.default_rng(0).random((96, 96)) < 0.3
    for make in (lambda: sa.CSRLayout.from_dense(mask),
                 lambda: sa.BlockCSRLayout.from_dense(mask, (32, 32))):
        serial_lay = make()
        inputs = [_inputs(s) for s in range(8)]

        def work(lay, qkv):
            out, lse = sa.attention(*qkv, lay, return_lse=True)
            grads = sa.attention_backward(*qkv, out, lse, np.ones_like(out), lay)
            return out, lse, grads

        serial = [work(serial_lay, x) for x in inputs]
        shared = make()
        barrier = threading.Barrier(8)

        def racing(x):
            barrier.wait()
            return work(shared, x)

        with ThreadPoolExecutor(8) as ex:
            parallel = list(ex.map(racing, inputs))
        for (o1, l1, g1), (o2, l2, g2) in zip(serial, parallel):
            np.testing.assert_array_equal(o1, o2)
            np.testing.assert_array_equal(l1, l2)
            for a, b in zip(g1, g2):
                np.testing.assert_array_equal(a, b)
        assert shared.transpose() is shared.transpose()  # one cached object after the race


def test_threads_patterns_select_and_caches():
    """Pattern-layout cache, select and per-thread KV caches under concurrent use."""
    pats = [sa.patterns.sliding_window(w) for w in (8, 16, 24)]
    inputs = [_inputs(s) for s in range(6)]

    def work(i):
        q, k, v = inputs[i]
        out = sa.attention(q, k, v, pats[i % 3])
        lay = sa.select.topk(q, k, 4)
        cache = sa.KVCache(pats[i % 3], heads=2, head_dim=16)
        cache.append(k, v)
        return out, lay.indices.copy(), cache.attend(q[:, -1:])

    serial = [work(i) for i in range(6)]
    sa.api._LAYOUT_CACHE.clear()
    with ThreadPoolExecutor(6) as ex:
        parallel = list(ex.map(work, range(6)))
    for a, b in zip(serial, parallel):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)


def test_workqueue_layer_does_not_abort():
    """Under Numba's workqueue threading layer (not thread-safe) concurrent calls used to abort
    the process; the CPU backend serialises launches there."""
    code = r'''
import numpy as np, sparseattn as sa, numba
from concurrent.futures import ThreadPoolExecutor
lay = sa.patterns.sliding_window(32).layout(128, 128, block_size=(32, 32))
qs = [np.random.default_rng(i).standard_normal((2, 128, 16)).astype(np.float32) for i in range(6)]
ser = [sa.attention(q, q, q, lay) for q in qs]
with ThreadPoolExecutor(6) as ex:
    par = list(ex.map(lambda q: sa.attention(q, q, q, lay), qs))
assert numba.threading_layer() == "workqueue"
assert all(np.array_equal(a, b) for a, b in zip(ser, par))
print("ok")
'''
    res = run_python(code, env={"NUMBA_THREADING_LAYER": "workqueue"}, timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


# ----------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("kind", ["csr", "block", "pattern"])
def test_same_bits_across_runs_and_batch_splits(rng, kind):
    """Same inputs, same bits: repeated calls, and any split of the batch into smaller calls."""
    B = 5
    q = rng.standard_normal((B, 2, 70, 16)).astype(np.float32)
    k = rng.standard_normal((B, 1, 70, 16)).astype(np.float32)
    v = rng.standard_normal((B, 1, 70, 8)).astype(np.float32)
    mask = rng.random((70, 70)) < 0.3
    lay = {"csr": sa.CSRLayout.from_dense(mask), "block": sa.BlockCSRLayout.from_dense(mask, (16, 16)),
           "pattern": sa.patterns.sliding_window(9)}[kind]
    out, lse = sa.attention(q, k, v, lay, return_lse=True)
    dout = rng.standard_normal(out.shape).astype(np.float32)
    grads = sa.attention_backward(q, k, v, out, lse, dout, lay)
    for _ in range(2):
        o2, l2 = sa.attention(q, k, v, lay, return_lse=True)
        np.testing.assert_array_equal(o2, out)
        np.testing.assert_array_equal(l2, lse)
        for a, b in zip(sa.attention_backward(q, k, v, out, lse, dout, lay), grads):
            np.testing.assert_array_equal(a, b)
    for cuts in ([1, 2, 3, 4], [2], [4], [1, 3]):
        parts = np.split(np.arange(B), cuts)
        o = np.concatenate([sa.attention(q[p], k[p], v[p], lay) for p in parts])
        np.testing.assert_array_equal(o, out)
        dq = np.concatenate([sa.attention_backward(q[p], k[p], v[p], out[p], lse[p], dout[p], lay)[0]
                             for p in parts])
        np.testing.assert_array_equal(dq, grads[0])
    # and against the reference, so the bits are also right
    ref = np.stack([reference(q[b], k[b], v[b], lay)[0] for b in range(B)])
    np.testing.assert_allclose(out, ref, atol=1e-5)


def test_same_bits_in_a_fresh_process(rng):
    """Across runs: a new interpreter gives the same bits."""
    code = r'''
import numpy as np, sparseattn as sa, hashlib
r = np.random.default_rng(7)
q, k, v = (r.standard_normal((2, 3, 100, 16)).astype(np.float32) for _ in range(3))
out, lse = sa.attention(q, k, v, sa.patterns.sliding_window(17) | sa.patterns.sinks(2), return_lse=True)
print(hashlib.sha256(out.tobytes() + lse.tobytes()).hexdigest())
'''
    a, b = run_python(code), run_python(code)
    assert a.returncode == 0, a.stderr[-2000:]
    assert a.stdout == b.stdout and len(a.stdout.strip()) == 64
