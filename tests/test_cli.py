"""The command line: every command through main(argv) or a subprocess, including bad options."""

import json
import os
import subprocess
import sys

import pytest

import sparseattn as sa
from sparseattn.__main__ import main

pytest.importorskip("matplotlib")

SMALL = ["--heads", "2", "--dim", "16"]


def run_cli(*args, cwd=None):
    env = dict(os.environ, MPLBACKEND="Agg")
    return subprocess.run([sys.executable, "-m", "sparseattn", *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd, env=env)


def usage_error(capsys, argv):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_help_everywhere():
    res = run_cli("--help")
    assert res.returncode == 0
    for cmd in ("info", "demo", "bench", "show"):
        assert cmd in res.stdout
        sub = run_cli(cmd, "--help")
        assert sub.returncode == 0 and f"usage: sparseattn {cmd}" in sub.stdout
    assert run_cli("--version").stdout.strip() == f"sparseattn {sa.__version__}"


def test_no_command_and_unknown_command(capsys):
    assert "required: COMMAND" in usage_error(capsys, [])
    assert "invalid choice: 'frobnicate'" in usage_error(capsys, ["frobnicate"])


def test_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"sparseattn {sa.__version__}" in out
    assert "cpu        available" in out
    assert "cuda" in out and "numba threads:" in out and "GPU:" in out
    if "cuda" not in sa.backends.available():
        assert "cuda       unavailable: " in out


def test_demo_small(tmp_path, capsys):
    png, js = tmp_path / "demo.png", tmp_path / "demo.json"
    rc = main(["demo", "--n", "256", *SMALL, "--rows", "12", "--repeat", "1", "--window", "32",
               "-o", str(png), "--json", str(js)])
    out = capsys.readouterr().out
    assert rc == 0
    for fam in ("sliding_window", "dilated", "strided", "fixed", "longformer", "bigbird",
                "block_sparse", "sinks"):
        assert fam in out
    assert "estimated from a timed" in out and "max error" in out
    assert png.read_bytes()[:4] == b"\x89PNG"
    rows = json.loads(js.read_text())["rows"]
    assert len(rows) == 8 and all(r["max error"] < 2e-4 for r in rows)
    assert rows[0]["keys/query"] == pytest.approx(sum(min(i + 1, 32) for i in range(256)) / 256)


def test_demo_subset_measured_dense_float64(tmp_path, capsys):
    rc = main(["demo", "--n", "200", *SMALL, "--rows", "5", "--repeat", "1", "--dtype", "float64",
               "--patterns", "dense", "sinks", "--dense", "measure", "--causal", "-o", "-"])
    out = capsys.readouterr().out
    assert rc == 0 and "measured in" in out and "picture" not in out
    assert "dense" in out.split("------")[-1]


def test_demo_errors(capsys):
    base = ["demo", "--n", "64", *SMALL, "-o", "-"]
    assert "unknown pattern nope" in usage_error(capsys, base + ["--patterns", "nope"])
    assert "--window does not apply to the pattern(s) bigbird" in usage_error(
        capsys, base + ["--patterns", "bigbird", "--window", "8"])
    assert "argument --n: must be > 0, got 0" in usage_error(capsys, ["demo", "--n", "0"])
    assert "argument --n: invalid int value: 'x'" in usage_error(capsys, ["demo", "--n", "x"])
    assert "--n must be >= 16" in usage_error(capsys, ["demo", "--n", "8"])
    assert "unknown backend 'tpu'" in usage_error(capsys, base + ["--backend", "tpu"])
    if "cuda" not in sa.backends.available():
        assert "backend 'cuda' is not available here" in usage_error(capsys, base + ["--backend", "cuda"])
    assert "block_sparse: density must lie in (0, 1]" in usage_error(
        capsys, base + ["--patterns", "block_sparse", "--density", "1.5"])
    assert "invalid choice: 'float16'" in usage_error(capsys, base + ["--dtype", "float16"])


def test_bench_small(tmp_path, capsys, monkeypatch):
    # torch's FlexAttention compiles for tens of seconds: test the skip path here (torch hidden);
    # `sparseattn bench --vs flex` with torch installed is exercised by hand (see the docs)
    monkeypatch.setitem(sys.modules, "torch", None)
    out_dir = tmp_path / "b"
    rc = main(["bench", "--n", "128", "256", "--patterns", "sliding_window", "block_sparse", *SMALL,
               "--repeat", "1", "--window", "16", "-o", str(out_dir), "--vs", "flex"])
    cap = capsys.readouterr()
    assert rc == 0
    assert "fitted slope" in cap.out and "sliding_window [cpu]" in cap.out and "dense" in cap.out
    data = json.loads((out_dir / "bench.json").read_text())
    series = {r["series"] for r in data["records"]}
    assert {"dense", "sliding_window [cpu]", "block_sparse [cpu]"} <= series
    assert set(data["meta"]["slopes"]) >= {"dense", "sliding_window [cpu]"}
    assert (out_dir / "bench.csv").read_text().startswith("pattern,n,")
    assert (out_dir / "bench.png").read_bytes()[:4] == b"\x89PNG"
    assert "flex: skipped (torch with FlexAttention is not installed" in cap.err
    assert "pip install torch" in cap.err


def test_bench_errors(capsys):
    assert "--n values must be >= 16" in usage_error(capsys, ["bench", "--n", "8", "-o", "-"])
    assert "--summary does not apply" in usage_error(
        capsys, ["bench", "--patterns", "sliding_window", "--summary", "2"])
    assert "invalid choice: 'xformers'" in usage_error(capsys, ["bench", "--vs", "xformers"])
    assert "unknown backend 'gpu'" in usage_error(capsys, ["bench", "--n", "64", "--backends", "gpu"])


def test_show(tmp_path, capsys):
    png = tmp_path / "w.png"
    assert main(["show", "sliding_window", "--n", "512", "--window", "64", "-o", str(png)]) == 0
    out = capsys.readouterr().out
    assert "sliding_window(window=64, causal=True)" in out and str(png) in out
    assert png.read_bytes()[:4] == b"\x89PNG"
    for fam in ("dense", "dilated", "strided", "fixed", "longformer", "bigbird", "block_sparse", "sinks"):
        p = tmp_path / f"{fam}.png"
        assert main(["show", fam, "--n", "300", "--view", "block", "-o", str(p)]) == 0
        assert p.exists()
    capsys.readouterr()


def test_show_default_output_in_cwd(tmp_path):
    res = run_cli("show", "strided", "--n", "256", "--stride", "16", "--no-causal", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "sparseattn-strided.png").exists()


def test_show_errors(capsys):
    err = usage_error(capsys, ["show", "bigbird", "--window", "64"])
    assert "--window does not apply to bigbird; its options: --block" in err
    assert "invalid choice: 'butterfly'" in usage_error(capsys, ["show", "butterfly"])
    assert "argument --window: must be > 0, got -3" in usage_error(capsys, ["show", "sliding_window",
                                                                            "--window", "-3"])
    assert "--resolution must be >= 8" in usage_error(capsys, ["show", "dense", "--resolution", "4"])
    assert "argument --density: invalid float value: 'lots'" in usage_error(
        capsys, ["show", "block_sparse", "--density", "lots"])
    assert "required: PATTERN" in usage_error(capsys, ["show"])


def test_console_script_installed():
    exe = os.path.join(os.path.dirname(sys.executable), "sparseattn")
    if not os.path.exists(exe):
        pytest.skip("package not installed with its console script")
    res = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and sa.__version__ in res.stdout


def test_without_matplotlib(tmp_path):
    # `show` fails with the install hint; `demo` still prints its table and says it skipped the picture
    code = ("import sys; sys.modules['matplotlib'] = None; sys.modules['matplotlib.pyplot'] = None\n"
            "from sparseattn.__main__ import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    show = subprocess.run([sys.executable, "-c", code, "show", "dense", "--n", "64", "-o", str(tmp_path / "x.png")],
                          capture_output=True, text=True, timeout=300)
    assert show.returncode == 1
    assert "sparseattn show: error: sparseattn.plot needs matplotlib" in show.stderr
    assert not (tmp_path / "x.png").exists()
    demo = subprocess.run([sys.executable, "-c", code, "demo", "--n", "64", *SMALL, "--rows", "4",
                           "--patterns", "sliding_window", "--window", "8", "-o", str(tmp_path / "d.png")],
                          capture_output=True, text=True, timeout=300)
    assert demo.returncode == 0, demo.stderr
    assert "sliding_window" in demo.stdout
    assert "picture skipped: sparseattn.plot needs matplotlib" in demo.stderr
