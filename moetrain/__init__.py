"""moetrain: distributed training for Mixture-of-Experts and large transformers on PyTorch.

The repository's top-level folders install as subpackages of this one import name:
``moetrain.dist`` (runtime), ``moetrain.moe`` (MoE layer), ``moetrain.parallel`` (model parallelism),
``moetrain.launch`` (CLI and launchers) and ``moetrain.models`` (model families).
"""

__version__ = "0.1.0"
