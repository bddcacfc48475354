"""Data-parallel search (torch.distributed, gloo on CPU): shards, gradient averaging."""

import json
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from maenas_ray.config import config_from_dict
from maenas_ray.data import DeviceBatches
from maenas_ray.engines import average_over_ranks, rank_and_world, run_search


def tiny_config():
    return config_from_dict(
        {
            "data": {"num_images": 64, "image_size": 16},
            "search": {
                "channels": 4, "layers": 3, "batch_size": 8, "epochs": 2, "steps_per_epoch": 2,
                "patch_size": 4, "eval_images": 16, "decoder_width": 8, "device": "cpu",
                "hessian_iters": 2,
            },
        }
    )  # fmt: skip


def test_device_batch_shards_partition_the_global_batch():
    images = torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8)
    mean, std = torch.zeros(3), torch.ones(3)

    def batches(shard):
        gen = torch.Generator().manual_seed(3)
        return list(DeviceBatches(images, mean, std, 8, True, gen, shard=shard))

    whole = batches((0, 1))
    ranks = [batches((r, 2)) for r in range(2)]
    assert len(whole) == len(ranks[0]) == len(ranks[1]) == 5
    for k, batch in enumerate(whole):
        assert ranks[0][k].shape[0] == ranks[1][k].shape[0] == 4
        assert torch.equal(ranks[0][k], batch[0::2]) and torch.equal(ranks[1][k], batch[1::2])


def _rank(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = run_search(tiny_config())
        normal = result.alphas_normal.tolist()
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump({"alphas": normal, "metrics": result.metrics}, f)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_average_gradients_and_stay_identical(tmp_path):
    mp.spawn(_rank, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    # averaged gradients, the same random draws: both ranks hold the same search
    assert r0["alphas"] == r1["alphas"]
    timing = ("epoch_time", "images_per_sec", "hessian_time")
    assert r0["metrics"] == {**r1["metrics"], **{k: r0["metrics"][k] for k in timing}}
    # the eigenvalue is that of the mean loss over both ranks' shares: the same on both
    assert "hessian_eigenvalue" in r0["metrics"]
    assert r0["metrics"]["steps"] == 2


def _average(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        a = torch.full((2, 3), float(rank + 1))
        b = torch.tensor([10.0 * (rank + 1)])
        average_over_ranks([a, b])
        torch.save({"a": a, "b": b}, os.path.join(out, f"avg{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_average_over_ranks_is_the_mean():
    assert rank_and_world() == (0, 1)
    t = torch.ones(3)
    average_over_ranks([t])  # no process group: untouched
    assert torch.equal(t, torch.ones(3))


def test_average_over_ranks_across_two_processes(tmp_path):
    mp.spawn(_average, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(tmp_path / f"avg{rank}.pt")
        assert torch.equal(got["a"], torch.full((2, 3), 1.5))
        assert torch.equal(got["b"], torch.tensor([15.0]))
