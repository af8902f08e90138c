# Quick start:  make demo   (set up .venv, run an MoE training job on 8 simulated CPU ranks)
#               make test   (set up .venv, run the test suite)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.moetrain-installed
# torch 2.13.0 is installed first (a local CPU wheel here); --no-build-isolation keeps packages that
# build against torch (deepspeed) from pulling a second, CUDA torch into an isolated build env.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo test lint clean gpu-check

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

# On a CUDA machine whose python3 has torch (no venv needed): install moetrain (no dependencies), the GPU
# tests, then the GPU benchmarks
# (the last two, the MoE layer against DeepSpeed-MoE, also need deepspeed).
gpu-check:
	python3 -m pip install -q --no-deps --no-build-isolation -e .
	python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels.py tests/test_attention.py
	python3 benchmarks/kernels.py
	python3 benchmarks/attention.py --seqs 1024,4096,16384
	python3 benchmarks/moe_layer.py --device cuda --dtype bfloat16 --tokens 4096 --iters 9
	python3 benchmarks/moe_layer.py --device cuda --dtype bfloat16 --tokens 4096 --iters 9 --kernels fused

clean:
	rm -rf $(VENV) runs build *.egg-info
