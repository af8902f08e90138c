"""``moetrain generate``: sample from a trained model with a KV cache, at the config's tensor-parallel degree.

The model is built as one pipeline stage, without expert or data parallelism and without sequence
parallelism (tp ranks on this machine; one process at tp=1), with dropless routing; its weights come
from the newest checkpoint in ``checkpoint.dir`` (``checkpoint.resume``) or from ``checkpoint.init_from``
(an HF directory or a moetrain checkpoint), resharded to this layout. Greedy unless a temperature is
given; sampling draws from one seeded generator that every TP rank advances alike (their logits are
gathered, identical), so the ranks agree on every token.
"""

from __future__ import annotations

from typing import Any

import torch

from moetrain.config import JobConfig
from moetrain.errors import UserError

__all__ = ["generate", "generation_config", "GenerateError"]


class GenerateError(UserError):
    """Generation cannot run as asked (named)."""


def generation_config(cfg: JobConfig) -> list[str]:
    """Overrides that turn a job config into its generation layout."""
    tp = cfg.parallel.tp
    return [f"parallel.tp={tp}", "parallel.pp=1", "parallel.vpp=1", "parallel.schedule=1f1b", "parallel.ep=1",
            "parallel.etp=1", "parallel.dp=1", "parallel.sp=false", "parallel.pipeline_layers=null",
            "cluster.launcher=local", "cluster.nodes=1", f"cluster.ranks_per_node={tp}", "moe.capacity_factor=null",
            "moe.pipeline_degree=1", "moe.bwd_pipeline_degree=1", "train.micro_batch_size=1",
            "train.global_batch_size=1", "train.optimizer.zero_stage=0", "train.optimizer.offload=none",
            "network.simulate=false", "network.isolation=none", "fault.max_restarts=0"]


def _pick(logits_V: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> int:
    if temperature <= 0:
        return int(torch.argmax(logits_V))
    probs = torch.softmax(logits_V.double() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < top_p  # the smallest prefix whose mass reaches top_p
        probs = torch.zeros_like(probs).index_put_((order[keep],), sorted_p[keep])
    return int(torch.multinomial(probs / probs.sum(), 1, generator=gen))


def _rank_generate(cfg_data: dict, prompt: list[int], max_new: int, temperature: float, top_p: float, seed: int,
                   stop_id: int | None) -> dict[str, Any]:
    import torch.distributed as dist

    from moetrain.config import config_from_dict
    from moetrain.dist.env import rank_device
    from moetrain.launch.checkpointing import RunCheckpoints
    from moetrain.launch.rank import setup_groups
    from moetrain.models.spec import BuildContext, get_model_spec
    from moetrain.moe.runtime import MoERuntime
    from moetrain.parallel.model import KVCache

    cfg = config_from_dict(cfg_data, check=False, hf=False)
    groups = setup_groups(cfg)
    device = rank_device(cfg.cluster.device)
    dtype = torch.float64 if cfg.train.dtype == "float64" else torch.float32
    spec = get_model_spec(cfg)
    model = spec.build(BuildContext(groups, device, dtype, tuple(spec.stage_layers()), MoERuntime()))[0]
    source = RunCheckpoints(cfg, spec, [model], None, device=device, rank=groups.global_rank,
                            say=lambda m: None).load_weights_only()
    if source is None:
        raise GenerateError("moetrain generate needs weights: a checkpoint in checkpoint.dir or checkpoint.init_from")
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    cache = KVCache()
    ids = list(prompt)
    logits = model.decode(torch.tensor([prompt], device=device), cache)[0, -1]
    new: list[int] = []
    for _ in range(max_new):
        nxt = _pick(logits.cpu(), temperature, top_p, gen)
        new.append(nxt)
        ids.append(nxt)
        if stop_id is not None and nxt == stop_id:
            break
        logits = model.decode(torch.tensor([[nxt]], device=device), cache)[0, -1]
    return {"ids": ids, "new_ids": new, "source": source, "rank": dist.get_rank()}


def generate(cfg: JobConfig, prompt: list[int], *, max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, stop_id: int | None = None) -> dict[str, Any]:
    """Tokens after ``prompt`` (ids), from ``cfg`` at its generation layout (:func:`generation_config`)."""
    from moetrain.launch.local import LocalRanks

    if not prompt:
        raise GenerateError("the prompt is empty")
    if max_new_tokens < 1:
        raise GenerateError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise GenerateError(f"--temperature must be >= 0 and --top-p in (0, 1], got {temperature}, {top_p}")
    bad = [i for i in prompt if not 0 <= i < cfg.model.vocab_size]
    if bad:
        raise GenerateError(f"prompt id {bad[0]} is outside the vocabulary (model.vocab_size={cfg.model.vocab_size})")
    data = cfg.model_dump(mode="json")
    with LocalRanks(cfg.world_size, ranks_per_node=cfg.world_size, device=cfg.cluster.device, timeout=None) as pool:
        return pool.run(_rank_generate, data, prompt, max_new_tokens, temperature, top_p, seed, stop_id)[0]
