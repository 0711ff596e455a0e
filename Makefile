# Two entry points: `make demo` (the main job) and `make test`. Both set up .venv from nothing, install the
# Fashion-MNIST Debian package when it is missing, and are idempotent.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: setup data demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# The CPU build of torch first: a bare torch requirement would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[train,cpu,dev,test]'
	touch $(STAMP)

setup: $(STAMP)

data:
	@test -f $(FMNIST) || { (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) \
	  || { echo "could not install dataset-fashion-mnist; see README (Data)"; exit 2; }; }

demo: setup data
	$(BIN)/torchws demo

# data: the data and demo tests read the real Fashion-MNIST files (CI runs this as root, so apt-get works)
test: setup data
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/ruff format --check src tests benchmarks scripts
	$(BIN)/python -m pytest -q -x -p no:cacheprovider

bench: setup
	$(BIN)/python benchmarks/bench_paths.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
