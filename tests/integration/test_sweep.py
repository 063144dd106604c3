"""Sweeps end to end: a Hydra multirun makes one finished W&B offline run per job (grouped and tagged,
with sample images and test/bpd), a sweep-summary run with a Table, and the ablation's aggregation
script turns the jobs into its table — read back from the files W&B and flowlab wrote."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STUDY = ROOT / "experiments" / "ablation_permutation"


def _module(name: str):
    spec = importlib.util.spec_from_file_location(name, STUDY / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(STUDY))
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(STUDY))
    return mod


def _train(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    script = Path(sys.executable).with_name("flowlab-train")
    if not script.exists():
        pytest.skip(f"flowlab-train is not installed next to {sys.executable} (pip install -e .)")
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", OMP_NUM_THREADS="1")
    env.pop("WANDB_PROJECT", None)
    env.pop("WANDB_SERVICE", None)  # left by in-process W&B runs of earlier tests: not this command's service
    return subprocess.run([str(script), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _jobs(sweep_dir: Path) -> list[Path]:
    """Job directories of a sweep (a key such as model/permutation puts a job in a subfolder)."""
    return sorted(p.parent.parent for p in sweep_dir.rglob(".hydra/config.yaml"))


QUIET = ["callbacks.progress_bar=null", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]


@pytest.fixture(scope="module")
def sweep(fake_data_dir, tmp_path_factory):
    """`flowlab-train -m experiment=quickstart 'model/permutation=nxn,conv1x1' seed=0`, as a user types it."""
    cwd = tmp_path_factory.mktemp("user")
    p = _train(["-m", "experiment=quickstart", "debug=fast", "model/permutation=nxn,conv1x1", "seed=0",
                "run_name=two", f"paths.data_dir={fake_data_dir}", "data.batch_size=4", "data.val_size=0.2", *QUIET],
               cwd)
    assert p.returncode == 0, p.stderr[-4000:]
    return {"dir": cwd / "outputs" / "multirun" / "two", "stdout": p.stdout}


def test_each_job_is_its_own_finished_wandb_run_with_images_and_test_bpd(sweep):
    wo = _module("wandb_offline")
    jobs = _jobs(sweep["dir"])
    assert len(jobs) == 2, jobs
    runs = {}
    for job in jobs:
        found = wo.find_runs(job / "wandb")
        assert len(found) == 1, f"{job}: expected one W&B run, found {found}"
        run = wo.read_run(found[0])
        assert run["finished"] and run["exit_code"] == 0
        result = json.loads((job / "results.json").read_text())
        assert run["summary"]["test/bpd"] == pytest.approx(result["test/bpd"])
        assert run["summary"]["params"] == result["params"] > 0
        samples = [p for p in run["images"] if Path(p).name.startswith("samples_")]
        assert len(samples) >= 4, run["images"]  # one grid per temperature 0, 0.5, 0.7, 1.0
        assert run["summary"]["samples"]["captions"] == ["T0.00", "T0.50", "T0.70", "T1.00"]
        assert any(Path(p).name.startswith("reconstructions_") for p in run["images"])
        keys = set().union(*run["history"])
        assert {"train/bpd", "val/bpd", "train/grad_norm", "train/device/samples_per_sec", "sample/images_per_s"} <= keys
        assert run["config"]["config"]["model"]["permutation"] == run["config"]["model"]["permutation"]
        runs[run["config"]["model"]["permutation"]] = run
    assert set(runs) == {"nxn", "conv1x1"}
    assert runs["nxn"]["id"] != runs["conv1x1"]["id"]
    for perm, run in runs.items():
        assert run["group"] == "two"
        assert {f"permutation={perm}", "data=fashion_mnist", "seed=0"} <= set(run["tags"])
    assert sweep["stdout"].count("wandb sync") >= 2


def test_the_sweep_ends_with_a_wandb_table_of_its_runs(sweep):
    wo = _module("wandb_offline")
    found = wo.find_runs(sweep["dir"] / "wandb")
    assert len(found) == 1, found
    run = wo.read_run(found[0])
    assert run["finished"] and run["group"] == "two" and run["name"] == "two/summary"
    assert run["summary"]["jobs"] == 2 and run["summary"]["jobs_finished"] == 2
    table = run["summary"]["sweep/runs"]
    assert table["_type"] == "table-file" and table["nrows"] == 2
    data = json.loads((found[0] / "files" / table["path"]).read_text())
    col = data["columns"].index("test/bpd")
    bpds = sorted(row[col] for row in data["data"])
    want = sorted(json.loads((j / "results.json").read_text())["test/bpd"] for j in _jobs(sweep["dir"]))
    assert bpds == pytest.approx(want)


@pytest.mark.parametrize("source", ["wandb", "csv"])
def test_aggregation_turns_the_runs_into_the_table(sweep, source, tmp_path):
    agg = _module("aggregate")
    assert agg.main([str(sweep["dir"]), "--source", source, "--out", str(tmp_path)]) == 0
    table = (tmp_path / "table.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [r.split(" | ")[0] for r in rows] == ["| Glow, 1×1 conv", "| n×n conv, plain 1×1 inside (paper)"]
    bpds = {}
    for job in _jobs(sweep["dir"]):
        bpd = json.loads((job / "results.json").read_text())["test/bpd"]
        assert f"{bpd:.4f}" in table
        bpds["nxn" if "nxn" in job.name else "conv1x1"] = bpd
    # the n×n row's difference from the reference row (one seed each: no p-value)
    assert f"{bpds['nxn'] - bpds['conv1x1']:+.4f}" in rows[1] and "(reference)" in rows[0]
    assert (tmp_path / "bpd_curves.png").stat().st_size > 1000
    assert (tmp_path / "final_bpd.png").stat().st_size > 1000
    lines = (tmp_path / "runs.csv").read_text().splitlines()
    assert len(lines) == 3 and lines[0].startswith("name,model,seed")


def test_aggregation_reports_a_missing_sweep_in_one_line(tmp_path, capsys):
    agg = _module("aggregate")
    assert agg.main([str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_the_ablation_experiment_sweeps_glow_permutations_and_realnvp(fake_data_dir, tmp_path):
    """experiment=ablation_permutation: `variant` picks Glow + a permutation or RealNVP, one budget for all."""
    p = _train(["experiment=ablation_permutation", "debug=fast", "variant=emerging,realnvp", "seed=3",
                "run_name=abl", "logger=csv", f"paths.data_dir={fake_data_dir}", "data.batch_size=4",
                "data.val_size=0.2", "trainer.val_check_interval=3", *QUIET], tmp_path)
    assert p.returncode == 0, p.stderr[-4000:]
    sweep_dir = tmp_path / "outputs" / "multirun" / "abl"
    agg = _module("aggregate")
    runs = agg.read_runs([sweep_dir], "csv")
    assert sorted(r["model"] for r in runs) == ["emerging", "realnvp"]
    assert all(r["seed"] == 3 and r["max_steps"] == 6 and r["test_bpd"] is not None for r in runs)
    assert all(r["sample_images_per_s"] and r["train_images_per_s"] for r in runs)
