"""ActNorm's data-dependent initialisation uses the global batch under torch.distributed."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from flowlab.flows import ActNorm

pytestmark = pytest.mark.distributed


def _batch() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(8, 3, 4, 4, generator=gen) * torch.tensor([1.0, 2.0, 0.1]).view(1, 3, 1, 1) + 0.7


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        layer = ActNorm(3)
        shard = _batch()[rank::world] * (1.0 + rank)  # deliberately different statistics per rank
        layer(shard)
        torch.save(layer.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_actnorm_init_equals_single_process_on_global_batch(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    states = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    batch = _batch()
    global_batch = torch.cat([batch[0::2], batch[1::2] * 2.0])
    reference = ActNorm(3)
    reference(global_batch)
    for state in states:
        assert torch.allclose(state["logs"], reference.logs, atol=1e-6)
        assert torch.allclose(state["bias"], reference.bias, atol=1e-6)
        assert bool(state["initialized"])
