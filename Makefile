# QuerySeg: one-command install, main job and tests. See README.md.
VENV ?= .venv
PY := $(VENV)/bin/python
# the main job's schedule: quick (CPU, < 30 min) or full (the documented CPU schedules)
SCHEDULE ?= quick

.PHONY: install demo test test-fast lint cuda-check clean-build

install:
	bash scripts/install.sh

# The main job: train and evaluate on the built-in `shapes` dataset, printing the metrics.
demo: install
	$(PY) tools/main_job.py --schedule $(SCHEDULE)

# The full test suite (what CI runs).
test: install
	$(PY) -m pytest -q tests

test-fast: install
	$(PY) -m pytest -q tests -m "not slow"

lint: install
	$(VENV)/bin/ruff check common projects tests tools train_net.py

cuda-check: install
	bash scripts/check_cuda_build.sh

clean-build:
	rm -rf build common/_C*.so
