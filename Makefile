# rowsft: the commands the README documents.
#   make setup   create/update .venv (idempotent, quick when nothing changed)
#   make test    run the test suite
#   make run     the main job: the `rowsft` command (ARGS="..." passes arguments)
#   make bench   the headline benchmarks (engine, methods, scoring: memory and time)
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

# The headline benchmarks, one after another (about 25 min on 2 CPU cores); each prints its table and
# writes benchmarks/results/<name>.json. Sweeps, accuracy and the study: see README "Benchmarks".
bench: setup
	$(PYTHON) benchmarks/engine.py
	$(PYTHON) benchmarks/methods.py
	$(PYTHON) benchmarks/scoring.py

clean:
	rm -rf build dist .pytest_cache test-artifacts benchmarks/out *.egg-info
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +
