"""sa.select.routing: a NumPy oracle of the spherical k-means and capped clusters, recall on
planted near-duplicates, causality, determinism, centroid reuse, attention over the result."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import sparseattn as sa
from sparseattn.select.routing import init_centroids
from conftest import tolerance
from test_select_lsh import planted, recall


def unit(x):
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), np.finfo(x.dtype).tiny)


def oracle_routing(q, k, n_clusters, seed, causal, iters, cap):
    hq, nq, _ = q.shape
    hkv, nk, _ = k.shape
    g = hq // hkv
    qn, kn = unit(q), np.repeat(unit(k), g, axis=0)
    cent = unit(init_centroids(unit(q), unit(k), n_clusters, seed))
    for _ in range(iters):
        lq = np.argmax(np.einsum("hnd,hcd->hnc", qn, cent), -1)
        lk = np.argmax(np.einsum("hnd,hcd->hnc", kn, cent), -1)
        new = cent.copy()
        for h in range(hq):
            for c in range(n_clusters):
                s = qn[h, lq[h] == c].sum(0) + kn[h, lk[h] == c].sum(0)
                if np.linalg.norm(s) > 0:
                    new[h, c] = s / np.linalg.norm(s)
        cent = new
    lq = np.argmax(np.einsum("hnd,hcd->hnc", qn, cent), -1)
    ks = np.einsum("hnd,hcd->hnc", kn, cent)
    lk, sk = np.argmax(ks, -1), ks.max(-1)
    mask = np.zeros((hq, nq, nk), bool)
    for h in range(hq):
        for c in range(n_clusters):
            members = np.nonzero(lk[h] == c)[0]
            members = members[np.lexsort((members, -sk[h, members]))][:cap]
            rows = np.nonzero(lq[h] == c)[0]
            mask[h, rows[:, None], members[None, :]] = True
    if causal:
        mask &= np.arange(nk)[None, :] <= np.arange(nq)[:, None] + nk - nq
    return mask


@given(st.integers(1, 2), st.integers(1, 2), st.integers(1, 40), st.integers(1, 50),
       st.sampled_from([2, 5]), st.integers(1, 6), st.integers(0, 3),
       st.sampled_from([None, 0.5, 1.5]), st.booleans(), st.integers(0, 2**31 - 1))
@settings(max_examples=30)
def test_routing_matches_oracle(hkv, group, nq, nk, d, n_clusters, iters, factor, causal, seed):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((hkv * group, nq, d))
    k = rng.standard_normal((hkv, nk, d))
    n_clusters = min(n_clusters, nq + nk)
    lay = sa.select.routing(q, k, n_clusters, seed=seed, causal=causal, iters=iters,
                            capacity_factor=factor)
    cap = nk if factor is None else max(1, math.ceil(factor * nk / n_clusters))
    np.testing.assert_array_equal(lay.to_dense(),
                                  oracle_routing(q, k, n_clusters, seed, causal, iters, cap))
    assert lay.row_lengths.max(initial=0) <= cap


def test_recall_on_planted_near_duplicates():
    # N=1024, D=32, 2 heads, noise 0.1 on unit keys; 16 clusters, 10 iterations, capacity 2x
    q, k, perm = planted(1024, 32, 2, 0.1, seed=0)
    lay = sa.select.routing(q, k, 16, seed=0)
    assert recall(lay, perm) >= 0.9  # measured 0.978, 0.063 of keys per query
    assert lay.density < 0.1
    assert lay.row_lengths.max() <= math.ceil(2.0 * 1024 / 16)


@pytest.mark.parametrize("nq,nk", [(150, 150), (40, 150), (150, 40)])
def test_causal_pairs_only(nq, nk):
    rng = np.random.default_rng(1)
    q = rng.standard_normal((2, nq, 8), dtype=np.float32)
    k = rng.standard_normal((1, nk, 8), dtype=np.float32)
    lay = sa.select.routing(q, k, 4, causal=True)
    rows = np.repeat(np.arange(lay.heads * nq), np.diff(lay.indptr)) % nq
    assert lay.nnz > 0
    assert np.all(lay.indices <= rows + nk - nq)
    full = sa.select.routing(q, k, 4)
    causal_mask = np.arange(nk)[None, :] <= np.arange(nq)[:, None] + nk - nq
    np.testing.assert_array_equal(lay.to_dense(), full.to_dense() & causal_mask)


def test_seed_determinism_and_centroid_reuse():
    rng = np.random.default_rng(2)
    q = rng.standard_normal((2, 200, 8), dtype=np.float32)
    k = rng.standard_normal((2, 200, 8), dtype=np.float32)
    a, cent = sa.select.routing(q, k, 8, seed=3, return_centroids=True)
    assert cent.shape == (2, 8, 8) and cent.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(cent, axis=-1), 1, rtol=1e-5)
    assert sa.select.routing(q, k, 8, seed=3) == a
    assert sa.select.routing(q, k, 8, seed=4) != a
    # the returned centroids reproduce the layout with no further iteration
    assert sa.select.routing(q, k, 8, centroids=cent, iters=0) == a
    b, cent2 = sa.select.routing(q + 0.01, k, 8, centroids=cent, iters=1, return_centroids=True)
    assert cent2.shape == cent.shape
    # shared (C, D) centroids broadcast over heads
    c = sa.select.routing(q, k, 8, centroids=cent[0], iters=0)
    assert c.head(0) == a.head(0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_feeds_attention_and_matches_reference(dtype):
    q, k, _ = planted(96, 8, 2, 0.2, seed=5, dtype=dtype)
    v = np.random.default_rng(6).standard_normal((2, 96, 4)).astype(dtype)
    lay = sa.select.routing(q, k, 6, causal=True)
    local = sa.CSRLayout.from_dense(np.tril(np.triu(np.ones((96, 96), bool), -3)))
    for layout in (lay, lay | local):
        out = sa.attention(q, k, v, layout, backend="cpu")
        ref = sa.attention(q, k, v, layout, backend="reference")
        tol = tolerance(dtype) * 10
        np.testing.assert_allclose(out, ref, rtol=tol, atol=tol)


def test_huge_capacity_factor_means_uncapped():
    rng = np.random.default_rng(11)
    q = rng.standard_normal((1, 30, 4))
    k = rng.standard_normal((1, 40, 4))
    assert sa.select.routing(q, k, 3, capacity_factor=1e308) == sa.select.routing(q, k, 3, capacity_factor=None)


def test_bad_input():
    q = np.ones((2, 5, 4))
    with pytest.raises(ValueError, match="n_clusters"):
        sa.select.routing(q, q, 0)
    with pytest.raises(ValueError, match="n_clusters"):
        sa.select.routing(q, q, 11)
    with pytest.raises(ValueError, match="iters"):
        sa.select.routing(q, q, 2, iters=-1)
    with pytest.raises(ValueError, match="capacity_factor"):
        sa.select.routing(q, q, 2, capacity_factor=0)
    with pytest.raises(ValueError, match="centroids"):
        sa.select.routing(q, q, 2, centroids=np.ones((3, 2, 4)))
    with pytest.raises(ValueError, match="centroids"):
        sa.select.routing(q, q, 2, centroids=np.full((2, 2, 4), np.inf))
