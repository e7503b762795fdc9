# rowsft: the commands the README documents.
#   make setup   create/update .venv (idempotent, quick when nothing changed)
#   make test    run the test suite
#   make run     the main job: the `rowsft` command (ARGS="..." passes arguments)
#   make bench   the benchmarks (memory, time, accuracy against the peers)
#   make clean   remove build and test leftovers (keeps .venv and the model cache)
VENV   := .venv
PYTHON := $(VENV)/bin/python
ARGS   ?=
# Idle OpenMP threads sleep instead of spinning (spinning made steps ~5x slower on a shared 2-core machine).
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: setup test run bench clean

setup:
	bash scripts/setup.sh

# The unit, integration and browser tests, then every tutorial notebook in FAST mode under nbval.
test: setup
	$(PYTHON) -m pytest $(PYTEST_ARGS)
	ROWSFT_FAST=1 $(PYTHON) -m pytest --nbval-lax --nbval-current-env \
	    --nbval-sanitize-with notebooks/sanitize.cfg notebooks/ -q -p no:cacheprovider

run: setup
	$(VENV)/bin/rowsft $(ARGS)

bench: setup
	@if [ -f benchmarks/run.py ]; then $(PYTHON) benchmarks/run.py $(ARGS); \
	else echo "bench: no benchmarks yet (benchmarks/run.py lands with the benchmark issue)"; fi

clean:
	rm -rf build dist .pytest_cache test-artifacts benchmarks/out *.egg-info
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +
