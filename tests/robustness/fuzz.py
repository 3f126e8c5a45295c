"""Coverage-guided fuzzing of the public API with atheris (``pip install -e '.[fuzz]'``).

    python tests/robustness/fuzz.py TARGET [libFuzzer options] [CORPUS_DIR ...]
    python tests/robustness/fuzz.py TARGET --replay      # run the stored corpus, no atheris needed

TARGET is one of ``fuzz_targets.TARGETS`` (layout, attention, patterns, select), or ``all`` (the
first byte picks one; its corpus is made by ``fuzz_targets.all_corpus``). The stored corpus
is ``tests/robustness/corpus/TARGET/``: pass a scratch directory first and the stored one second to
read it without growing it (as the test suite does), or the stored one alone to grow it.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def replay(name):
    import fuzz_targets

    files = sorted((HERE / "corpus" / name).glob("*"))
    for f in files:
        fuzz_targets.TARGETS[name](f.read_bytes())
    print(f"replayed {len(files)} inputs of {name}")


def main():
    name = sys.argv[1]
    sys.path.insert(0, str(HERE))
    if "--replay" in sys.argv:
        replay(name)
        return
    import atheris

    # Coverage of the Python layers (validation, layouts, patterns, dispatch). Modules holding
    # Numba kernels stay uninstrumented: Numba compiles from bytecode atheris would rewrite.
    with atheris.instrument_imports(
        include=["sparseattn", "fuzz_targets"],
        exclude=["sparseattn.backends.cpu", "sparseattn.backends.cuda", "sparseattn.patterns._build",
                 "sparseattn.analysis"],
    ):
        import fuzz_targets
        import sparseattn.backends.reference  # noqa: F401
        import sparseattn.patterns  # noqa: F401  (loaded lazily otherwise: after instrumentation)
        import sparseattn.select  # noqa: F401
    import numpy as np

    np.seterr(all="ignore")
    target = fuzz_targets.target_all if name == "all" else fuzz_targets.TARGETS[name]
    atheris.Setup([sys.argv[0]] + sys.argv[2:], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
