"""The model spec's facts (parameters, FLOPs per token) against independent counts.

Parameters: the logical tensors of a model actually built (every rank's shards gathered, vocabulary
padding dropped), block by block. FLOPs: two small MoE configs derived by hand in the comments. And the
trainer's MFU denominator is those FLOPs (it used to count a dense MLP in place of the experts).
"""

from __future__ import annotations

import pytest

from moetrain.config import load_config
from moetrain.models.spec import get_model_spec

SMALL = ["model.layers=3", "model.d_model=32", "model.heads=4", "model.kv_heads=2", "model.d_ffn=48",
         "model.vocab_size=100", "model.seq_len=16", "train.micro_batch_size=2", "data.source=synthetic"]
MOE = ["moe.num_experts=4", "moe.topk=2", "moe.d_expert=24"]
CASES = {
    "dense": [],
    "dense tied": ["model.tie_embeddings=true"],
    "moe swiglu every 2": MOE + ["moe.every=2"],
    "moe gelu shared": MOE + ["moe.activation=gelu", "moe.shared_experts=2"],
    "moe xmoe": MOE + ["moe.router=xmoe", "moe.xmoe_dim=8"],
    "moe softmoe": MOE + ["moe.router=softmoe", "moe.slots_per_expert=2"],
    "moe sigmoid switch-like": MOE + ["moe.router=sigmoid", "moe.topk=1", "moe.shared_experts=1"],
}


def _counts(overrides: list[str]) -> dict[str, int]:
    """Logical parameter counts of the model as built, by block (collective; rank 0 returns them)."""
    import torch.distributed as dist

    from moetrain.launch.job import setup_groups
    from moetrain.launch.trainer import Trainer

    cfg = load_config(None, SMALL + overrides)
    tensors = Trainer(cfg, setup_groups(cfg)).full_tensors()
    out: dict[str, int] = {}
    for name, t in tensors.items():
        key = f"layer{name.split('.')[1]}" if name.startswith("layers.") else name
        out[key] = out.get(key, 0) + t.numel()
    return out if dist.get_rank() == 0 else None


@pytest.mark.parametrize("layout", [[], ["cluster.ranks_per_node=2", "parallel.tp=2", "parallel.ep=2"]],
                         ids=["serial", "tp2-ep2"])
def test_parameter_counts_equal_the_built_model(ranks, layout):
    cases = {name: o + (layout if "moe" in name else layout[:2]) for name, o in CASES.items()}
    pool = ranks(2 if layout else 1, 2 if layout else 1)
    for name, overrides in cases.items():
        built = pool.run(_counts, overrides)[0]
        facts = get_model_spec(load_config(None, SMALL + overrides)).facts()
        assert [f.params for f in facts.layers] == [built[f"layer{i}"] for i in range(3)], name
        assert facts.embedding_params == built["embed.weight"], name
        assert facts.head_params == built.get("head.weight", 0), name
        assert facts.final_norm_params == built["norm.weight"], name
        assert facts.total_params == sum(built.values()), name


def test_flops_per_token_by_hand_top1():
    # 2 MoE layers, d 32, 4 heads of 8, 2 kv heads, 4 SwiGLU experts of 48, top-1, vocab 100, seq 16.
    # per layer: q 32*32 + k, v 2*(32*16) + out 32*32 = 3072; router 4*32 = 128; one expert 3*32*48 = 4608
    # matmul weights per token: 2 * (3072 + 128 + 4608) + LM head 100*32 = 18816 -> 6 * 18816 = 112896
    # attention scores: 12 * seq 16 * d 32 per layer = 6144, x2 = 12288           -> total 125184
    cfg = load_config(None, ["model.layers=2", "model.d_model=32", "model.heads=4", "model.kv_heads=2",
                             "model.vocab_size=100", "model.seq_len=16", "moe.num_experts=4", "moe.topk=1",
                             "moe.d_expert=48"])
    facts = get_model_spec(cfg).facts()
    assert facts.flops_per_token == 125184
    # active parameters: 2 * (3072 + 2 norms * 32 + 128 + 4608) + embedding 3200 + head 3200 + final norm 32
    assert facts.active_params == 2 * (3072 + 64 + 128 + 4608) + 3200 + 3200 + 32


