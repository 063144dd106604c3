"""Skipping non-finite steps under DDP (two CPU processes, gloo): every process takes the same decision.

Process 1 alone sees a non-finite loss while every gradient (averaged over both) stays finite, the
one case the gradient norm cannot reveal. Were the decision not reduced over processes, process 0
would step and process 1 would not, and the replicas would drift apart.
"""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from flowlab.lit import FlowModule
from tests.settings import optim, run_settings

pytestmark = [pytest.mark.distributed, pytest.mark.filterwarnings("ignore::UserWarning")]

MODEL = {"_target_": "flowlab.flows.Glow", "in_channels": 1, "image_size": 8, "K": 1, "L": 2,
         "hidden_channels": 8, "permutation": "conv1x1", "n_bits": 8}
OPTIM = optim(max_consecutive_skips=20)
BAD_ON_RANK_1 = {2, 3, 5}


class LossOnlyFault(FlowModule):
    """On process 1 at the BAD steps, the recorded loss is inf; the gradients are left as they are."""

    def __init__(self, out_dir: str, **kw):
        super().__init__(**kw)
        self.out_dir = out_dir

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if self.global_rank == 1 and self.global_step in BAD_ON_RANK_1:
            self._step_loss = torch.tensor(math.inf)
        return loss

    def on_train_end(self):
        torch.save({"skipped": self.skipped_steps, "flow": self.flow.state_dict()},
                   f"{self.out_dir}/rank{self.global_rank}.pt")


def test_processes_agree_on_skipping_a_step(tmp_path):
    x = torch.randint(0, 256, (64, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    data = DataLoader(TensorDataset(x, torch.zeros(64, dtype=torch.long)), batch_size=4)
    module = LossOnlyFault(str(tmp_path), model=MODEL, optim=OPTIM, **run_settings())
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=7, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=str(tmp_path))
    trainer.fit(module, data)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["skipped"] == r1["skipped"] == len(BAD_ON_RANK_1)
    for k, v in r0["flow"].items():
        assert torch.equal(v, r1["flow"][k]), f"replicas differ in {k}"
