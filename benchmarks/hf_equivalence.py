"""Per Hugging Face family, the largest relative difference between moetrain's float64 logits and transformers'
(its float32 down-casts removed, tests/helpers/hf_models.py) at each layout: serial, tp2, tp2 with SP, ep2
(MoE families) and pp2, with weights from ``checkpoint.init_from`` on a tiny random model of the family.

    python benchmarks/hf_equivalence.py        # needs transformers (a test dependency); a table for RESULTS.md
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    from moetrain.launch.local import LocalRanks
    from tests.helpers.hf_models import FAMILIES, MOE_FAMILIES, hf_logits, make_hf_model, sample_ids
    from tests.test_hf import LAYOUTS, SEQ, _layout, _logits, _overrides

    tmp = Path(tempfile.mkdtemp(prefix="hf_equivalence-"))
    dirs = {f: make_hf_model(f, tmp / f, seed=i) for i, f in enumerate(FAMILIES)}
    pools = {1: LocalRanks(1, timeout=300), 2: LocalRanks(2, ranks_per_node=2, timeout=300)}
    rows = []
    try:
        for fam in FAMILIES:
            ids = sample_ids(2, SEQ, 96)
            ref = hf_logits(dirs[fam], ids)
            row = [fam]
            for name, (world, par) in LAYOUTS.items():
                if name == "ep2" and fam not in MOE_FAMILIES:
                    row.append("n/a")
                    continue
                got = pools[world].run(_logits, _overrides(dirs[fam], _layout(world, **par), str(tmp / "run")), ids)[0]
                row.append(f"{float((got - ref).abs().max() / ref.abs().max()):.1e}")
            rows.append(row)
    finally:
        for p in pools.values():
            p.close()
    print("| family | " + " | ".join(LAYOUTS) + " |")
    print("|---" * (len(LAYOUTS) + 1) + "|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
