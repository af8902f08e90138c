"""Extension points and seams: a user's router, dispatch algorithm and model family plug in by name or
import path, with no change to the layer or the trainer; errors and failures are classified by type."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from moetrain.config import ConfigError, MoEConfig, load_config
from moetrain.errors import UserError
from moetrain.models.llama import LlamaSpec
from moetrain.moe.dispatch import Counts, Step
from moetrain.moe.routers import TopKRouter
from moetrain.registry import ROUTERS, Registry

# ------------------------------------------------------------------------------ the user's parts
BUILT: list[str] = []


class ReversedTopK(TopKRouter):
    """A user's router: top-k of the reversed logits (the least likely experts), gates renormalised."""

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        return -super().logits(x_TD)


def flat_reversed_then_restored(k: Counts) -> list[Step]:
    """A user's dispatch algorithm: the flat all-to-all with the rows of every destination reversed before
    sending and put back in order on arrival (same bytes, the receive buffer flat delivers)."""
    c, me, n = k.c, k.me, k.members
    send, recv = [c[me][d] for d in range(n)], [c[s][me] for s in range(n)]

    def reversed_segments(sizes: list[int]) -> torch.Tensor:
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        parts = [torch.arange(a + m - 1, a - 1, -1) for a, m in zip(starts, sizes)]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)

    return [Step("perm", index=reversed_segments(send)), Step("a2a", k.ep_group, send, recv),
            Step("perm", index=reversed_segments(recv))]


class CountingLlama(LlamaSpec):
    """A user's model family: the llama family, recording that the trainer built it through the spec."""

    name = "counting_llama"

    def build(self, ctx):
        BUILT.append(self.name)
        return super().build(ctx)


# ------------------------------------------------------------------------------ registry
def test_registry_names_register_and_import_paths():
    reg: Registry = Registry("thing.kind", {"builtin": "moetrain.moe.routers:TopKRouter"})
    assert "builtin" in reg and "tests.test_plugins:ReversedTopK" in reg and "nope" not in reg
    assert reg.get("builtin") is TopKRouter
    assert reg.get("tests.test_plugins:ReversedTopK") is ReversedTopK
    reg.register("mine", ReversedTopK)
    assert reg.get("mine") is ReversedTopK and "mine" in reg.names()
    with pytest.raises(ValueError, match="already registered"):
        reg.register("builtin", ReversedTopK)
    assert "expected one of 'builtin', 'mine'" in reg.check("nope")
    with pytest.raises(ValueError, match="cannot import 'tests.test_plugins:Missing'"):
        reg.get("tests.test_plugins:Missing")


def test_config_names_unknown_plugins_with_the_known_ones():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["moe.num_experts=4", "moe.router=top_k"])
    assert info.value.path == "moe.router" and "'topk'" in info.value.reason
    with pytest.raises(ConfigError) as info:
        load_config(None, ["model.family=gpt"])
    assert info.value.path == "model.family" and "'llama'" in info.value.reason
    cfg = load_config(None, ["moe.num_experts=4", "moe.router=tests.test_plugins:ReversedTopK"])
    assert cfg.moe.router == "tests.test_plugins:ReversedTopK"


