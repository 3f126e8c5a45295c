# Two commands matter: `make demo` (set up, run the main job) and `make test` (set up, run the tests).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench docs clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,plot,bench,docs]'
	@# atheris (bounded fuzz session in tests/robustness) only where a wheel installs cleanly;
	@# without it the same fuzz targets run through hypothesis and a corpus replay
	$(PY) -m pip install -q --only-binary=:all: 'atheris>=2.3' || echo "atheris unavailable: fuzz targets run through hypothesis only"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m sparseattn demo

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile
	cd asv_benchmarks && ../$(PY) -m asv check --python=same
	$(MAKE) docs

# the documentation, pictures drawn by the library at build time; warnings are errors
docs: $(STAMP)
	$(PY) -m sphinx -W --keep-going -q -b html docs docs/_build/html
	@echo "docs: docs/_build/html/index.html"

bench: $(STAMP)
	cd asv_benchmarks && ../$(PY) -m asv machine --yes >/dev/null && ../$(PY) -m asv run --python=same --quick --show-stderr

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis docs/_build docs/_generated
