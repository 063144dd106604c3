"""``flowlab-ood`` end to end on a tiny trained checkpoint and the generated data of tests/fakedata.py."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
from PIL import Image

from tests.cli_runner import QUIET, run_cli


@pytest.fixture(scope="module")
def env(fake_data_dir, fake_data_overrides, tmp_path_factory):
    out = tmp_path_factory.mktemp("outputs")
    return {"out": out, "base": [f"paths.data_dir={fake_data_dir}", f"paths.output_dir={out}", *fake_data_overrides]}


@pytest.fixture(scope="module")
def trained(env):
    """A debug-sized quick-start run on the generated Fashion-MNIST files (1x28x28)."""
    code, out, err = run_cli("train", ["experiment=quickstart", "debug=fast", "run_name=trained", *env["base"], *QUIET])
    assert code == 0, err[-3000:]
    return env["out"] / "runs" / "trained"


def _bpd_column(path) -> list[float]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["index"]) for r in rows] == list(range(len(rows)))
    return [float(r["bpd"]) for r in rows]


def test_ood_writes_per_image_bpd_histogram_and_json(trained, env):
    code, out, err = run_cli("ood", ["experiment=quickstart", f"ckpt_path={trained}", "run_name=o", *env["base"],
                                     "ood.datasets=[noise,constant,vflip,invert,svhn]", "ood.resize=true",
                                     "ood.typicality.batch_size=2", "ood.typicality.bootstrap=200"])
    assert code == 0, err[-3000:]
    d = env["out"] / "ood" / "o"
    assert f"run directory: {d}" in out and out.strip().splitlines()[-1].startswith("auroc: noise=")
    sets = ["fashion_mnist", "noise", "constant", "vflip", "invert", "svhn"]
    bpd = {s: _bpd_column(d / f"bpd_{s}.csv") for s in sets}
    assert {s: len(v) for s, v in bpd.items()} == dict.fromkeys(sets, 10)  # every test image of each set
    assert len(_bpd_column(d / "bpd_fashion_mnist_val.csv")) == 8  # the typicality reference: validation images
    with Image.open(d / "histogram.png") as im:
        assert im.format == "PNG" and im.size[0] > 300
    record = json.loads((d / "ood.json").read_text())
    assert record["in_distribution"] == "fashion_mnist" and record["checkpoint"].endswith("best.ckpt")
    assert [p["out"] for p in record["pairs"]] == sets[1:]
    assert all(0 <= p["auroc"] <= 1 and 0 <= p["aupr"] <= 1 for p in record["pairs"])
    assert record["mean_bpd"]["noise"] == pytest.approx(sum(bpd["noise"]) / 10, abs=1e-5)
    typ = record["typicality"]
    assert typ["M"] == 2 and typ["epsilon_bpd"] > 0 and typ["sets"]["noise"]["batches"] == 5
    assert list((d / "wandb").glob("offline-run-*/run-*.wandb")), "the W&B offline run"
    with open(d / "metrics.csv", newline="") as f:
        assert {"ood/noise/auroc", "ood/svhn/aupr"} <= set(next(csv.reader(f)))

    # the in-distribution values are evaluation's: their mean is flowlab-eval's test/bpd
    code, out, err = run_cli("eval", ["experiment=quickstart", "debug=fast", f"ckpt_path={trained}", "run_name=ev",
                                      "trainer.limit_test_batches=1.0", *env["base"], *QUIET])
    assert code == 0, err[-3000:]
    assert sum(bpd["fashion_mnist"]) / 10 == pytest.approx(float(out.strip().splitlines()[-1].split("=")[1]), abs=2e-6)


@pytest.mark.parametrize("args, message", [
    (["ood.datasets=[svhn]"], "ood.datasets: svhn has 3x32x32 images but the model of checkpoint"),
    (["ood.datasets=[nope]"], "ood.datasets: 'nope' is neither a data= option"),
    (["ood.datasets=[fashion_mnist]"], "ood.datasets: fashion_mnist is the in-distribution set"),
    (["ood.datasets=[]"], "ood.datasets=[] is not allowed"),
    (["ood.typicality.alpha=1.5"], "ood.typicality.alpha=1.5 is not allowed"),
    (["data.val_size=0"], "ood.typicality.batch_size=10 needs in-distribution validation images"),
    (["data.val_size=0.5"], "ood.typicality needs validation images the model did not train on"),
])
def test_ood_refuses_bad_settings_in_one_line_and_writes_nothing(trained, env, args, message):
    code, out, err = run_cli("ood", ["experiment=quickstart", f"ckpt_path={trained}", "run_name=bad", *env["base"], *args])
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert message in err
    if args == ["ood.datasets=[svhn]"]:
        assert "set ood.resize=true" in err
    assert not (env["out"] / "ood" / "bad").exists()


def test_ood_in_a_shell_says_what_is_wrong_in_one_line(tmp_path):
    p = subprocess.run([sys.executable, "-m", "flowlab.cli.ood", f"paths.output_dir={tmp_path}"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        "error: ckpt_path is not set: give a checkpoint file or a run directory, "
        "e.g. ckpt_path=outputs/runs/<run_name>/checkpoints/best.ckpt"], p.stderr
