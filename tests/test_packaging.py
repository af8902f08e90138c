"""The wheel installs one import name, ``moetrain``, with the repository folders as its subpackages."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    src = out / "src"  # a copy: setuptools builds in the source tree (build/, *.egg-info)
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", "build", "runs", "*.egg-info",
                                                             "__pycache__", ".*_cache", ".hypothesis"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(src),
                    "-w", str(out)], check=True, capture_output=True, timeout=300)
    (whl,) = out.glob("moetrain-*.whl")
    return whl


def test_wheel_has_only_the_moetrain_top_level_and_ships_the_cuda_sources(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"moetrain"}
    for sub in ("dist/topology.py", "moe/layer.py", "parallel/model.py", "launch/cli.py", "models/__init__.py",
                "csrc/moe_kernels.cu", "csrc/flash_attn.cu"):
        assert f"moetrain/{sub}" in names, sub


def test_installed_wheel_imports_through_moetrain_and_nothing_else(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    probe = ("import importlib.util as u, moetrain, moetrain.launch.cli, moetrain.dist.topology, "
             "moetrain.parallel.cuda_ext as c\n"
             "print(moetrain.launch.cli.__file__)\n"
             "print(c.CSRC.joinpath('moe_kernels.cu').is_file())\n"
             "print([n for n in ('dist', 'moe', 'parallel', 'launch', 'models') if u.find_spec(n)])\n")
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120, check=True).stdout.splitlines()
    assert out[0].startswith(str(target))
    assert out[1] == "True"
    assert out[2] == "[]"
