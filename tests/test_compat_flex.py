"""sparseattn.compat.flex: exact FlexAttention masks from layouts, no n x n array."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import sparseattn as sa
from sparseattn.compat import flex


def _expand(table, masks, bs, n_q, n_k):
    """Dense mask from (table, masks): the test's own reading of the documented encoding."""
    bq, bk = bs
    heads, nbq, nbk = table.shape
    dense = np.zeros((heads, nbq * bq, nbk * bk), bool)
    for h, i, j in np.ndindex(table.shape):
        e = table[h, i, j]
        if e == flex.FULL:
            dense[h, i * bq:(i + 1) * bq, j * bk:(j + 1) * bk] = True
        elif e >= 0:
            dense[h, i * bq:(i + 1) * bq, j * bk:(j + 1) * bk] = masks[e]
        else:
            assert e == flex.ABSENT
    return dense[:, :n_q, :n_k]


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n_q=st.integers(0, 70), n_k=st.integers(1, 70),
       heads=st.sampled_from([1, 3]), bq=st.sampled_from([1, 8, 16]), bk=st.sampled_from([4, 16]),
       token=st.booleans())
def test_block_table_encodes_the_layout_exactly(seed, n_q, n_k, heads, bq, bk, token):
    rng = np.random.default_rng(seed)
    mask = rng.random((heads, n_q, n_k)) < 0.3
    lay = sa.CSRLayout.from_dense(mask)
    if not token:
        lay = lay.to_block((bq, bk))
    table, masks, bs = flex.block_table(lay, (bq, bk))
    assert table.dtype.kind == "i" and table.shape[0] == heads and len(masks) >= 1
    np.testing.assert_array_equal(_expand(table, masks, bs, n_q, n_k), mask)


def test_block_table_of_a_long_window_stays_small():
    lay = sa.patterns.sliding_window(4096).layout(1 << 16, block_size=(64, 64))
    table, masks, _ = flex.block_table(lay)
    assert table.dtype == np.int8 and len(masks) <= 4
    assert table.nbytes == (1 << 10) ** 2  # 1 MiB, where a dense table takes 4 GiB


def test_block_table_rejects_other_types():
    with pytest.raises(TypeError, match="layout must be"):
        flex.block_table(np.ones((4, 4), bool))


@pytest.mark.parametrize("pattern, n", [
    (sa.patterns.sliding_window(50), 200),
    (sa.patterns.dilated([1, 3]), 130),  # per-head layout
    (sa.patterns.bigbird(16, window_blocks=3, global_blocks=1, random_blocks=2, seed=1), 150),
])
def test_flex_attention_with_our_mask_matches_ours(pattern, n):
    torch = pytest.importorskip("torch")
    fa = pytest.importorskip("torch.nn.attention.flex_attention").flex_attention
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 2, n, 16)) for _ in range(3))
    lay = pattern.layout(n, heads=2)
    bm = flex.block_mask(lay, heads=2, block_size=(16, 16))
    theirs = fa(*(torch.from_numpy(x) for x in (q, k, v)), block_mask=bm).numpy()
    np.testing.assert_allclose(theirs, sa.attention(q, k, v, lay), atol=1e-10)


def test_block_mask_rejects_heads_that_contradict_the_layout():
    pytest.importorskip("torch")
    lay = sa.patterns.dilated([1, 2]).layout(64, heads=2)
    with pytest.raises(ValueError, match="heads=4 does not match the layout's 2 heads"):
        flex.block_mask(lay, heads=4)
