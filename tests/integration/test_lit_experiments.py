"""``fast_dev_run`` of every experiment config on generated data in its dataset's on-disk format,
with tiny overrides (one flow step per level, narrow couplings, small batches), through the real
``flowlab-train`` entry point; and a short run on the real Fashion-MNIST files when installed."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest

from tests.integration.test_cli import quiet, run

CONF = Path(__file__).resolve().parents[2] / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_fast_dev_run_of_every_experiment(experiment, fake_data_dir, fake_data_overrides, tmp_path):
    args = [f"experiment={experiment}", "hydra.mode=RUN", "trainer=cpu", "debug=fdr", "model.K=1",
            "model.hidden_channels=4", f"paths.data_dir={fake_data_dir}", f"paths.output_dir={tmp_path}",
            "run_name=fdr", *fake_data_overrides, *quiet()]
    code, out, err = run("train", args)
    assert code == 0, err[-4000:]
    bpd = float(out.strip().splitlines()[-1].split("=", 1)[1])
    assert math.isfinite(bpd) and bpd > 0
    assert list((tmp_path / "runs" / "fdr" / "samples").glob("*.png")), "sample grids were drawn"


@pytest.mark.slow  # real-data training
@pytest.mark.skipif(not FASHION_MNIST.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_a_few_steps_on_the_real_fashion_mnist(tmp_path):
    # paths.data_dir holds no data: the module finds the Debian files in /usr/share/datasets/fashion-mnist
    args = ["experiment=quickstart", "debug=fast", "trainer.max_steps=20", "trainer.val_check_interval=10",
            "optim.scheduler.warmup_steps=5", "trainer.limit_test_batches=4", "logger=csv", "data.val_size=500",
            f"paths.data_dir={tmp_path / 'empty'}", f"paths.output_dir={tmp_path}", "run_name=real", *quiet()]
    code, out, err = run("train", args)
    assert code == 0, err[-4000:]
    bpd = float(out.strip().splitlines()[-1].split("=", 1)[1])
    rows = list(csv.DictReader((tmp_path / "runs" / "real" / "metrics.csv").open()))
    train_bpd = [float(r["train/bpd"]) for r in rows if r.get("train/bpd")]
    assert len(train_bpd) >= 15
    assert sum(train_bpd[-5:]) / 5 < sum(train_bpd[:5]) / 5 - 0.3, "20 steps on real images lower the loss"
    assert 1.0 < bpd < 8.0