def test_flops_per_token_by_hand_top2_with_a_shared_expert():
    # layer 0 dense (every=2), layer 1 MoE: d 32, 4 heads, 4 kv heads, d_ffn 64, 4 GELU experts of 16, top-2,
    # one shared SwiGLU expert of 16, tied embeddings, vocab 64, seq 8.
    # attention projections 4 * 32*32 = 4096; dense MLP 3*32*64 = 6144             -> layer 0: 10240
    # layer 1: 4096 + router 4*32 = 128 + 2 experts * (2*32*16 = 1024) + shared 3*32*16 = 1536 -> 7808
    # LM head (tied, still a matmul) 64*32 = 2048; 6 * (10240 + 7808 + 2048) = 120576
    # attention scores 12 * 8 * 32 * 2 layers = 6144                                  -> total 126720
    cfg = load_config(None, ["model.layers=2", "model.d_model=32", "model.heads=4", "model.d_ffn=64",
                             "model.vocab_size=64", "model.seq_len=8", "model.tie_embeddings=true",
                             "moe.num_experts=4", "moe.topk=2", "moe.every=2", "moe.d_expert=16",
                             "moe.activation=gelu", "moe.shared_experts=1"])
    facts = get_model_spec(cfg).facts()
    assert facts.flops_per_token == 126720
    # parameters: embedding 2048 (no head), final norm 32, layer 0 4096 + 64 + 6144, layer 1 4096 + 64 +
    # 4 experts * 1024 + 128 + 1536; active: layer 1 with 2 of the 4 experts
    assert facts.total_params == 2048 + 32 + (4096 + 64 + 6144) + (4096 + 64 + 4 * 1024 + 128 + 1536)
    assert facts.active_params == 2048 + 32 + (4096 + 64 + 6144) + (4096 + 64 + 2 * 1024 + 128 + 1536)


def _mfu_inputs(overrides: list[str]) -> dict:
    from moetrain.launch.job import setup_groups
    from moetrain.launch.trainer import Trainer

    cfg = load_config(None, overrides)
    out = Trainer(cfg, setup_groups(cfg)).fit()
    return {"flops": out["model_flops_per_token"], "mfu": out["mfu"], "tps": out["tokens_per_s"],
            "peak": out["peak_flops_per_rank"], "world": out["world_size"]}


def test_trainer_mfu_counts_the_routed_experts(ranks):
    """MFU's model FLOPs are the spec's: top-2 of the experts plus router and shared expert, not d_ffn."""
    overrides = ["model.layers=2", "model.d_model=32", "model.heads=4", "model.d_ffn=64", "model.vocab_size=64",
                 "model.seq_len=8", "model.tie_embeddings=true", "moe.num_experts=4", "moe.topk=2", "moe.every=2",
                 "moe.d_expert=16", "moe.activation=gelu", "moe.shared_experts=1", "train.steps=3",
                 "cluster.ranks_per_node=2", "parallel.ep=2", "logging.every=1000"]
    got = ranks(2, 2).run(_mfu_inputs, overrides)[0]
    assert got["flops"] == 126720  # the hand count above
    assert got["mfu"] == pytest.approx(got["tps"] * 126720 / got["world"] / got["peak"], rel=1e-12)


def test_public_api_builds_the_model_in_one_process():
    """``import moetrain``: load a config, count it, build it without torch.distributed, run a step."""
    import torch

    import moetrain

    cfg = moetrain.load_config(None, SMALL + MOE + ["moe.shared_experts=1", "train.dtype=float64"])
    model = moetrain.build_model(cfg)
    built = sum(t.numel() for t in model.full_tensors().values())
    assert built == moetrain.model_facts(cfg).total_params
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    loss = model(ids, ids)
    loss.backward()
    assert loss.dtype == torch.float64 and all(p.grad is not None for p in model.parameters())
    with pytest.raises(ValueError, match="one rank"):
        moetrain.build_model(moetrain.load_config(None, ["cluster.ranks_per_node=2"]))
