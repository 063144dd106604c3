"""A class-conditional run end to end (model.y_condition=true): it trains, reports test/bpd_cond, samples a grid
per class, resumes; data without labels is refused in one line."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from tests.cli_runner import QUIET
from tests.cli_runner import run_cli as run


@pytest.fixture(scope="module")
def cond(fake_data_dir, fake_data_overrides, tmp_path_factory):
    out = tmp_path_factory.mktemp("outputs")
    base = [f"paths.data_dir={fake_data_dir}", f"paths.output_dir={out}", *fake_data_overrides, *QUIET, "logger=csv"]
    args = ["experiment=quickstart", "debug=fast", "model.y_condition=true", "run_name=cond", *base]
    code, stdout, err = run("train", [*args, "trainer.max_steps=3"])
    assert code == 0, err[-3000:]
    return {"args": args, "base": base, "stdout": stdout, "out": out, "dir": out / "runs" / "cond"}


def test_a_conditional_run_reports_bits_per_dim_given_y_and_the_class_accuracy(cond):
    d = cond["dir"]
    last = cond["stdout"].strip().splitlines()[-1]
    assert last.startswith("test/bpd_cond=")
    results = json.loads((d / "results.json").read_text())
    assert "test/bpd" not in results and f"{results['test/bpd_cond']:.6f}" == last.split("=")[1]
    header = set((d / "metrics.csv").read_text().splitlines()[0].split(","))
    assert {"train/bpd_cond", "val/bpd_cond", "test/bpd_cond", "train/y_acc", "val/y_acc", "test/y_acc"} <= header
    assert not header & {"train/bpd", "val/bpd", "test/bpd"}
    assert results["checkpoint"].endswith("best.ckpt")  # best.ckpt follows val/bpd_cond
    grid = Image.open(d / "samples" / "step_0000003_T0.70.png")  # debug=fast: 16 samples, 10 classes: a row each
    assert grid.size == (2 + 30, 2 + 10 * 30)


def test_sample_writes_a_grid_per_class_and_temperature(cond):
    code, out, err = run("sample", [f"ckpt_path={cond['dir']}", "run_name=per_class", "sample.classes=[0,1,2]",
                                    "sample.temperatures=[0,0.7]", "sample.n_samples=4", "sample.reconstructions=0",
                                    *cond["base"]])
    assert code == 0, err[-3000:]
    d = cond["out"] / "samples" / "per_class"
    names = sorted(p.name for p in d.glob("*.png"))
    assert names == [f"samples_T{t}_class{c}.png" for t in ("0.00", "0.70") for c in range(3)]
    assert json.loads((d / "samples.json").read_text())["classes"] == [0, 1, 2]
    code, _, err = run("sample", [f"ckpt_path={cond['dir']}", "run_name=bad", "sample.classes=[0,10]", *cond["base"]])
    assert code == 2 and "sample.classes=[0, 10] is not allowed" in err and "0 to 9" in err


def test_the_same_command_resumes_a_conditional_run(cond):
    code, out, err = run("train", [*cond["args"], "trainer.max_steps=6"])
    assert code == 0, err[-3000:]
    assert f"Resuming from {cond['dir'] / 'checkpoints' / 'last.ckpt'}" in out
    ckpt = torch.load(cond["dir"] / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 6 and ckpt["hyper_parameters"]["model"]["y_condition"] is True
    assert "flow.top_prior.y_emb.linear.weight" in ckpt["state_dict"]
    assert out.strip().splitlines()[-1].startswith("test/bpd_cond=")


@pytest.mark.parametrize("data", ["celebahq256", "imagenet32"])
def test_data_without_labels_refuses_y_condition_in_one_line(cond, data):
    code, out, err = run("train", [f"data={data}", "model.y_condition=true", "run_name=nolabels", *cond["base"]])
    lines = [ln for ln in err.strip().splitlines() if ln]
    assert code == 2 and len(lines) == 1
    assert lines[0].startswith("error: model.y_condition=true needs class labels") and "model.n_classes=None" in lines[0]
    assert not (cond["out"] / "runs" / "nolabels").exists()


def test_a_run_written_before_the_conditional_settings_existed_still_resumes(cond):
    args = ["experiment=quickstart", "debug=fast", "run_name=older", *cond["base"]]
    code, _, err = run("train", [*args, "trainer.max_steps=3"])
    assert code == 0, err[-3000:]
    last = cond["out"] / "runs" / "older" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)
    for k in ("y_condition", "n_classes", "y_weight"):
        del ckpt["hyper_parameters"]["model"][k]
    torch.save(ckpt, last)
    code, out, err = run("train", [*args, "trainer.max_steps=6"])
    assert code == 0, err[-3000:]
    assert f"Resuming from {last}" in out and torch.load(last, weights_only=True)["global_step"] == 6
    # a class-conditional config does not resume an unconditional run
    code, _, err = run("train", [*args, "trainer.max_steps=9", "model.y_condition=true"])
    assert code == 2 and "model.y_condition: False in the checkpoint, True in the config" in err
