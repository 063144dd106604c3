"""Hydra and DDP together.

- A single run with a relaunching strategy (``trainer.strategy=ddp``: Lightning starts process 1 by running
  the command again) keeps ONE run directory, even with the default time-stamped run_name: the child joins
  the parent's directory (Lightning passes ``hydra.run.dir`` on), visible as its own Hydra log file there.
- A local sweep with DDP works with ``trainer=ddp_cpu`` (ddp_spawn): one directory per sweep point, each
  trained to max_steps by two processes.
- A local sweep with a relaunching strategy is refused with one message (each child would rerun the sweep).
"""

from __future__ import annotations

import json

import pytest

from tests.distributed.helpers import BPD_LINE, base_args, load, run_inprocess, run_train, write_data

pytestmark = pytest.mark.distributed


def test_single_ddp_run_keeps_one_run_directory(tmp_path):
    data, out = write_data(tmp_path / "data"), tmp_path / "out"
    # no run_name: quickstart's default is a time stamp, which a re-launched child would compute anew
    p = run_train(base_args(data, out, "trainer=ddp_cpu", "trainer.strategy=ddp", "trainer.max_steps=2"))
    assert p.returncode == 0, p.stderr[-4000:]
    runs = sorted((out / "runs").iterdir())
    assert len(runs) == 1 and runs[0].name.startswith("quickstart_"), runs
    run = runs[0]
    assert (run / "train_ddp_process_1.log").is_file(), "process 1 ran in the parent's run directory"
    assert f"run directory: {run}" in p.stdout and BPD_LINE.search(p.stdout)
    assert load(run / "checkpoints" / "last.ckpt")["global_step"] == 2
    assert json.loads((run / "results.json").read_text())["global_step"] == 2


@pytest.mark.slow  # two sweep points, each spawning two processes for fit and again for test: ~90 s here
def test_local_sweep_with_ddp_spawn(tmp_path):
    data, out = write_data(tmp_path / "data"), tmp_path / "out"
    code, stdout, stderr = run_inprocess("train", ["-m", *base_args(data, out, "trainer=ddp_cpu", "trainer.max_steps=2",
                                                                      "run_name=sweep", "seed=0,1")])
    assert code == 0, stderr[-4000:]
    jobs = sorted(p for p in (out / "multirun" / "sweep").iterdir() if p.is_dir() and not p.name.startswith("."))
    assert len(jobs) == 2 and [j.name.split("seed=")[1].split(",")[0] for j in jobs] == ["0", "1"], jobs
    finals = []
    for seed, job in enumerate(jobs):
        ckpt = load(job / "checkpoints" / "last.ckpt")
        assert ckpt["global_step"] == 2 and ckpt["hyper_parameters"]["seed"] == seed
        finals.append(ckpt["state_dict"])
    assert any((finals[0][k] != finals[1][k]).any() for k in finals[0] if finals[0][k].is_floating_point())
    assert len(BPD_LINE.findall(stdout)) == 2


def test_local_sweep_with_a_relaunching_strategy_is_refused(tmp_path):
    data, out = write_data(tmp_path / "data"), tmp_path / "out"
    code, _, stderr = run_inprocess("train", ["-m", *base_args(data, out, "trainer=ddp_cpu", "trainer.strategy=ddp",
                                                                "run_name=bad", "seed=0,1")])
    assert code == 2
    assert "cannot run inside a local multirun" in stderr and "ddp_spawn" in stderr and "Traceback" not in stderr
    assert not list((out / "multirun" / "bad").rglob("*.ckpt"))
