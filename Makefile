# Two commands for a newcomer (see README.md):
#   make book   set up .venv, execute every chapter (offline defaults) and build the HTML book strictly
#   make test   set up .venv and run the whole test suite (unit tests, notebooks, strict book build);
#               the chapters run in .venv-clean, a venv with only the package (no extras),
#               papermill and ipykernel, built next to .venv on first use and kept while
#               pyproject.toml is unchanged;
#               tests/test_site.py opens the built book in headless Chromium (Debian's `chromium`,
#               installed by .ci/run) and is skipped, with the reason, where there is none
#   make assignments  write the student notebooks assignments/*.ipynb from the chapters
#   make lab    open the chapters in JupyterLab (same .venv, the project's kernel)
#   make lab-assignments  open the student notebooks assignments/*.ipynb instead
#   make bench  also install the `bench` extra (Quantus 0.6), run benchmarks/bench_sanity.py and the
#               agreement test with Quantus (tests/test_quantus_agreement.py)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install book test venv-clean bench clean assignments lab lab-assignments

# pip compiles what it installs to bytecode one file at a time: install with --no-compile, then
# compile the venv's site-packages on every core (compileall -j 0; files already compiled are
# skipped).  The same bytecode, about 10 s sooner on 2 cores.  Like pip, it goes on past the
# few files in the packages that are not Python 3 (their errors are silenced).  The packages' own
# test suites (folders named test or tests: 3,500 of the 15,000 files, never imported here) are
# left out: 19.5-20.4 s instead of 26.4-26.5 s, alternated.
SITE = $$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
COMPILE = $(BIN)/python -m compileall -qq -j 0 -x '[/\\]tests?[/\\]' "$(SITE)" >/dev/null || true

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored: it is neither" || true
	$(BIN)/python -m pip install -q --no-compile -e ".[book,test]" 2>&1 | grep -v "is ignored: it is neither" || true
	$(COMPILE)
	$(BIN)/python -c "import sanitylib, captum, jupyter_book, papermill, pytest" 
	touch $(STAMP)

install: $(STAMP)

# A stale Sphinx environment can hide warnings from a -W build: always start from a fresh one.
# SANITYLIB_KEEP_FREED_MEMORY=1: the book's kernels opt in to keeping freed CPU memory between
# passes (glibc thresholds, process-global; sanitylib never changes them on its own): about 2x
# faster chapters on the CPU, the same numbers (see sanitylib.allocator).
# scripts/build_book.py: executes the chapters under papermill, BOOK_JOBS at a time (default 2,
# one thread each), then builds the HTML strictly from them (jupyter-book build -W -n --keep-going,
# execution off) into _build/html.  `jupyter-book build . -W -n` also works (one chapter at a time).
BOOK_JOBS ?= 2
book: $(STAMP)
	SANITYLIB_KEEP_FREED_MEMORY=1 $(BIN)/python scripts/build_book.py --jobs $(BOOK_JOBS)

# Two pytest-xdist workers (one thread each): the chapters' papermill runs, the book build and
# the browser test (one worker, the "clean_env" group of tests/conftest.py) run next to the rest
# of the suite, the longest modules first.  TEST_WORKERS=0 runs everything in one process.
# `.venv/bin/python -m pytest -n 2 --dist loadgroup --timeline=FILE` writes when each test ended
# and on which worker (how the schedule spreads over the two); write it with "=": the option
# lives in tests/conftest.py, and `--timeline FILE` makes pytest take FILE for a test path
# before it reads that file (an "unrecognized arguments" error).
# The package-only venv of the chapters' tests (.venv-clean, tests/clean_env.py) is built, where
# it is missing or out of date, next to .venv's install: each is mostly one pip process on one
# core, so on two cores the pair takes about as long as .venv alone, and pytest starts with both.
TEST_WORKERS ?= 2
test:
	$(MAKE) --no-print-directory -j 2 $(STAMP) venv-clean
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadgroup

venv-clean:
	$(PYTHON) tests/clean_env.py

# Student notebooks assignments/*.ipynb (no solutions, smoke profile, install pinned to
# sanitylib.book.assignments.ASSIGNMENT_REF) from the chapters' Exercises sections; deterministic.
# Also pins every Colab link and the capstone's install to ASSIGNMENT_REF and writes the table
# of book/for_instructors.md.
assignments: $(STAMP)
	$(BIN)/python -m sanitylib.book.assignments

# JupyterLab on the chapters, in the same .venv, with the project's kernel ("sanitylib (.venv)").
lab: $(STAMP)
	$(BIN)/python -m ipykernel install --sys-prefix --name sanitylib --display-name "sanitylib (.venv)" >/dev/null
	$(BIN)/jupyter lab notebooks/

# JupyterLab on the student notebooks (no solutions), same kernel: try an assignment as a student.
lab-assignments: $(STAMP)
	$(BIN)/python -m ipykernel install --sys-prefix --name sanitylib --display-name "sanitylib (.venv)" >/dev/null
	$(BIN)/jupyter lab assignments/

BENCH_STAMP := $(VENV)/.bench-stamp

$(BENCH_STAMP): pyproject.toml $(STAMP)
	$(BIN)/python -m pip install -q --no-compile -e ".[bench]" 2>&1 | grep -v "is ignored: it is neither" || true
	$(COMPILE)
	$(BIN)/python -c "import quantus, captum, sanitylib"
	touch $(BENCH_STAMP)

# One process, identical work, the same allocator setting and threads on every side (pinned
# before the process starts); 3 ABBA repetitions; prints a side-by-side table and a RESULT line.
BENCH_THREADS ?= 2
bench: $(BENCH_STAMP)
	OMP_NUM_THREADS=$(BENCH_THREADS) MKL_NUM_THREADS=$(BENCH_THREADS) OPENBLAS_NUM_THREADS=$(BENCH_THREADS) \
	  $(BIN)/python benchmarks/bench_sanity.py --threads $(BENCH_THREADS)
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/test_quantus_agreement.py

clean:
	rm -rf _build .venv-clean .venv-clean.lock
