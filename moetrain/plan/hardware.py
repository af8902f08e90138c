"""Hardware files: what the planner knows about a device, its node and its links.

A hardware file is YAML (``cluster_configs/hardware/*.yaml``; ``moetrain plan --calibrate`` writes one for
this machine). Rates are per device: ``peak_tflops`` by dtype (dense, no sparsity), the fraction of it that
large GEMMs reach (``gemm_efficiency``) and a per-call overhead (``gemm_launch_us``), HBM bandwidth for the
memory-bound ops, and two link classes: ``intra`` (inside a node) and ``inter`` (between nodes), each a
latency and the bandwidth one device gets in one direction.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from moetrain.errors import UserError

__all__ = ["Hardware", "Link", "load_hardware", "hardware_names", "HARDWARE_DIRS"]

HARDWARE_DIRS = (Path("cluster_configs/hardware"), Path(__file__).resolve().parents[2] / "cluster_configs" / "hardware")
"""Where ``--hardware NAME`` looks: the current directory's cluster_configs, then the source tree's."""


@dataclass(frozen=True)
class Link:
    latency_us: float
    bandwidth_gbps: float
    """Gigabytes per second per device, one direction (what nccl-tests calls bus bandwidth)."""

    def time(self, nbytes: float, steps: int = 1) -> float:
        """Seconds to move ``nbytes`` in ``steps`` latency-bound rounds."""
        return steps * self.latency_us * 1e-6 + nbytes / (self.bandwidth_gbps * 1e9)


@dataclass(frozen=True, eq=False)
class Hardware:
    name: str
    device_memory_gib: float
    reserved_gib: float
    """Device memory the job cannot use: CUDA context, communicator buffers, allocator fragmentation."""
    devices_per_node: int
    peak_tflops: dict[str, float]
    """Dense peak by dtype name (bfloat16, float32, float64)."""
    gemm_efficiency: float
    gemm_launch_us: float
    hbm_gbps: float
    attention_efficiency: float
    """Fraction of the bf16 peak a fused attention kernel reaches (forward; backward is 2.5x the work)."""
    intra: Link
    inter: Link
    host_copy_gbps: float = 25.0
    host_adam_gparams_per_s: float = 1.0
    """CPU AdamW update rate (billions of parameters per second) for optimizer offload."""
    gemm_bytes_gbps: float = 0.0
    """Calibrated CPUs: GEMM time is ``launch + flops / rate + operand bytes / gemm_bytes_gbps`` (additive: skinny
    GEMMs are slower than their FLOPs); 0 (GPU files): the roofline ``launch + max(flops / rate, bytes / hbm)``."""
    optimizer_ns_per_param: float = 0.0
    """Measured AdamW step per parameter (``--calibrate``); 0: modeled as 7 passes over float32 state at HBM rate."""
    grad_norm_ns_per_param: float = 0.0
    """Measured gradient-norm pass per parameter; 0: one float32 read at HBM rate."""
    moe_route_ns_per_element: float = 0.0
    """Calibrated: what moetrain's MoE routing, packing and combining cost beyond the modeled traffic, per routed
    row and model dimension (forward + backward); 0 in GPU files."""
    shared_node_slowdown: float = 1.0
    """Calibrated CPUs: how much slower a rank computes when the node's other ranks compute too (shared memory
    bandwidth and caches, the collectives' threads); applied when a node runs more than one rank. 1 on GPUs."""
    elementwise_factor: float = 1.0
    """Calibrated CPUs: the per-block elementwise traffic (norms, RoPE, activation functions, residual adds and
    their backward; modeled as passes over a block's saved activations at ``hbm_gbps``) times this factor, fitted
    on a dense reference model's forward + backward by ``--calibrate``. 1 in GPU files."""
    shared_node_memory_slowdown: float = 1.0
    """Calibrated CPUs: the same for memory-bound work (optimizer step, gradient norm, elementwise passes), which
    the ranks' shared memory bus slows far more than GEMMs. 1 on GPUs."""
    host_overhead_us: dict[str, float] = field(default_factory=dict)
    """moetrain's host time that does not overlap device work: per micro-batch ``dense_block``, ``moe_block``,
    ``model`` (embedding, head, loss) and per optimizer ``step``. Measured by ``--calibrate`` on CPU; absent
    (0) in GPU files, where kernels are issued ahead of the device and the host time hides behind it."""
    source: str = ""
    extra: dict = field(default_factory=dict)

    def overhead(self, key: str) -> float:
        return float(self.host_overhead_us.get(key, 0.0)) * 1e-6

    @property
    def usable_bytes(self) -> float:
        return (self.device_memory_gib - self.reserved_gib) * 2**30

    def peak_flops(self, dtype: str) -> float:
        key = "bfloat16" if dtype == "bfloat16" else dtype
        if key not in self.peak_tflops:
            raise UserError(f"hardware {self.name!r} gives no peak_tflops for {key}")
        return self.peak_tflops[key] * 1e12

    def to_yaml(self) -> str:
        data = asdict(self)
        data.pop("extra")
        return yaml.safe_dump(data, sort_keys=False)


_REQUIRED = ("name", "device_memory_gib", "reserved_gib", "devices_per_node", "peak_tflops", "gemm_efficiency",
             "gemm_launch_us", "hbm_gbps", "attention_efficiency", "intra", "inter")


def hardware_names() -> list[str]:
    names = set()
    for d in HARDWARE_DIRS:
        if d.is_dir():
            names.update(p.stem for p in d.glob("*.yaml"))
    return sorted(names)


def load_hardware(name_or_file: str) -> Hardware:
    """A hardware file by path, or by name from :data:`HARDWARE_DIRS`; errors name the file and the key."""
    path = Path(name_or_file)
    if not path.is_file():
        for d in HARDWARE_DIRS:
            if (d / f"{name_or_file}.yaml").is_file():
                path = d / f"{name_or_file}.yaml"
                break
        else:
            raise UserError(f"hardware {name_or_file!r}: no such file, and not a known name "
                            f"(known: {', '.join(hardware_names()) or 'none'})")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of hardware facts")
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        raise UserError(f"{path}: missing {', '.join(missing)}")
    known = set(Hardware.__dataclass_fields__)
    unknown = sorted(set(data) - known)
    if unknown:
        raise UserError(f"{path}: unknown key(s) {', '.join(unknown)}")
    try:
        links = {k: Link(float(data[k]["latency_us"]), float(data[k]["bandwidth_gbps"])) for k in ("intra", "inter")}
        hw = Hardware(**{**data, **links, "peak_tflops": {str(k): float(v) for k, v in data["peak_tflops"].items()},
                         "reserved_gib": float(data.get("reserved_gib", 0.0)),
                         "host_overhead_us": {str(k): float(v)
                                              for k, v in (data.get("host_overhead_us") or {}).items()}})
    except (TypeError, KeyError, ValueError) as exc:
        raise UserError(f"{path}: bad value ({exc})") from None
    for key in ("device_memory_gib", "gemm_efficiency", "hbm_gbps", "devices_per_node"):
        if not float(getattr(hw, key)) > 0:
            raise UserError(f"{path}: {key} must be > 0")
    return hw
