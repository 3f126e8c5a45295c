"""Thread control for the CPU kernels.

Numba's parallel loops own the cores; a BLAS call made inside one of them must stay
single-threaded, or OpenBLAS would start its own threads on top of Numba's and the two would fight
(the probe in ``shared/bench`` saw this). ``blas_single_thread`` caps every BLAS library loaded in
the process for the duration of a kernel call.
"""

from __future__ import annotations

import contextlib
import functools
import threading

import numba
import numpy as np

from ... import config

_controller = None
_lock = threading.Lock()


def _get_controller():
    global _controller
    if _controller is None:
        with _lock:
            if _controller is None:
                # Numba's np.dot calls BLAS through scipy.linalg.cython_blas: load that library
                # first, or the controller would not see (and not cap) the BLAS the kernels use.
                import scipy.linalg.cython_blas  # noqa: F401
                from threadpoolctl import ThreadpoolController

                _controller = ThreadpoolController()
    return _controller


@contextlib.contextmanager
def blas_single_thread():
    """Hold BLAS to one thread while Numba's threads run tile products."""
    with _get_controller().limit(limits=1, user_api="blas"):
        yield


def num_threads():
    return numba.get_num_threads()


# Numba's ``workqueue`` threading layer (the fallback where neither OpenMP nor TBB loads, e.g. a
# bare macOS) aborts the whole process when two Python threads launch parallel kernels at once.
# Where it is the layer, kernel launches are serialised; under ``omp``/``tbb`` they run
# concurrently. The layer is known only once Numba's pool has started, so the first launches
# hold the lock until then.
_launch_lock = threading.RLock()  # re-entrant: a guarded method may call another
_serialise = None


def _layer_needs_lock():
    try:
        return numba.threading_layer() == "workqueue"
    except ValueError:  # pool not started yet
        return None


def parallel_guard(method):
    """Decorate a backend method that launches ``parallel=True`` kernels (see above)."""

    @functools.wraps(method)
    def guarded(*args, **kwargs):
        global _serialise
        if _serialise is False:
            return method(*args, **kwargs)
        with _launch_lock:
            try:
                return method(*args, **kwargs)
            finally:
                if _serialise is None:
                    _serialise = _layer_needs_lock()

    return guarded


def balanced_chunks(costs):
    """Split tasks ``0..len(costs)-1`` into contiguous chunks of about equal total cost.

    Parameters
    ----------
    costs : ndarray of int64
        Work of each task (e.g. blocks in its row, plus a constant for the row's fixed cost).

    Returns
    -------
    ndarray of int64
        Chunk boundaries ``starts`` with ``starts[0] = 0`` and ``starts[-1] = len(costs)``.
        The split depends only on ``costs`` and the thread count, and each task is computed the
        same way whichever chunk holds it, so results do not depend on the split.
    """
    n = costs.shape[0]
    nchunks = max(1, min(n, num_threads() * config.CPU_CHUNKS_PER_THREAD))
    if n == 0:
        return np.zeros(1, np.int64)
    cum = np.cumsum(costs, dtype=np.int64)
    targets = cum[-1] * np.arange(1, nchunks, dtype=np.float64) / nchunks
    inner = np.searchsorted(cum, targets, side="left") + 1
    starts = np.concatenate(([0], inner, [n])).astype(np.int64)
    return np.unique(starts)  # drop empty chunks; stays sorted with 0 and n
