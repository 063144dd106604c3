"""A class-conditional run under DDP (``trainer=ddp_cpu``: two processes, gloo): its test/bpd_cond and test/y_acc
equal one process's, although DistributedSampler gives one test image to both processes."""

from __future__ import annotations

import csv
import re

import pytest
import torch

from tests.distributed.helpers import N_TEST, base_args, load, run_inprocess, write_data

pytestmark = pytest.mark.distributed
BPD_COND_LINE = re.compile(r"^test/bpd_cond=(\d+\.\d+)$", re.M)


def test_conditional_ddp_run_equals_one_process(tmp_path):
    data, out = write_data(tmp_path / "data"), tmp_path / "out"
    args = base_args(data, out, "trainer=ddp_cpu", "trainer.max_steps=3", "trainer.limit_test_batches=null",
                     "optim.coupling_dtype=float32", "model.y_condition=true", "model.y_weight=1.0", "run_name=ddp")
    code, stdout, stderr = run_inprocess("train", args)
    assert code == 0, stderr[-4000:]
    ddp_bpd = float(BPD_COND_LINE.findall(stdout)[-1])
    run = out / "runs" / "ddp"
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    ddp_acc = float(next(r["test/y_acc"] for r in rows if r.get("test/y_acc")))

    code, stdout, stderr = run_inprocess("eval", base_args(data, out, "trainer=cpu", "trainer.limit_test_batches=null",
                                                           f"ckpt_path={run}", "run_name=single"))
    assert code == 0, stderr[-4000:]
    assert abs(float(BPD_COND_LINE.findall(stdout)[-1]) - ddp_bpd) < 1e-5

    from flowlab.lit.module import FlowModule
    from tests.settings import datamodule

    module = FlowModule.from_checkpoint(load(run / "checkpoints" / "best.ckpt")).eval()
    dm = datamodule("fashion_mnist", data / "fashion-mnist", val_size=8)
    dm.setup("test")
    x, y, index = (torch.stack([torch.as_tensor(dm.test_dataset[i][k]) for i in range(N_TEST)]) for k in range(3))
    assert len(y) == N_TEST and y.unique().numel() > 1
    with torch.no_grad():
        xd = module.dequantize_eval(x, index)
        _, logits = module.eval_flow.bits_and_logits(xd, y)
    assert ddp_acc == pytest.approx(float((logits.argmax(1) == y).double().mean()), abs=1e-12)
