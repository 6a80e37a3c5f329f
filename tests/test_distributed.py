"""Cross-rank agreement with 2 CPU processes (gloo): the λ draw and the global token count."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gkd import distributed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        # each rank seeds its coin differently: only the broadcast can make them agree
        coin = distributed.OnPolicyScheduler(lmbda=0.5, seed=1234 + rank)
        draws = [coin.draw() for _ in range(32)]
        local = torch.tensor(float(3 + 4 * rank))
        total = distributed.all_reduce_sum(local)
        done = distributed.all_ranks_done(rank == 0)  # rank 1 is not done
        everyone_done = distributed.all_ranks_done(True)
        results[rank] = (draws, float(total), done, everyone_done, float(local))
    finally:
        dist.destroy_process_group()


def test_lambda_draw_and_global_count_agree_across_ranks():
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_worker, args=(2, _free_port(), results), nprocs=2, join=True)
    draws0, total0, done0, all0, local0 = results[0]
    draws1, total1, done1, all1, local1 = results[1]
    assert draws0 == draws1
    assert 0 < sum(draws0) < len(draws0)  # a real mixture of on- and off-policy steps
    # rank 0's draws are the single-process draws of seed 1234: broadcasting changes nothing on rank 0
    single = distributed.OnPolicyScheduler(lmbda=0.5, seed=1234)
    assert draws0 == [single.draw() for _ in range(32)]
    assert total0 == total1 == 3 + 7 and local0 == 3  # the local value is not modified in place
    assert (done0, done1) == (False, False) and (all0, all1) == (True, True)


def test_lambda_endpoints_are_exact():
    assert not any(distributed.OnPolicyScheduler(0.0, seed=s).draw() for s in range(200))
    assert all(distributed.OnPolicyScheduler(1.0, seed=s).draw() for s in range(200))


def test_coin_state_round_trips():
    a = distributed.OnPolicyScheduler(0.5, seed=7)
    [a.draw() for _ in range(5)]
    state = a.state_dict()
    want = [a.draw() for _ in range(10)]
    b = distributed.OnPolicyScheduler(0.5, seed=0)
    b.load_state_dict(state)
    assert [b.draw() for _ in range(10)] == want
