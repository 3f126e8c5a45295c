"""Sphinx configuration of the sparseattn documentation (``make docs``: warnings are errors).

The pictures are drawn at build time by the library itself (``sparseattn.plot`` through
matplotlib's ``plot`` directive). The API reference lists the modules that import in this
installation, so a build without an optional part (a GPU stack, dask) still succeeds.
"""

import importlib
import os
import sys

import sparseattn

project = "sparseattn"
author = "sparseattn developers"
copyright = "2026, sparseattn developers"
release = version = sparseattn.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.mathjax",
    "numpydoc",
    "matplotlib.sphinxext.plot_directive",
]

root_doc = "index"
exclude_patterns = ["_build"]
templates_path = ["_templates"]
html_theme = "alabaster"
html_static_path = []
html_theme_options = {"description": "Exact sparse attention for NumPy", "fixed_sidebar": True}

autodoc_default_options = {"members": True, "show-inheritance": False}
autodoc_member_order = "bysource"
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_validation_checks = set()

plot_include_source = True
plot_html_show_source_link = False
plot_html_show_formats = False
plot_formats = [("png", 90)]
plot_rcparams = {"figure.max_open_warning": 0}
plot_pre_code = ("import numpy as np\nimport matplotlib.pyplot as plt\nimport sparseattn as sa\n"
                 "from sparseattn import plot\n")

os.environ.setdefault("MPLBACKEND", "Agg")

# ----------------------------------------------------------------------------- API page
# Modules documented when they import here (optional parts may be missing from an install).
API_MODULES = [
    ("sparseattn", "attention, layouts, backend selection"),
    ("sparseattn.layout", "index structures"),
    ("sparseattn.patterns", "static patterns"),
    ("sparseattn.select", "content-based selection (top-k, LSH, routing)"),
    ("sparseattn.cache", "decoding cache"),
    ("sparseattn.autograd", "framework gradients"),
    ("sparseattn.analysis", "receptive field, costs"),
    ("sparseattn.plot", "pictures"),
    ("sparseattn.backends", "backend registry"),
    ("sparseattn.backends.base", "backend interface"),
    ("sparseattn.compat.deepspeed", "DeepSpeed-compatible layouts"),
    ("sparseattn.compat.flex", "FlexAttention masks from layouts"),
    ("sparseattn.distributed", "dask arrays"),
    ("sparseattn.config", "tunables"),
]


# extra automodule options per page: the package page shows only what is defined at the top
# (the layout classes and KVCache have their own pages; one description per object)
_AUTOMODULE_OPTIONS = {
    "sparseattn": ["   :members: attention, attention_backward, use_backend"],
}


def _write_api_list():
    """One page per importable module under ``_generated/``, and the list of missing ones."""
    here = os.path.dirname(os.path.abspath(__file__))
    out_dir = os.path.join(here, "_generated")
    os.makedirs(out_dir, exist_ok=True)
    present, missing = [], []
    for mod, what in API_MODULES:
        try:
            importlib.import_module(mod)
        except Exception as exc:  # an optional part that is not there: list it as such
            missing.append((mod, f"{type(exc).__name__}: {exc}"))
        else:
            present.append((mod, what))
    for i, (mod, what) in enumerate(present):
        title = f"``{mod}``: {what}"
        opts = _AUTOMODULE_OPTIONS.get(mod, ["   :members:"])
        _write_if_changed(os.path.join(out_dir, f"{i:02d}_{mod}.rst"),
                          "\n".join([title, "=" * len(title), "", f".. automodule:: {mod}", *opts, ""]))
    lines = []
    if missing:
        lines += ["Not importable in the installation that built these pages:", ""]
        lines += [f"- ``{mod}`` ({why.splitlines()[0]})" for mod, why in missing]
    _write_if_changed(os.path.join(out_dir, "missing.inc"), "\n".join(lines) + "\n")
    keep = {f"{i:02d}_{mod}.rst" for i, (mod, _) in enumerate(present)} | {"missing.inc"}
    for name in os.listdir(out_dir):  # pages of modules that went away
        if name not in keep:
            os.remove(os.path.join(out_dir, name))


def _write_if_changed(path, text):
    old = open(path).read() if os.path.exists(path) else None
    if old != text:  # rewrite only on change, so incremental builds stay incremental
        with open(path, "w") as f:
            f.write(text)


_write_api_list()
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
