"""Index structures: exact round trips, conversions, set operations, validation."""

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given
from hypothesis import strategies as st

import sparseattn as sa
from sparseattn import config


@st.composite
def masks(draw, max_heads=3, max_n=40):
    heads = draw(st.integers(1, max_heads))
    n_q = draw(st.integers(0, max_n))
    n_k = draw(st.integers(0, max_n))
    density = draw(st.sampled_from([0.0, 0.05, 0.3, 0.9, 1.0]))
    seed = draw(st.integers(0, 2**31 - 1))
    return np.random.default_rng(seed).random((heads, n_q, n_k)) < density


block_sizes = st.tuples(st.integers(1, 9), st.integers(1, 9))


@given(masks())
def test_csr_round_trip(mask):
    lay = sa.CSRLayout.from_dense(mask)
    assert lay.nnz == mask.sum()
    assert np.array_equal(lay.to_dense(), mask)
    again = sa.CSRLayout(lay.indptr, lay.indices, lay.shape, lay.heads)  # passes validation
    assert again == lay


@given(masks(), block_sizes)
def test_block_round_trip_is_exact(mask, bs):
    blk = sa.BlockCSRLayout.from_dense(mask, bs)
    assert np.array_equal(blk.to_dense(), mask)
    assert blk.nnz == mask.sum()
    # full blocks carry no mask; every stored mask is partial and non-empty
    for m in blk.masks:
        assert m.any()
    grid = blk.block_mask()
    nbq, nbk = blk.grid
    for h in range(mask.shape[0]):
        for bi in range(nbq):
            for bj in range(nbk):
                tile = mask[h, bi * bs[0]:(bi + 1) * bs[0], bj * bs[1]:(bj + 1) * bs[1]]
                assert grid[h, bi, bj] == tile.any()
    # re-validated by the public constructor
    sa.BlockCSRLayout(blk.indptr, blk.indices, blk.shape, blk.block_size, blk.heads,
                      blk.mask_index, blk.masks)


@given(masks(), block_sizes, block_sizes)
def test_block_conversions(mask, bs1, bs2):
    lay = sa.CSRLayout.from_dense(mask)
    b1 = lay.to_block(bs1)
    assert b1.to_csr() == lay
    assert np.array_equal(b1.to_block(bs2).to_dense(), mask)


@given(masks())
def test_transpose(mask):
    lay = sa.CSRLayout.from_dense(mask)
    assert np.array_equal(lay.transpose().to_dense(), mask.transpose(0, 2, 1))
    blk = lay.to_block((3, 5))
    assert np.array_equal(blk.transpose().to_dense(), mask.transpose(0, 2, 1))
    assert blk.transpose().block_size == (5, 3)


@given(masks(max_heads=1), masks(max_heads=3), st.booleans())
def test_union_intersection(m1, m2, as_block):
    n_q, n_k = min(m1.shape[1], m2.shape[1]), min(m1.shape[2], m2.shape[2])
    m1, m2 = m1[:, :n_q, :n_k], m2[:, :n_q, :n_k]
    a, b = sa.CSRLayout.from_dense(m1), sa.CSRLayout.from_dense(m2)
    if as_block:
        a = a.to_block((4, 3))
    assert np.array_equal((a | b).to_dense(), m1 | m2)
    assert np.array_equal((a & b).to_dense(), m1 & m2)


def test_scipy_round_trip(rng):
    mask = rng.random((2, 7, 9)) < 0.4
    lay = sa.CSRLayout.from_dense(mask)
    stacked = lay.to_scipy()
    assert stacked.shape == (14, 9)
    assert np.array_equal(stacked.toarray(), mask.reshape(14, 9))
    assert np.array_equal(lay.to_scipy(head=1).toarray(), mask[1])
    back = sa.CSRLayout.from_scipy(sp.csr_matrix(mask.reshape(14, 9).astype(np.float64)), heads=2)
    assert back == lay
    # explicit zeros are not allowed pairs; duplicates merge
    m = sp.coo_matrix((np.array([1.0, 0.0, 1.0, 1.0]), (np.array([0, 0, 1, 1]), np.array([1, 2, 0, 0]))), shape=(2, 3))
    got = sa.CSRLayout.from_scipy(m).to_dense()[0]
    assert np.array_equal(got, np.array([[0, 1, 0], [1, 0, 0]], bool))


