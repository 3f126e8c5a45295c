"""The fuzz targets of ``fuzz_targets.py``, three ways:

* one bounded coverage-guided session over all targets with atheris (``pip install -e '.[fuzz]'``), run
  in a subprocess (a crash there fails this test instead of killing pytest), reading the stored
  corpus in ``corpus/TARGET/`` without growing it; skipped where atheris is not installed;
* without atheris, the stored corpus replayed in a subprocess instead;
* hypothesis feeding random byte strings to the same targets, in process.

``SPARSEATTN_FUZZ_SECONDS`` sets the atheris session's length (default 15 s, all targets in one
process).
"""

import importlib.util
import os
import sys

import pytest
from fuzz_targets import TARGETS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from robust_helpers import HERE, REPO, run_python

HAVE_ATHERIS = importlib.util.find_spec("atheris") is not None
SECONDS = float(os.environ.get("SPARSEATTN_FUZZ_SECONDS", "15"))


@pytest.mark.skipif(not HAVE_ATHERIS, reason="atheris not installed (pip install -e '.[fuzz]'); "
                    "the corpus replay and hypothesis below still run every target")
def test_atheris_session(tmp_path):
    """One coverage-guided session over every target (``all``), seeded with the stored corpora."""
    import subprocess

    from fuzz_targets import all_corpus

    seeds = all_corpus(tmp_path / "seeds")
    (tmp_path / "new").mkdir()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(HERE)]))
    cmd = [sys.executable, str(HERE / "fuzz.py"), "all", f"-max_total_time={SECONDS:g}",
           "-max_len=256", "-rss_limit_mb=4096", "-timeout=120", f"-artifact_prefix={tmp_path}/",
           "-print_final_stats=1", str(tmp_path / "new"), str(seeds)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=SECONDS + 300, env=env,
                         cwd=str(tmp_path))
    crashes = [p.name for p in tmp_path.iterdir() if p.name.startswith(("crash-", "timeout-", "oom-"))]
    assert res.returncode == 0 and not crashes, (
        f"fuzzer found a failure ({crashes}); rerun with: python {HERE / 'fuzz.py'} all "
        f"<artifact>\n{res.stderr[-4000:]}")
    assert "stat::number_of_executed_units" in res.stderr, res.stderr[-2000:]


@pytest.mark.skipif(HAVE_ATHERIS, reason="the atheris session replays the corpus first")
def test_corpus_replay_in_subprocess():
    code = "import fuzz, numpy as np\nnp.seterr(all='ignore')\n" + "".join(
        f"fuzz.replay({name!r})\n" for name in sorted(TARGETS))
    res = run_python(code, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    assert res.stdout.count("replayed") == len(TARGETS)


def test_corpus_present():
    for name in TARGETS:
        assert any((HERE / "corpus" / name).iterdir()), f"empty corpus for {name}"


@pytest.mark.parametrize("name", sorted(TARGETS))
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.binary(min_size=0, max_size=256))
def test_targets_under_hypothesis(name, data):
    import numpy as np

    with np.errstate(all="ignore"):
        TARGETS[name](data)
