import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

# Small, bounded property tests: CI runs the whole suite on 2 cores in minutes.
settings.register_profile(
    "sparseattn", max_examples=int(os.environ.get("SPARSEATTN_HYPOTHESIS_EXAMPLES", "25")),
    deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("sparseattn")


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def tolerance(dtype):
    """The contract: 1e-5 relative (fp32), 1e-12 (fp64) against the dense reference."""
    return {np.float32: 1e-5, np.float64: 1e-12}[np.dtype(dtype).type]


def assert_close(got, want, dtype, factor=10):
    """Within ``factor`` times the contract's tolerance, relative to the larger of 1 and max |want|."""
    tol = tolerance(dtype) * factor
    scale = max(1.0, float(np.abs(want).max(initial=0.0)))
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * scale)
