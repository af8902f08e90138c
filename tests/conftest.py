"""Shared fixtures: reusable pools of simulated gloo ranks, GPU skipping."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

from moetrain.launch.local import LocalRanks

# Ray started by tests (local instances, ray.cluster_utils.Cluster) binds 127.0.0.1 only; Ray reads this
# when it is first imported.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
for _k, _v in (("RAY_DISABLE_WORKER_LOG_PREFIX", "1"), ("RAY_COLOR_PREFIX", "0"), ("RAY_DEDUP_LOGS", "0")):
    os.environ.setdefault(_k, _v)  # what the Ray launcher sets before Ray is imported (one "[rank r]" prefix)

# Ray keeps each session's logs and sockets under $RAY_TMPDIR/ray (default /tmp/ray) after it ends: the tests'
# sessions go to a directory of their own, removed when the run ends (a short path: Ray's sockets live there)
if "RAY_TMPDIR" not in os.environ:
    os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="moetrain-ray-", dir="/tmp")
    _RAY_TMPDIR = os.environ["RAY_TMPDIR"]
else:
    _RAY_TMPDIR = None


def pytest_sessionfinish(session, exitstatus):
    if _RAY_TMPDIR is not None:
        shutil.rmtree(_RAY_TMPDIR, ignore_errors=True)


_POOLS: dict[tuple[int, int], LocalRanks] = {}


@pytest.fixture(scope="session")
def ranks():
    """``ranks(world, ranks_per_node=None)`` returns a started pool of gloo ranks, reused across tests."""

    def get(world: int, ranks_per_node: int | None = None) -> LocalRanks:
        key = (world, ranks_per_node or world)
        pool = _POOLS.get(key)
        if pool is None:
            pool = _POOLS[key] = LocalRanks(world, ranks_per_node=key[1], timeout=180)
        return pool

    yield get
    for pool in _POOLS.values():
        pool.close()
    _POOLS.clear()


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="also run the tests marked slow")


def pytest_collection_modifyitems(config, items):
    import torch

    skips = []
    if not config.getoption("--run-slow"):
        skips.append(("slow", pytest.mark.skip(reason="slow: run with --run-slow")))
    if not torch.cuda.is_available():
        skips.append(("gpu", pytest.mark.skip(reason="needs a CUDA device")))
    for item in items:
        for keyword, skip in skips:
            if keyword in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def shipped_overrides(tmp_path_factory):
    """Per shipped config, overrides pointing the inputs it names at local stand-ins (tests/helpers/shipped.py)."""
    from tests.helpers.shipped import shipped_inputs

    return shipped_inputs(tmp_path_factory.mktemp("shipped"))
