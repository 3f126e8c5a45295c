import contextlib
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


@contextlib.contextmanager
def two_pass_token_kernel(buffer=1 << 21):
    """Every CSR layout takes the CPU's one-head-at-a-time kernels (normally only scattered rows
    of long sequences do): the two-pass forward, with a weight buffer of ``buffer`` entries (short
    buffers split heads into segments), and the backward's; yields the list of calls they got."""
    import sparseattn.backends.cpu as cpu
    from sparseattn import config
    from sparseattn.backends.cpu import backward as bwd

    calls = []
    kernels = {(cpu._fwd, "csr_forward_by_head"): cpu._fwd.csr_forward_by_head,
               (bwd, "csr_backward_by_head"): bwd.csr_backward_by_head}

    def spy(kernel):
        def call(*args):
            calls.append(kernel)
            return kernel(*args)
        return call

    saved = {name: getattr(config, name) for name in
             ("CSR_BY_HEAD_MIN_BYTES", "CSR_BY_HEAD_MIN_ROWS", "CSR_WEIGHTS_BUFFER")}
    scattered = cpu.scattered
    try:
        config.CSR_BY_HEAD_MIN_BYTES, config.CSR_BY_HEAD_MIN_ROWS = -1, 0
        config.CSR_WEIGHTS_BUFFER = buffer
        cpu.scattered = bwd.scattered = lambda layout: True
        for (module, name), kernel in kernels.items():
            setattr(module, name, spy(kernel))
        yield calls
    finally:
        for name, value in saved.items():
            setattr(config, name, value)
        cpu.scattered = bwd.scattered = scattered
        for (module, name), kernel in kernels.items():
            setattr(module, name, kernel)
