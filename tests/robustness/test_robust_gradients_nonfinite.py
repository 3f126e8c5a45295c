"""NaN/inf inputs in the backward pass: a bad entry reaches exactly the gradients that depend on it.

Padding keys filled with NaN, or a NaN output gradient of a query that sees no key, are common in
real pipelines; through a dense or tiled product they would poison every gradient (``0 * NaN``).
Each test perturbs one entry of q, k, v or dout to NaN/inf and checks that every gradient entry
which does not depend on it equals the gradient of the same input with that entry made finite.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from robust_helpers import random_mask

import sparseattn as sa

N, D = 40, 8  # 40: partial edge blocks with 16x16 blocks


def _tainted(mask, bad):
    """Rows (queries) and keys whose gradients may depend on the bad entries.

    ``bad`` maps "q"/"k"/"v"/"dout" to boolean ``(H, N)`` of rows holding a bad entry. A query row
    is tainted when it holds one or sees a key that does; a key is tainted when it holds one or a
    tainted row sees it (its dk, dv sum over those rows).
    """
    rows = bad["q"] | bad["dout"] | (mask & (bad["k"] | bad["v"])[:, None, :]).any(-1)
    keys = bad["k"] | bad["v"] | (mask & rows[:, :, None]).any(1)
    return rows, keys


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), kind=st.sampled_from(["csr", "block"]),
       where=st.sampled_from(["q", "k", "v", "dout"]),
       value=st.sampled_from([np.nan, np.inf, -np.inf]))
def test_bad_entries_do_not_leak_into_gradients(backend, seed, kind, where, value):
    rng = np.random.default_rng(seed)
    mask = random_mask(rng, 2, N, N, density=0.2)
    lay = sa.CSRLayout.from_dense(mask)
    if kind == "block":
        lay = lay.to_block((16, 16))
    arrs = {n: rng.standard_normal((1, 2, N, D)) for n in ("q", "k", "v", "dout")}
    out, lse = sa.attention(arrs["q"], arrs["k"], arrs["v"], lay, return_lse=True, backend=backend)
    clean = sa.attention_backward(arrs["q"], arrs["k"], arrs["v"], out, lse, arrs["dout"], lay,
                                  backend=backend)
    h, i = rng.integers(0, 2), rng.integers(0, N)
    bad = {n: np.zeros((2, N), bool) for n in arrs}
    bad[where][h, i] = True
    arrs[where][0, h, i, rng.integers(0, D)] = value
    out2, lse2 = sa.attention(arrs["q"], arrs["k"], arrs["v"], lay, return_lse=True,
                              backend=backend)
    grads = sa.attention_backward(arrs["q"], arrs["k"], arrs["v"], out2, lse2, arrs["dout"], lay,
                                  backend=backend)
    rows, keys = _tainted(mask, bad)
    for g, c, ok in zip(grads, clean, (~rows, ~keys, ~keys)):
        np.testing.assert_allclose(g[0][ok], c[0][ok], rtol=1e-9, atol=1e-12)
