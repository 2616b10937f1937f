# QuerySeg: one-command install, main job and tests. See README.md.
VENV ?= .venv
PY := $(VENV)/bin/python
# the main job's schedule: quick (CPU, < 30 min) or full (the documented CPU schedules)
SCHEDULE ?= quick

.PHONY: install demo test test-learning test-all test-parity lint cuda-check clean-build

install:
	bash scripts/install.sh

# The main job: train and evaluate on the built-in `shapes` dataset, printing the metrics.
demo: install
	$(PY) tools/main_job.py --schedule $(SCHEDULE)

# The test suite CI runs: everything but the learning tests (marked `slow`).
test: install
	$(PY) -m pytest -q -m "not slow and not parity" tests

# The learning tests: each method trains briefly on `shapes` and must reach AP/PQ/mIoU thresholds
# through the real evaluators (minutes each on a 2-core CPU).
test-learning: install
	$(PY) -m pytest -q -m slow tests

test-all: install
	$(PY) -m pytest -q tests

# Parity with the OpenMMLab reference implementations (README): installs them into .parity_refs/
# (pip --target, never into .venv), then runs tests/parity (pytest marker `parity`).
test-parity: install
	$(PY) tests/parity/parity_refs.py
	$(PY) -m pytest -q -m parity tests/parity

# ruff is pinned in constraints.txt and configured in pyproject.toml
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

cuda-check: install
	bash scripts/check_cuda_build.sh

clean-build:
	rm -rf build common/_C*.so
