"""Shared helpers of the robustness suite (not a test module)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

import sparseattn as sa

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]

#: what a bad input may raise; anything else (or a dead process) is a bug
CLEAN_ERRORS = (ValueError, TypeError)


def reference(q, k, v, layout, scale=None):
    """float64 dense oracle: (out, lse)."""
    f64 = [np.asarray(x, np.float64) for x in (q, k, v)]
    return sa.attention(*f64, layout, scale=scale, backend="reference", return_lse=True)


def random_mask(rng, heads, n_q, n_k, density=0.4, empty_rows=True):
    mask = rng.random((heads, n_q, n_k)) < density
    if empty_rows and n_q:
        mask[:, rng.integers(0, n_q)] = False
    return mask


def run_python(code, timeout=120, env=None):
    """Run ``code`` in a fresh interpreter (a crash there cannot take pytest down)."""
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(HERE), full_env.get("PYTHONPATH", "")])
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=str(REPO))


def assert_clean_error(exc, *words):
    """A clean error names what was wrong: each of ``words`` appears in its message."""
    assert isinstance(exc, CLEAN_ERRORS), f"{type(exc).__name__}: {exc}"
    msg = str(exc)
    assert msg, "empty error message"
    for w in words:
        assert w in msg, f"{w!r} not in message {msg!r}"