def test_a_users_router_plugs_into_the_layer_by_name():
    from moetrain.moe.layer import MoEGroups, MoELayer

    ROUTERS.register("reversed_topk_test", ReversedTopK)
    x = torch.randn(8, 2, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    outs = {}
    for name in ("topk", "reversed_topk_test"):
        layer = MoELayer(MoEConfig(num_experts=4, topk=1, d_expert=8, router=name), 0, MoEGroups(), d_model=16,
                         sp=False, dtype=torch.float64)
        assert type(layer.router).__name__ == ("TopKRouter" if name == "topk" else "ReversedTopK")
        outs[name] = layer.gate(x.view(16, 16), 2).expert_A
    assert not torch.equal(outs["topk"], outs["reversed_topk_test"])  # it routes elsewhere: its own rule ran


def _dispatch_equal(algo: str) -> bool:
    from moetrain.dist.groups import create_groups
    from moetrain.dist.topology import Layout, build_rank_grid
    from moetrain.moe.dispatch import build_plan, exchange_counts

    world, me = dist.get_world_size(), dist.get_rank()
    g = create_groups(build_rank_grid(Layout(dp=world, ep=world), ranks_per_node=world))
    counts_E = torch.tensor([(3 * me + 5 * e) % 7 for e in range(2 * world)])
    rows = torch.arange(int(counts_E.sum()), dtype=torch.float64).unsqueeze(1) + 1000 * me
    counts = exchange_counts(counts_E, g.group("ep"))
    got = {}
    for name in ("flat", algo):
        plan = build_plan(name, counts, me, local_experts=2, ep_group=g.group("ep"), ranks_per_node=world)
        x = rows.clone().requires_grad_()
        recv = plan.dispatch(x)
        plan.combine(recv * 3.0).sum().backward()
        got[name] = (recv.detach(), x.grad)
    return all(torch.equal(a, b) for a, b in zip(got["flat"], got[algo]))


def test_a_users_dispatch_algorithm_plugs_in_by_import_path(ranks):
    assert all(ranks(2, 2).run(_dispatch_equal, "tests.test_plugins:flat_reversed_then_restored"))


def _train_family(family: str) -> dict:
    from moetrain.launch.job import setup_groups
    from moetrain.launch.trainer import Trainer

    cfg = load_config(None, ["model.family=" + family, "model.layers=2", "model.d_model=32", "model.seq_len=16",
                             "moe.num_experts=4", "train.steps=2", "train.dtype=float64", "logging.every=100",
                             "cluster.ranks_per_node=2", "parallel.ep=2"])
    out = Trainer(cfg, setup_groups(cfg)).fit()
    return {"losses": out["losses"], "built": list(BUILT)}


def test_a_second_family_trains_without_trainer_changes(ranks):
    pool = ranks(2, 2)
    base = pool.run(_train_family, "llama")[0]
    mine = pool.run(_train_family, "tests.test_plugins:CountingLlama")[0]
    assert mine["built"] == ["counting_llama"] and base["built"] == []
    assert mine["losses"] == base["losses"]


# ------------------------------------------------------------------------------ seams
def test_user_errors_share_one_base():
    from moetrain.dist.checkpoint import CheckpointError
    from moetrain.dist.env import LaunchEnvError
    from moetrain.launch.data import DataError
    from moetrain.launch.faults import TrainError
    from moetrain.launch.rank import JobError
    from moetrain.moe.kernels import KernelError

    for cls in (ConfigError, CheckpointError, LaunchEnvError, DataError, TrainError, JobError, KernelError):
        assert issubclass(cls, UserError), cls


def test_collective_failures_are_recognised_by_type_not_words():
    from moetrain.launch.faults import InjectedFault, TrainError, is_comm_failure

    gloo = RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error: Connection reset")
    assert is_comm_failure(gloo)
    assert is_comm_failure(dist.DistBackendError("NCCL communicator was aborted"))
    chained = RuntimeError("communication step failed: ...")
    chained.__cause__ = gloo
    assert is_comm_failure(chained)
    for other in (RuntimeError("the peer socket connection timed out in my own code"), TrainError("x"),
                  InjectedFault("gloo"), ValueError("/gloo/")):
        assert not is_comm_failure(other), other


def test_init_distributed_picks_nccl_for_cuda_and_says_when_there_is_none():
    from moetrain.dist.env import LaunchEnvError, backend_for, from_env, init_distributed

    assert backend_for("cuda") == "nccl" and backend_for("cpu") == "gloo"
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    env = from_env({"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"})
    with pytest.raises(LaunchEnvError, match="cluster.device=cuda but rank 0 sees no CUDA device"):
        init_distributed(env, "cuda", timeout_s=1)
    assert not dist.is_initialized()
