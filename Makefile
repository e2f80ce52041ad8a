# Two entry points: `make demo` (the main job) and `make test` (the whole suite).
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo test smoke-fullsize bench clean

$(BIN)/prep: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and alone, pinned, so pip takes the local wheels and no resolver picks another build
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[test]'
	touch $(BIN)/prep

install: $(BIN)/prep

demo: install
	$(BIN)/prep demo --out demo-out

test: install
	# two workers (pytest-xdist); the two tests that share the quick demo's output run in one
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup

# The full-size BUTD R101 (random weights) on 10 images, end to end on CPU: CI runs it after the tests.
smoke-fullsize: install
	rm -rf smoke-out
	$(BIN)/prep make-synthetic smoke-out/data --images 10 --seed 1
	$(BIN)/prep extract-regions smoke-out/data/images smoke-out/features --model butd-r101 --random-weights 0 --workers 2 --shard-size 5 --quiet
	$(BIN)/prep verify smoke-out/features

bench: install
	$(BIN)/python benchmarks/bench_extract.py

clean:
	rm -rf demo-out smoke-out .pytest_cache
