# Two targets cover the README quick start: `make demo` (set up + compress the shipped LeNet)
# and `make test` (the test suite CI runs).
VENV := .venv
ODEKIT := $(VENV)/bin/odekit

.PHONY: setup demo test test-slow lint docs zoo bench

setup:
	./scripts/setup.sh

demo: setup
	$(ODEKIT) info checkpoints/lenet300_digits.safetensors
	$(ODEKIT) reduce checkpoints/lenet300_digits.safetensors --layers 1-2 --out odekit-runs/demo --force

test:
	$(VENV)/bin/python -m pytest

test-slow:
	$(VENV)/bin/python -m pytest -m slow

lint:
	$(VENV)/bin/ruff check odekit tests benchmarks scripts
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports --no-logo

docs:
	$(VENV)/bin/python -m odekit.cli.docs > docs/cli.md

zoo:
	$(VENV)/bin/python scripts/train_zoo.py

# Every benchmark in its --quick form (tens of minutes on 2 cores). Lines go to
# $(BENCH_OUT) so the recorded benchmarks/results/ stay as they are.
BENCH_OUT ?= odekit-runs/bench
bench:
	mkdir -p $(BENCH_OUT)
	for b in ode_gradients train_ode reduce asnet universal_attack varpro; do \
		ODEKIT_BENCH_RESULTS=$(BENCH_OUT) $(VENV)/bin/python benchmarks/$$b.py --quick || exit 1; \
	done
