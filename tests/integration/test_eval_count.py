"""Evaluation counts every image exactly once: flowlab's datasets yield ``(x, y, index)``, the evaluation
step keys noise and per-image bits/dim by that index, and ``KeyedBitsPerDim`` drops repeats.

An odd test set (11 images) with batch size 4 ends in a partial batch of 3; split over 3 simulated
processes by ``DistributedSampler`` it is padded with a repeat to 12. Either way test/bpd must be the
plain mean of the 11 per-image bits/dim computed directly.
"""

from __future__ import annotations

import warnings

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, DistributedSampler

from flowlab.data import FlowDataModule, TensorSource
from flowlab.lit import FlowModule
from flowlab.lit.metrics import KeyedBitsPerDim
from tests.fakedata import write_celebahq
from tests.settings import datamodule, optim

N_TEST = 11
OPTIM = optim()


def tiny(channels: int, n_bits: int) -> dict:
    return {"_target_": "flowlab.flows.Glow", "in_channels": channels, "image_size": 8, "K": 1, "L": 2,
            "hidden_channels": 8, "permutation": "nxn", "n_bits": n_bits}


class InMemory(FlowDataModule):
    """A FlowDataModule over tensors: 16 training images, ``N_TEST`` test images, 1x8x8, 8-bit."""

    name = "in_memory"
    native_channels = 1
    native_image_size = 8

    def __init__(self, batch_size: int):
        super().__init__("/in-memory", batch_size=batch_size, num_workers=0, pin_memory=False, n_bits=8, hflip=False,
                         val_size=0, seed=0)
        g = torch.Generator().manual_seed(0)
        self.images = torch.randint(0, 256, (16 + N_TEST, 1, 8, 8), dtype=torch.uint8, generator=g)

    def _load(self, split: str) -> TensorSource:
        images = self.images[:16] if split == "train" else self.images[16:]
        return TensorSource(images.clone(), torch.zeros(len(images), dtype=torch.int64), f"memory ({split})")


def _datamodule(kind: str, tmp_path, batch_size: int = 4) -> FlowDataModule:
    if kind == "tensors":
        return InMemory(batch_size)
    write_celebahq(tmp_path, n=110, size=8)  # image files; the last 10% (11) are the test set
    return datamodule("celebahq256", tmp_path, batch_size=batch_size, num_workers=0, image_size=8, val_size=0)


def _module(dm: FlowDataModule) -> FlowModule:
    torch.manual_seed(0)
    module = FlowModule(tiny(dm.channels, dm.n_bits), OPTIM, eval_seed=7, seed=0, use_ema=True)
    dm.setup("fit")
    x = torch.stack([dm.train_dataset[i][0] for i in range(8)])
    module.flow.initialize(module.dequantize_train(x))  # data-dependent ActNorm init: a realistic model
    return module.eval()


def _reference(module: FlowModule, dm: FlowDataModule) -> torch.Tensor:
    """Per-image bits/dim of the whole test set, computed directly in one batch, image i with index i."""
    items = [dm.test_dataset[i] for i in range(len(dm.test_dataset))]
    x = torch.stack([it[0] for it in items])
    index = torch.arange(len(items))
    with torch.no_grad():
        return module.eval_flow.bits_per_dim(module.dequantize_eval(x, index)).double()


@pytest.mark.parametrize("kind", ["tensors", "files"])
def test_test_bpd_is_the_mean_over_every_image_once(kind, tmp_path):
    dm = _datamodule(kind, tmp_path)
    module = _module(dm)
    dm.setup("test")
    assert len(dm.test_dataset) == N_TEST and len(dm.test_dataloader()) == 3  # 4 + 4 + 3
    per_image = _reference(module, dm)
    assert per_image.std() > 1e-3  # the images differ, so dropping or doubling one would show

    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", devices=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bpd = trainer.test(module, datamodule=dm, verbose=False)[0]["test/bpd"]
    assert bpd == pytest.approx(per_image.mean().item(), abs=1e-5)
    # the partial last batch neither dropped nor padded: every other count gives another value
    assert abs(bpd - per_image[:8].mean().item()) > 1e-5
    assert abs(bpd - torch.cat([per_image, per_image[:1]]).mean().item()) > 1e-5


@pytest.mark.parametrize("batch_size", [4, 3])
def test_three_processes_with_padded_repeats_give_the_single_process_value(batch_size, tmp_path):
    dm = _datamodule("tensors", tmp_path, batch_size=batch_size)
    module = _module(dm)
    dm.setup("test")
    per_image = _reference(module, dm)

    metric = KeyedBitsPerDim()  # stands for the metric synced over 3 processes: their updates, concatenated
    seen = []
    with torch.no_grad():
        for rank in range(3):
            sampler = DistributedSampler(dm.test_dataset, num_replicas=3, rank=rank, shuffle=False)
            loader = DataLoader(dm.test_dataset, batch_size=batch_size, sampler=sampler)
            for batch_idx, batch in enumerate(loader):
                seen += batch[2].tolist()
                module._eval_step(batch, batch_idx, metric, range(1))
    assert len(seen) == 12 and sorted(set(seen)) == list(range(N_TEST))  # padded to 12: one repeat
    keys = torch.cat(metric.keys)
    assert keys.numel() == 12 and torch.unique(keys).numel() == N_TEST
    assert metric.compute().item() == pytest.approx(per_image.mean().item(), abs=1e-5)
    # the repeat carries the same key and, as noise is keyed by index, the same value
    values = torch.cat(metric.values)
    for k in torch.unique(keys):
        assert torch.allclose(values[keys == k], values[keys == k][0], atol=1e-5)


def test_a_batch_without_index_is_refused():
    module = _module(InMemory(4))
    x = torch.zeros(4, 1, 8, 8, dtype=torch.uint8)
    with pytest.raises(ValueError) as e:
        module._eval_step((x, torch.zeros(4, dtype=torch.int64)), 0, KeyedBitsPerDim(), range(1))
    msg = str(e.value)
    assert "(x, y, index)" in msg and "2 item(s)" in msg and "\n" not in msg
