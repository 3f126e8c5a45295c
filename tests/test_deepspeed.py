"""sa.compat.deepspeed against an oracle transcribed from DeepSpeed's loops.

The oracle functions below follow DeepSpeed's ``sparsity_config.py`` line by line (plain Python
loops over block rows and columns, torch replaced by NumPy), independently of the vectorised
implementation under test.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import sparseattn as sa

ds = sa.compat.deepspeed


# ----------------------------------------------------------------------------- oracle


def o_fixed(nh, nb, L, G, attention, horizontal, ndgp, per_head):
    lay = np.zeros((nh, nb, nb), np.int64)
    for h in range(nh if per_head else 1):
        for i in range(0, nb, L):
            end = min(i + L, nb)
            for row in range(i, end):
                for col in range(i, (row + 1 if attention == "unidirectional" else end)):
                    lay[h, row, col] = 1
        first = L - (1 + h % ndgp) * G
        end = nb - (nb % L)
        for i in range(first, end, L):
            first_row = 0 if attention == "bidirectional" else i
            lay[h, first_row:, i:i + G] = 1
            if horizontal:
                lay[h, i:i + G, :] = 1
        if end < nb:
            start = min(end + first, nb - G)
            end = start + G
            first_row = 0 if attention == "bidirectional" else start
            lay[h, first_row:, start:end] = 1
            if horizontal:
                lay[h, start:end, :] = 1
    if not per_head:
        lay[1:] = lay[0]
    return lay


def o_variable_det(nh, nb, windows, gidx, gend, attention, horizontal):
    lay = np.zeros((nh, nb, nb), np.int64)
    h = 0
    start = end = 0
    for bsz in windows:
        end += bsz
        end = min(end, nb)
        for row in range(start, end):
            for col in range(start, (row + 1 if attention == "unidirectional" else end)):
                lay[h, row, col] = 1
        start += bsz
    for i in range(start, nb, bsz):
        end = min(i + bsz, nb)
        for row in range(i, end):
            for col in range(i, (row + 1 if attention == "unidirectional" else end)):
                lay[h, row, col] = 1
    if gend is None:
        for idx in gidx:
            if idx < nb:
                if horizontal:
                    lay[h, idx, :] = 1
                first_row = 0 if attention == "bidirectional" else idx
                lay[h, first_row:, idx] = 1
    else:
        for s, e in zip(gidx, gend):
            if s < nb:
                e = min(e, nb)
                if horizontal:
                    lay[h, s:e, :] = 1
                first_row = 0 if attention == "bidirectional" else s
                lay[h, first_row:, s:e] = 1
    lay[1:] = lay[0]
    return lay


def o_window(lay, h, nsw, bidirectional):
    nb = lay.shape[1]
    w = nsw // 2
    for row in range(nb):
        start = max(0, row - w)
        end = min(row + w + 1, nb) if bidirectional else row + 1
        lay[h, row, start:end] = 1


def o_bslongformer(nh, nb, nsw, gidx, gend, attention):
    lay = np.zeros((nh, nb, nb), np.int64)
    o_window(lay, 0, nsw, True)
    spans = [(i, i + 1) for i in gidx] if gend is None else list(zip(gidx, gend))
    for s, e in spans:
        if s < nb:
            e = min(e, nb)
            lay[0, s:e, :] = 1
            lay[0, :, s:e] = 1
    if attention == "unidirectional":
        lay = np.stack([np.tril(x) for x in lay])
    lay[1:] = lay[0]
    return lay


def o_local(nh, nb, nsw, attention):
    lay = np.zeros((nh, nb, nb), np.int64)
    o_window(lay, 0, nsw, attention == "bidirectional")
    lay[1:] = lay[0]
    return lay


def o_bigbird_det(nh, nb, nsw, g, attention):
    lay = np.zeros((nh, nb, nb), np.int64)
    o_window(lay, 0, nsw, True)
    lay[0, :g, :] = 1
    lay[0, :, :g] = 1
    if attention == "unidirectional":
        lay = np.stack([np.tril(x) for x in lay])
    lay[1:] = lay[0]
    return lay


# ----------------------------------------------------------------------------- deterministic


def test_fixed_hand_checked():
    # 8 blocks, windows of 4, the last block of each window global, unidirectional
    got = ds.FixedSparsityConfig(2, block=16, num_local_blocks=4, attention="unidirectional").make_layout(128)
    want = np.array([
        [1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0],
        [0, 0, 0, 1, 1, 0, 0, 0],
        [0, 0, 0, 1, 1, 1, 0, 0],
        [0, 0, 0, 1, 1, 1, 1, 0],
        [0, 0, 0, 1, 1, 1, 1, 1]])
    assert got.dtype == np.int64 and got.shape == (2, 8, 8)
    np.testing.assert_array_equal(got[0], want)
    np.testing.assert_array_equal(got[1], want)
    # bidirectional with a short last window (6 blocks): its global block is the last one
    got = ds.FixedSparsityConfig(1, block=4, num_local_blocks=4).make_layout(24)[0]
    assert got[:, 3].all() and got[:, 5].all() and got[4:, 4:].all() and got[:4, :4].all()
    assert got.sum() == 16 + 4 + (6 - 4) + (6 - 2)  # windows, then global columns 3 and 5


@settings(max_examples=30, deadline=None)
@given(nh=st.integers(1, 4), nb=st.integers(1, 20), G=st.integers(1, 3), mult=st.integers(1, 4),
       uni=st.booleans(), horizontal=st.booleans(), per_head=st.booleans(), data=st.data())
def test_fixed_matches_deepspeed(nh, nb, G, mult, uni, horizontal, per_head, data):
    L = G * mult
    attention = "unidirectional" if uni else "bidirectional"
    horizontal = horizontal and not uni
    ndgp = data.draw(st.integers(1, mult)) if per_head else 1
    block = data.draw(st.sampled_from([1, 4, 16]))
    cfg = ds.FixedSparsityConfig(nh, block, per_head, L, G, attention, horizontal, ndgp)
    got = cfg.make_layout(nb * block)
    np.testing.assert_array_equal(got, o_fixed(nh, nb, L, G, attention, horizontal, ndgp, per_head))
    assert got.dtype == np.int64


@settings(max_examples=30, deadline=None)
@given(nh=st.integers(1, 3), nb=st.integers(1, 20), windows=st.lists(st.integers(1, 5), min_size=1, max_size=4),
       gidx=st.lists(st.integers(0, 24), min_size=0, max_size=3), use_end=st.booleans(),
       uni=st.booleans(), horizontal=st.booleans(), data=st.data())
def test_variable_matches_deepspeed(nh, nb, windows, gidx, use_end, uni, horizontal, data):
    attention = "unidirectional" if uni else "bidirectional"
    horizontal = horizontal and not uni
    gend = [s + data.draw(st.integers(1, 4)) for s in gidx] if use_end else None
    cfg = ds.VariableSparsityConfig(nh, 2, False, 0, windows, gidx, gend, attention, horizontal)
    np.testing.assert_array_equal(cfg.make_layout(2 * nb),
                                  o_variable_det(nh, nb, windows, gidx, gend, attention, horizontal))


@settings(max_examples=30, deadline=None)
@given(nh=st.integers(1, 3), nb=st.integers(1, 20), nsw=st.integers(0, 7),
       gidx=st.lists(st.integers(0, 24), min_size=0, max_size=3), use_end=st.booleans(),
       uni=st.booleans(), data=st.data())
def test_bslongformer_matches_deepspeed(nh, nb, nsw, gidx, use_end, uni, data):
    if nsw > nb:
        with pytest.raises(ValueError, match="sliding window blocks"):
            ds.BSLongformerSparsityConfig(nh, 4, num_sliding_window_blocks=nsw).make_layout(4 * nb)
        return
    attention = "unidirectional" if uni else "bidirectional"
    gend = [s + data.draw(st.integers(1, 4)) for s in gidx] if use_end else None
    cfg = ds.BSLongformerSparsityConfig(nh, 4, False, nsw, gidx, gend, attention)
    np.testing.assert_array_equal(cfg.make_layout(4 * nb), o_bslongformer(nh, nb, nsw, gidx, gend, attention))


@settings(max_examples=30, deadline=None)
@given(nh=st.integers(1, 3), nb=st.integers(1, 20), nsw=st.integers(0, 7), uni=st.booleans())
def test_local_and_dense_and_bigbird_det_match_deepspeed(nh, nb, nsw, uni):
    attention = "unidirectional" if uni else "bidirectional"
    np.testing.assert_array_equal(ds.DenseSparsityConfig(nh, 8).make_layout(8 * nb), np.ones((nh, nb, nb), np.int64))
    if nsw > nb:
        with pytest.raises(ValueError):
            ds.LocalSlidingWindowSparsityConfig(nh, 8, nsw, attention).make_layout(8 * nb)
        return
    np.testing.assert_array_equal(ds.LocalSlidingWindowSparsityConfig(nh, 8, nsw, attention).make_layout(8 * nb),
                                  o_local(nh, nb, nsw, attention))
    g = min(nb, 2)
    cfg = ds.BigBirdSparsityConfig(nh, 8, num_random_blocks=0, num_sliding_window_blocks=nsw,
                                   num_global_blocks=g, attention=attention)
    np.testing.assert_array_equal(cfg.make_layout(8 * nb), o_bigbird_det(nh, nb, nsw, g, attention))


def test_local_sliding_window_default_hand_checked():
    got = ds.LocalSlidingWindowSparsityConfig(1, block=16).make_layout(64)[0]  # 3 blocks, unidirectional
    np.testing.assert_array_equal(got, [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]])


# ----------------------------------------------------------------------------- random


@pytest.mark.parametrize("uni", [False, True])
def test_bigbird_random_rules_and_seed(uni):
    attention = "unidirectional" if uni else "bidirectional"
    cfg = ds.BigBirdSparsityConfig(4, 16, different_layout_per_head=True, num_random_blocks=2,
                                   attention=attention, seed=3)
    lay = cfg.make_layout(16 * 12)
    det = o_bigbird_det(4, 12, 3, 1, attention)
    assert np.all(lay[det == 1] == 1)
    extra = lay - det
    assert extra.min() == 0
    for h in range(4):
        for r in range(12):
            assert extra[h, r].sum() <= 2
        if uni:
            assert not np.triu(lay[h], 1).any()
    assert np.array_equal(lay, cfg.make_layout(16 * 12))  # reproducible
    assert not np.array_equal(lay, ds.BigBirdSparsityConfig(4, 16, True, 2, attention=attention, seed=4).make_layout(192))
    assert not all(np.array_equal(lay[0], lay[h]) for h in range(1, 4))  # different per head


def test_variable_random_blocks():
    cfg = ds.VariableSparsityConfig(2, 8, num_random_blocks=3, seed=1)
    lay = cfg.make_layout(8 * 10)
    det = o_variable_det(2, 10, [4], [0], None, "bidirectional", False)
    assert np.all(lay[det == 1] == 1) and np.array_equal(lay[0], lay[1])
    assert (lay - det).sum(axis=2).max() <= 3 and (lay - det).sum() > 0
    with pytest.raises(ValueError, match="random blocks"):
        ds.VariableSparsityConfig(1, 8, num_random_blocks=11).make_layout(80)


# ----------------------------------------------------------------------------- sparseattn side


def test_to_layout_and_pattern_run_attention():
    cfg = ds.BSLongformerSparsityConfig(2, block=16, num_sliding_window_blocks=3, attention="unidirectional")
    lay = cfg.to_layout(96)
    assert isinstance(lay, sa.BlockCSRLayout) and lay.heads == 1 and lay.block_size == (16, 16)
    mask = np.kron(cfg.make_layout(96)[0], np.ones((16, 16), np.int64)).astype(bool)
    np.testing.assert_array_equal(lay.to_dense()[0], mask)
    pat = cfg.to_pattern(96)
    np.testing.assert_array_equal(pat.layout(96).to_dense()[0], mask)
    np.testing.assert_array_equal(pat.layout(64).to_dense()[0], mask[:64, :64])  # cropped
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 96, 8)) for _ in range(3))
    a = sa.attention(q, k, v, lay, backend="cpu")
    b = sa.attention(q, k, v, pat, backend="reference")
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    per = ds.FixedSparsityConfig(4, 16, True, 4, 1, num_different_global_patterns=4)
    assert per.to_layout(128).heads == 4 and per.block_csr(128).heads == 4


@pytest.mark.parametrize("call, err", [
    (lambda: ds.FixedSparsityConfig(2, num_local_blocks=4, num_global_blocks=3), ValueError),
    (lambda: ds.FixedSparsityConfig(2, attention="sideways"), NotImplementedError),
    (lambda: ds.FixedSparsityConfig(2, attention="unidirectional", horizontal_global_attention=True), ValueError),
    (lambda: ds.FixedSparsityConfig(2, num_different_global_patterns=2), ValueError),
    (lambda: ds.FixedSparsityConfig(2, different_layout_per_head=True, num_different_global_patterns=5), ValueError),
    (lambda: ds.VariableSparsityConfig(2, global_block_indices=[0, 2], global_block_end_indices=[1]), ValueError),
    (lambda: ds.VariableSparsityConfig(2, global_block_indices=[2], global_block_end_indices=[2]), ValueError),
    (lambda: ds.BSLongformerSparsityConfig(2, global_block_indices=[3], global_block_end_indices=[1]), ValueError),
    (lambda: ds.DenseSparsityConfig(2, block=16).make_layout(40), ValueError),
    (lambda: ds.DenseSparsityConfig(0), ValueError),
    (lambda: ds.DenseSparsityConfig(2, block=1.5), TypeError),
])
def test_deepspeed_errors(call, err):
    with pytest.raises(err):
        call()
