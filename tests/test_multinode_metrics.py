"""Honest distributed metrics: the logged loss is the mean over every rank's images and the
throughput is all images over the slowest rank's time (two gloo processes here, with
different shards, sizes and speeds), never rank 0's shard or rank 0's count x world size."""

from __future__ import annotations

import torch
import torch.multiprocessing as mp

from oodlab.train.epoch import epoch_stats

# rank: (loss sum, images, seconds)
SHARDS = {0: (10.0, 100, 2.0), 1: (60.0, 200, 5.0)}


def _rank(rank: int, init: str, out) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        out.put((rank, epoch_stats(*SHARDS[rank])))
    finally:
        dist.destroy_process_group()


def test_loss_and_throughput_are_all_reduced_over_ranks(tmp_path):
    ctx = mp.get_context("fork")  # no re-import of ray and torch in the children
    out = ctx.Queue()
    init = f"file://{tmp_path / 'rendezvous'}"
    procs = [ctx.Process(target=_rank, args=(r, init, out)) for r in SHARDS]
    for p in procs:
        p.start()
    results = dict(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    # every rank logs the same numbers: 70 / 300 images, 300 images / 5 s (the slow rank)
    for loss, ips in results.values():
        assert abs(loss - 70.0 / 300) < 1e-9 and abs(ips - 60.0) < 1e-9
    # what rank 0 alone used to log: its own shard's loss, its count x world / its time
    assert abs(results[0][0] - 0.1) > 0.1 and abs(100 * 2 / 2.0 - results[0][1]) > 30


def test_one_process_logs_its_own_numbers():
    loss, ips = epoch_stats(12.0, 48, 3.0, torch.device("cpu"))
    assert (loss, ips) == (0.25, 16.0)
