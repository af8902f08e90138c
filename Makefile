# Quick start:  make demo   (set up .venv, run an MoE training job on 8 simulated CPU ranks)
#               make test   (set up .venv, run the test suite)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.moetrain-installed
# torch 2.13.0 is installed first (a local CPU wheel here); --no-build-isolation keeps packages that
# build against torch (deepspeed) from pulling a second, CUDA torch into an isolated build env.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo test lint clean gpu-check gpu-wheels

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q setuptools wheel
	$(BIN)/pip install -q --no-build-isolation -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/moetrain train cluster_configs/sim_cpu_8rank.yaml --summary runs/sim_cpu_8rank/summary.json

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

# On a CUDA machine whose python3 has torch (no venv needed): one script installs what it lacks from
# .gpu_wheels/ (offline) and moetrain itself (no dependencies), builds the kernels once, runs the GPU tests and
# the GPU benchmarks within 9 minutes, and writes runs/gpu_check.md (exit 2 at once without a CUDA device).
gpu-check:
	python3 benchmarks/gpu_check.py --out runs/gpu_check.md

# Here, before a device run (whose machine reaches no registry; carry .gpu_wheels): the wheels gpu-check may need
# for the GPU machines' Python 3.12 on x86_64
gpu-wheels:
	python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
		-d .gpu_wheels pyyaml pydantic rich pytest setuptools wheel

clean:
	rm -rf $(VENV) runs build *.egg-info
