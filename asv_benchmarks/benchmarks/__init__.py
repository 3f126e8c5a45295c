"""asv benchmark suites of sparseattn: one module per topic (forward, backward, selectors, pattern
building, decode). Data are built in ``setup`` and each kernel runs once there, so Numba's
compile time is never timed."""
