"""The multi-rank harness turns exceptions, hangs and crashes into failures that name the rank."""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist

from moetrain.launch.local import LocalRanks, RankFailure


def _rank_and_sum():
    t = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(t)
    return dist.get_rank(), t.item(), os.environ["NODE_RANK"], os.environ["LOCAL_RANK"]


def _raise_on(rank: int):
    if dist.get_rank() == rank:
        raise ValueError(f"deliberate failure on rank {rank}")
    dist.barrier()  # the others block waiting for the failed rank
    return "unreachable"


def _hang_on(rank: int):
    if dist.get_rank() == rank:
        _sleep_forever()
    return "done"


def _sleep_forever():
    while True:
        time.sleep(0.1)


def _exit_on(rank: int):
    if dist.get_rank() == rank:
        os._exit(7)
    dist.barrier()


def test_results_in_rank_order_with_simulated_nodes():
    with LocalRanks(4, ranks_per_node=2, timeout=60) as pool:
        out = pool.run(_rank_and_sum)
        assert out == [(0, 6.0, "0", "0"), (1, 6.0, "0", "1"), (2, 6.0, "1", "0"), (3, 6.0, "1", "1")]
        # one spawn, many cases: a second call reuses the same processes
        pids = [p.pid for p in pool._procs]
        pool.run(_rank_and_sum)
        assert pids == [p.pid for p in pool._procs]


def test_exception_names_rank_and_shows_traceback_and_pool_recovers(ranks):
    pool = ranks(4, 2)
    with pytest.raises(RankFailure) as info:
        pool.run(_raise_on, 2, timeout=60)
    err = info.value
    assert err.failed_ranks == [2]
    text = str(err)
    assert "--- rank 2: error ---" in text and "deliberate failure on rank 2" in text
    # the blocked ranks are reported with their stacks, naming the barrier they wait in
    hung = [r for r in err.reports if r.state == "hung"]
    assert {r.rank for r in hung} == {0, 1, 3}
    assert all("_raise_on" in r.detail for r in hung)
    # the next case runs on a fresh pool
    assert [x[0] for x in pool.run(_rank_and_sum)] == [0, 1, 2, 3]


def test_hang_times_out_naming_the_rank(ranks):
    pool = ranks(4, 2)
    start = time.monotonic()
    with pytest.raises(RankFailure) as info:
        pool.run(_hang_on, 1, timeout=4)
    assert time.monotonic() - start < 20
    err = info.value
    assert "timed out after 4s" in str(err)
    states = {r.rank: r.state for r in err.reports}
    assert states == {0: "ok", 1: "hung", 2: "ok", 3: "ok"}
    assert "_sleep_forever" in err.reports[1].detail


def test_crashed_rank_is_reported_as_died(ranks):
    pool = ranks(4, 2)
    with pytest.raises(RankFailure) as info:
        pool.run(_exit_on, 3, timeout=60)
    rep = {r.rank: r for r in info.value.reports}
    assert rep[3].state == "died" and "code 7" in rep[3].detail


def test_unpicklable_function_is_a_clear_error(ranks):
    with pytest.raises(TypeError, match="cannot send"):
        ranks(4, 2).run(lambda: 1)