def test_costs():
    mask = np.tril(np.ones((10, 10), bool))
    lay = sa.CSRLayout.from_dense(mask)
    assert lay.nnz == 55 and lay.density == pytest.approx(0.55)
    assert lay.flops(8) == 4 * 55 * 8
    assert lay.flops(8, q_heads=4, batch=2) == 8 * 4 * 55 * 8
    blk = lay.to_block(4)
    assert blk.nnz == 55
    assert blk.block_flops(8) >= blk.flops(8)
    c = blk.cost(8)
    assert c["nnz"] == 55 and c["blocks"] == blk.n_blocks and c["bytes"] == blk.nbytes


def test_expand_and_head(rng):
    mask = rng.random((1, 6, 5)) < 0.5
    lay = sa.CSRLayout.from_dense(mask).expand_heads(3)
    assert lay.heads == 3 and np.array_equal(lay.to_dense(), np.repeat(mask, 3, 0))
    assert lay.head(2) == sa.CSRLayout.from_dense(mask)
    blk = sa.BlockCSRLayout.from_dense(mask, 2).expand_heads(3)
    assert np.array_equal(blk.to_dense(), np.repeat(mask, 3, 0))
    with pytest.raises(ValueError, match="shared"):
        lay.expand_heads(6)


def test_from_block_mask():
    bm = np.array([[1, 0], [1, 1]], bool)
    blk = sa.BlockCSRLayout.from_block_mask(bm, 4, shape=(7, 6))
    dense = blk.to_dense()[0]
    expect = np.zeros((7, 6), bool)
    expect[:4, :4] = True
    expect[4:, :] = True
    assert np.array_equal(dense, expect)
    with pytest.raises(ValueError, match="does not fit"):
        sa.BlockCSRLayout.from_block_mask(bm, 4, shape=(9, 6))


@pytest.mark.parametrize(
    "indptr, indices, shape, heads, match",
    [
        ([0, 2, 1, 2], [0, 1], (3, 3), 1, "non-decreasing"),
        ([0, 1, 2], [0, 3], (2, 3), 1, r"\[0, 3\)"),
        ([0, 1, 2], [0, -1], (2, 3), 1, r"\[0, 3\)"),
        ([0, 2, 2], [1, 0], (2, 3), 1, "strictly increasing"),
        ([0, 2, 2], [1, 1], (2, 3), 1, "strictly increasing"),
        ([0, 1], [0], (2, 3), 1, "shape"),
        ([1, 1, 1], [], (2, 3), 1, r"indptr\[0\]"),
        ([0, 1, 3], [0, 1], (2, 3), 1, "len\\(indices\\)"),
        ([0, 1, 2], [0, 1], (2, 3), 2, "shape"),
    ],
)
def test_csr_validation(indptr, indices, shape, heads, match):
    with pytest.raises(ValueError, match=match):
        sa.CSRLayout(np.array(indptr), np.array(indices, dtype=np.int64), shape, heads)


def test_csr_type_errors():
    with pytest.raises(TypeError, match="indices"):
        sa.CSRLayout([0, 1], [0.5], (1, 2))
    with pytest.raises(TypeError, match="shape"):
        sa.CSRLayout([0, 1], [0], "ab")
    with pytest.raises(ValueError, match="heads"):
        sa.CSRLayout([0], [], (0, 2), heads=0)
    with pytest.raises(TypeError, match="boolean"):
        sa.CSRLayout.from_dense(np.ones((2, 2)))


def test_block_validation():
    with pytest.raises(ValueError, match="mask_index"):
        sa.BlockCSRLayout([0, 1], [0], (4, 4), 4, mask_index=[0], masks=np.zeros((0, 4, 4), bool))
    with pytest.raises(ValueError, match="masks must have shape"):
        sa.BlockCSRLayout([0, 1], [0], (4, 4), 4, mask_index=[0], masks=np.zeros((1, 2, 4), bool))
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        sa.BlockCSRLayout([0, 1], [2], (4, 8), 4)
    with pytest.raises(ValueError, match="block_size"):
        sa.BlockCSRLayout([0, 1], [0], (4, 8), 0)


def test_index_width_switch(monkeypatch):
    monkeypatch.setattr(config, "INT32_NNZ_LIMIT", 5)
    lay = sa.CSRLayout.from_dense(np.ones((3, 3), bool))
    assert lay.indices.dtype == np.int64
    monkeypatch.undo()
    assert sa.CSRLayout.from_dense(np.ones((3, 3), bool)).indices.dtype == np.int32


def test_arrays_are_read_only():
    lay = sa.CSRLayout.from_dense(np.eye(3, dtype=bool))
    with pytest.raises(ValueError):
        lay.indices[0] = 2
