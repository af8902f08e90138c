"""The per-rank job body. Until the training loop lands this runs a collective smoke job."""

from __future__ import annotations

import time
from typing import Any

from dist.groups import ParallelGroups
from dist.smoke import check_group_collectives
from launch.config import JobConfig


def train(cfg: JobConfig, groups: ParallelGroups) -> dict[str, Any]:
    """Check every group's collectives and return a summary in the ``--summary`` format (no steps)."""
    t0 = time.perf_counter()
    check_group_collectives(groups)
    if groups.rank == 0:
        print(f"[moetrain] collective smoke job: all {len(groups.members)} group families verified on "
              f"{cfg.world_size} ranks (no training loop in this build)", flush=True)
    return {
        "steps": 0,
        "losses": [],
        "final_loss": None,
        "tokens_per_s": 0.0,
        "world_size": cfg.world_size,
        "layout": {"tp": cfg.parallel.tp, "pp": cfg.parallel.pp, "ep": cfg.parallel.ep, "dp": cfg.dp},
        "restarts": 0,
        "elapsed_s": time.perf_counter() - t0,
    }
