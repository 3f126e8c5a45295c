"""sparseattn.plot: images from index structures (exact vs dense masks), drawings, missing matplotlib."""

import subprocess
import sys

import numpy as np
import pytest

import sparseattn as sa
from sparseattn import plot
from sparseattn.layout import BlockCSRLayout, CSRLayout

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")


def _random_mask(rng, heads, n, m, p=0.2):
    return rng.random((heads, n, m)) < p


def test_mask_image_exact_and_binned():
    rng = np.random.default_rng(0)
    mask = _random_mask(rng, 2, 40, 37)
    lay = CSRLayout.from_dense(mask)
    img, bins = plot.mask_image(lay, head=1, resolution=64)
    assert bins == (1, 1)
    np.testing.assert_array_equal(img, mask[1].astype(float))
    img, bins = plot.mask_image(lay, head=0, resolution=8)
    assert bins == (5, 5)
    want = np.zeros((8, 8))
    for a in range(8):
        for b in range(8):
            blk = mask[0, a * 5:(a + 1) * 5, b * 5:(b + 1) * 5]
            want[a, b] = blk.mean()
    np.testing.assert_allclose(img, want)


def test_mask_image_block_counts_match_elements():
    rng = np.random.default_rng(1)
    mask = _random_mask(rng, 1, 130, 130, 0.5)
    blk = BlockCSRLayout.from_dense(mask, (16, 16))
    img, bins = plot.mask_image(blk, resolution=8)  # pixels of whole blocks
    assert bins[0] % 16 == 0 and bins[1] % 16 == 0
    csr_img, _ = plot.mask_image(blk.to_csr(), resolution=8)
    b = bins[0]
    want = np.array([[mask[0, i:i + b, j:j + b].mean() for j in range(0, 130, b)] for i in range(0, 130, b)])
    np.testing.assert_allclose(img, want)
    assert csr_img.shape[0] >= 8


def test_region_image_reads_only_those_rows():
    rng = np.random.default_rng(2)
    mask = _random_mask(rng, 1, 300, 300, 0.3)
    for lay in (CSRLayout.from_dense(mask), BlockCSRLayout.from_dense(mask, (32, 32))):
        img, bins = plot.mask_image(lay, region=(50, 150), resolution=128)
        assert bins == (1, 1)
        np.testing.assert_array_equal(img, mask[0, 50:150, 50:150].astype(float))
    with pytest.raises(ValueError, match="region must satisfy"):
        plot.mask_image(CSRLayout.from_dense(mask), region=(10, 400))
    with pytest.raises(TypeError, match="region must be a pair"):
        plot.mask_image(CSRLayout.from_dense(mask), region=5)


def test_block_image_full_and_partial():
    lay = sa.patterns.sliding_window(64).layout(512, block_size=(64, 64))
    img, bs = plot.block_image(lay)
    assert bs == (64, 64) and img.shape == (8, 8)
    np.testing.assert_array_equal(np.diag(img), 0.5)  # diagonal blocks are cut by the causal edge
    np.testing.assert_array_equal(np.diag(img, -1), 0.5)
    assert np.all(np.triu(img, 1) == 0) and np.all(np.tril(img, -2) == 0)
    full = sa.patterns.dense().layout(256, block_size=(64, 64))
    assert np.all(plot.block_image(full)[0] == 1.0)


def test_plot_functions_write_png(tmp_path):
    ax = plot.plot_mask(sa.patterns.strided(16), 200)
    assert "density" in ax.get_title()
    plot.savefig(ax, tmp_path / "a.png")
    ax = plot.plot_mask(sa.patterns.bigbird(16), 300, view="block", title="bb")
    plot.savefig(ax.figure, tmp_path / "b.png")
    fig = plot.plot_heads(sa.patterns.dilated([1, 2, 3], window=32), 128)
    assert len([a for a in fig.axes if a.get_visible()]) == 3
    plot.savefig(fig, tmp_path / "c.png")
    fig = plot.plot_patterns({"w": sa.patterns.sliding_window(32),
                              "lay": CSRLayout.from_dense(np.tril(np.ones((128, 128), bool)))}, 128)
    plot.savefig(fig, tmp_path / "d.png")
    fig = plot.plot_patterns({"a": sa.patterns.sinks(2), "b": sa.patterns.strided(8), "c": sa.patterns.dense()},
                             128, ncols=2, zoom=32)
    visible = [a for a in fig.axes if a.get_visible()]
    assert len(visible) == 6 and sum("zoom" in a.get_title() for a in visible) == 3
    ax = plot.plot_receptive_field({"w8": sa.patterns.sliding_window(8),
                                    "given": np.array([3, 5, 9])}, 200, layers=3, reference=8)
    assert len(ax.lines) == 4  # two stacks, the L*w reference, the n line
    plot.savefig(ax, tmp_path / "e.png")
    recs = [{"pattern": "dense", "n": n, "time_s": 1e-9 * n**2} for n in (256, 512, 1024)]
    recs += [{"pattern": "w", "n": n, "time_s": 1e-6 * n} for n in (256, 512, 1024)]
    ax = plot.plot_scaling(recs)
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "dense (slope 2.00)" in labels and "w (slope 1.00)" in labels
    plot.savefig(ax, tmp_path / "f.png")
    for name in "abcdef":
        assert (tmp_path / f"{name}.png").read_bytes()[:4] == b"\x89PNG"


def test_plot_bad_input():
    with pytest.raises(ValueError, match="n must be given"):
        plot.plot_mask(sa.patterns.dense())
    with pytest.raises(ValueError, match="view"):
        plot.plot_mask(sa.patterns.dense(), 10, view="pixels")
    with pytest.raises(ValueError, match="resolution"):
        plot.mask_image(sa.patterns.dense(), 10, resolution=2)
    with pytest.raises(ValueError, match="head must lie"):
        plot.mask_image(sa.patterns.dilated([1, 2]), 10, head=5)
    with pytest.raises(TypeError, match="mapping"):
        plot.plot_patterns([sa.patterns.dense()], 10)
    with pytest.raises(ValueError, match="no positive"):
        plot.plot_scaling([{"pattern": "x", "n": 1, "time_s": float("nan")}])


def test_missing_matplotlib_message():
    code = ("import sys; sys.modules['matplotlib'] = None; sys.modules['matplotlib.pyplot'] = None\n"
            "import sparseattn as sa\n"
            "try:\n"
            "    sa.plot.plot_mask(sa.CSRLayout.from_dense(__import__('numpy').eye(4, dtype=bool)))\n"
            "except ImportError as e:\n"
            "    print('MSG', e)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "MSG sparseattn.plot needs matplotlib" in res.stdout
    assert "pip install 'sparseattn[plot]'" in res.stdout
