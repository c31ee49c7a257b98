# Two entry points for a fresh machine: `make train` and `make test`.
# Both create .venv with the pinned CPU build of torch, then install trainkit into it.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PIN ?= torch==2.13.0
# Use the shared MNIST copy when it sits beside the project (CI, development machines);
# otherwise trainkit looks in its cache and downloads with md5 verification.
export TRAINKIT_DATA_DIR ?= $(firstword $(wildcard $(CURDIR)/../shared/datasets))

.PHONY: setup train test bench gpu-check

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PIN)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

setup: $(VENV)/.installed

train: setup
	$(VENV)/bin/trainkit train --dataset mnist

test: setup
	TRAINKIT_OFFLINE=1 $(PY) -m pytest

# Speed benchmarks (docs/benchmarks.md): Lightning is a benchmark-only extra, same torch.
bench: setup
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) benchmarks/run.py --quick

# On a machine with a CUDA GPU (and its own torch): trainkit's CUDA promises, one line each
# (docs/benchmarks.md, "On a GPU"); `make gpu-check GPU_CHECK_ARGS="--device cpu"` is the dry run.
gpu-check:
	bash benchmarks/gpu_check.sh $(GPU_CHECK_ARGS)
