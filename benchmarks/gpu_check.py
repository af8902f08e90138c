"""The first GPU run in one command: build the extensions once, run the GPU tests and the three GPU
benchmarks, and write one results file to paste into benchmarks/RESULTS.md.

    python benchmarks/gpu_check.py [--out runs/gpu_check.md] [--budget-s 540]

Steps (each with its own time limit, all within ``--budget-s``; a failed step is recorded and the next runs):
0. what the checks import and the GPU machine may lack (pyyaml, pydantic, rich, pytest; setuptools and wheel
   to install moetrain itself), from the wheels in ``.gpu_wheels/`` (``make gpu-wheels`` downloads them on a
   machine with a package registry; the device run carries that folder, as nothing can be fetched there), then
   moetrain itself (editable, no dependencies);
1. the machine: device name and count, torch and CUDA versions, nvcc;
2. building the csrc extensions (MoE kernels, attention) and their start-up self-checks, with build times;
3. ``pytest -m gpu tests/test_kernels.py tests/test_attention.py``: pass / fail per test;
4. ``benchmarks/kernels.py`` (routing, packing, combine vs torch), ``benchmarks/attention.py`` (the fused
   kernel vs SDPA's flash backend), ``benchmarks/moe_layer.py`` (moetrain's MoE layer, torch and fused stages,
   vs DeepSpeed-MoE when deepspeed imports).
Without a CUDA device it stops at once with exit code 2 and says so (nothing is installed, built or run); when
what it needs cannot be installed, exit code 3 with the reason.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = [
    ("MoE kernels vs torch", [sys.executable, "benchmarks/kernels.py"], 90),
    ("fused attention vs SDPA (flash backend)",
     [sys.executable, "benchmarks/attention.py", "--seqs", "1024,4096,16384"], 150),
    ("MoE layer, torch stages (bf16)", [sys.executable, "benchmarks/moe_layer.py", "--device", "cuda", "--dtype",
                                        "bfloat16", "--tokens", "4096", "--iters", "9"], 90),
    ("MoE layer, fused stages (bf16)", [sys.executable, "benchmarks/moe_layer.py", "--device", "cuda", "--dtype",
                                        "bfloat16", "--tokens", "4096", "--iters", "9", "--kernels", "fused"], 90),
]


WHEELS = ROOT / ".gpu_wheels"
NEEDED = {"yaml": "pyyaml", "pydantic": "pydantic", "rich": "rich", "pytest": "pytest"}  # import -> package


def _pip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", "install", "-q", *args], capture_output=True, text=True,
                          timeout=240, cwd=ROOT)


def prepare() -> tuple[list[str], str | None]:
    """Install what the checks import from ``.gpu_wheels`` (offline), then moetrain; (lines, why it failed)."""
    import importlib.util

    lines = []
    missing = [pkg for mod, pkg in NEEDED.items() if importlib.util.find_spec(mod) is None]
    if missing:
        if not WHEELS.is_dir():
            return lines, (f"missing {', '.join(missing)} and no {WHEELS.name}/ to install them from: run "
                           f"`make gpu-wheels` where a package registry is reachable and carry {WHEELS.name}")
        res = _pip("--no-index", "--find-links", str(WHEELS), *missing)
        if res.returncode:
            return lines, f"installing {', '.join(missing)} from {WHEELS.name}/ failed: {res.stderr.strip()[-400:]}"
        lines.append(f"- installed from {WHEELS.name}/: {', '.join(missing)}")
    probe = [sys.executable, "-c", "import moetrain.moe.kernels, moetrain.parallel.fused_attention"]
    if subprocess.run(probe, capture_output=True, cwd=ROOT, timeout=120).returncode:
        res = _pip("--no-deps", "--no-build-isolation", "-e", ".")
        if res.returncode and WHEELS.is_dir():  # an environment without setuptools / wheel to build with
            _pip("--no-index", "--find-links", str(WHEELS), "setuptools", "wheel")
            res = _pip("--no-deps", "--no-build-isolation", "-e", ".")
        if res.returncode:
            return lines, f"installing moetrain failed: {res.stderr.strip()[-400:]}"
        lines.append("- installed moetrain (editable, no dependencies)")
    return lines, None


def machine() -> tuple[list[str], str | None]:
    """Facts about this machine, and why there is nothing to check (None when there is a CUDA device)."""
    try:
        import torch
    except ImportError:
        return [], f"{sys.executable} cannot import torch (run gpu-check with the Python that holds PyTorch)"

    lines = [f"- torch {torch.__version__}, CUDA runtime {torch.version.cuda}, python {sys.version.split()[0]}"]
    try:
        nvcc = subprocess.run(["nvcc", "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
        lines.append(f"- nvcc: {nvcc.splitlines()[-1] if nvcc else 'not found'}")
    except (OSError, subprocess.TimeoutExpired):
        lines.append("- nvcc: not found")
    if not torch.cuda.is_available():
        return lines, "no CUDA device: torch.cuda.is_available() is False"
    n = torch.cuda.device_count()
    cap = torch.cuda.get_device_capability(0)
    lines.insert(0, f"- device: {n} x {torch.cuda.get_device_name(0)} (sm_{cap[0]}{cap[1]}), "
                    f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
    return lines, None


def build() -> list[str]:
    """Build both extensions (cached for the tests and benchmarks after) and run their self-checks."""
    out = []
    for name, module in (("MoE kernels", "moetrain.moe.kernels"), ("attention", "moetrain.parallel.fused_attention")):
        t0 = time.perf_counter()
        code = (f"import {module} as m, sys; ext = m.load(); "
                f"print('ok' if ext is not None else 'unavailable: ' + str(m._EXT.reason))")
        try:
            res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
            said = (res.stdout.strip().splitlines() or [res.stderr.strip()[-300:]])[-1]
        except subprocess.TimeoutExpired:
            said = "timed out after 300 s"
        out.append(f"- {name}: {said} ({time.perf_counter() - t0:.0f} s, build and self-check)")
    return out


def tests(limit_s: float) -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", f"--junitxml={xml}",
               "tests/test_kernels.py", "tests/test_attention.py"]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=limit_s, cwd=ROOT)
            tail = res.stdout.strip().splitlines()[-1:] or ["(no output)"]
        except subprocess.TimeoutExpired:
            return [f"- timed out after {limit_s:.0f} s"]
        if not xml.exists():
            return [f"- pytest wrote no report: {tail[0]}"]
        rows = ["| test | result |", "|---|---|"]
        for case in ET.parse(xml).getroot().iter("testcase"):
            result = "pass"
            for tag in ("failure", "error", "skipped"):
                node = case.find(tag)
                if node is not None:
                    msg = (node.get("message") or "").replace("|", "/").replace("\n", " ")[:160]
                    result = f"{'FAIL' if tag != 'skipped' else 'skip'}: {msg}"
            rows.append(f"| {case.get('name')} | {result} |")
        return [f"- {tail[0]}", ""] + rows


def benchmark(cmd: list[str], limit_s: float) -> list[str]:
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=limit_s, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return [f"timed out after {limit_s:.0f} s"]
    text = res.stdout.strip().splitlines()
    if res.returncode:
        text += ["", f"exit code {res.returncode}:"] + res.stderr.strip().splitlines()[-15:]
    return text or ["(no output)"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/gpu_check.md", help="the results file (markdown)")
    ap.add_argument("--budget-s", type=float, default=540.0, help="total seconds for every step together")
    a = ap.parse_args()
    t0 = time.perf_counter()
    facts, why_not = machine()
    if why_not:
        print(f"gpu-check: {why_not}; nothing was built or run", file=sys.stderr)
        return 2
    installed, why_not = prepare()
    if why_not:
        print(f"gpu-check: {why_not}", file=sys.stderr)
        return 3
    facts += installed
    left = lambda: a.budget_s - (time.perf_counter() - t0)  # noqa: E731
    lines = [f"# GPU check, {time.strftime('%Y-%m-%d %H:%M')} (`python benchmarks/gpu_check.py`)", "", *facts, "",
             "## Build and self-checks", *build(), "", "## GPU tests"]
    lines += tests(max(min(300.0, left() - 240), 30))
    for title, cmd, limit in BENCHMARKS:
        lines += ["", f"## {title}", f"`{' '.join(c if c != sys.executable else 'python' for c in cmd)}`", ""]
        lines += benchmark(cmd, max(min(limit, left() - 5), 5)) if left() > 10 else ["skipped: out of budget"]
    lines += ["", f"total {time.perf_counter() - t0:.0f} s"]
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nwrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    os.chdir(ROOT)
    sys.exit(main())
