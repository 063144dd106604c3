"""SLURM through Hydra's submitit launcher: ``hydra/launcher=slurm``.

- The launcher config composes and instantiates, and the sbatch script submitit generates from it asks
  for what a 2-node × 4-GPU DDP job needs (nodes, tasks per node = GPUs per node = trainer.devices, time,
  memory, partition, the requeue signal USR1 ``signal_delay_s`` before the time limit) — checked on the
  script text.
- End to end on a stand-in SLURM (tests/distributed/fakeslurm.py runs the very scripts submitit writes):
  ``flowlab-train -m hydra/launcher=slurm trainer=ddp_cpu trainer.strategy=ddp`` submits one job whose two
  tasks SLURM starts and Lightning's SLURMEnvironment joins into one DDP run. SIGUSR1 to the tasks (what
  ``--signal=USR1@<s>`` sends) makes Lightning save hpc_ckpt_1.ckpt and call ``scontrol requeue``; the
  stand-in SLURM ends the job with SIGTERM (flowlab saves last.ckpt) and runs it again, and the requeued
  job resumes in the same run directory and ends at exactly trainer.max_steps.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess

import pytest

from tests.distributed import fakeslurm
from tests.distributed.helpers import REPO, base_args, child_env, load, stop, train_cmd, wait_for, write_data

pytestmark = pytest.mark.distributed


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from flowlab.cli._config import config_dir

    with initialize_config_dir(str(config_dir()), version_base="1.3", job_name="train"):
        return compose("train", overrides=overrides, return_hydra_config=True)


def test_slurm_launcher_composes_and_its_sbatch_script_asks_for_the_job(tmp_path, monkeypatch):
    import hydra
    import submitit

    from flowlab.cluster import RequeueSubmititLauncher

    fakeslurm.install(tmp_path / "bin", tmp_path / "state")  # submitit's SLURM executor wants an srun on PATH
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    cfg = _compose(["hydra/launcher=slurm", "experiment=paper_cifar10", "trainer=ddp", "trainer.devices=4",
                    "trainer.num_nodes=2", "hydra.launcher.partition=gpu", "hydra.launcher.timeout_min=720",
                    "run_name=cifar_nxn", f"paths.output_dir={tmp_path / 'out'}",
                    "hydra.launcher.setup=[source .venv/bin/activate]"])
    launcher = hydra.utils.instantiate(cfg.hydra.launcher)
    assert isinstance(launcher, RequeueSubmititLauncher) and launcher.cluster == "slurm"
    init, update = launcher.executor_parameters()
    assert init["folder"] == f"{tmp_path / 'out'}/multirun/cifar_nxn/.submitit/%j"
    assert init["slurm_max_num_timeout"] == 10
    executor = submitit.AutoExecutor(cluster="slurm", **init)
    executor.update_parameters(**update)
    text = executor._executor._make_submission_file_text("python -u -m submitit.core._submit FOLDER", "uid")
    lines = set(text.splitlines())
    for expected in ["#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4",
                     "#SBATCH --partition=gpu", "#SBATCH --time=720", "#SBATCH --mem=64GB",
                     "#SBATCH --cpus-per-task=8", "#SBATCH --signal=USR1@120", "#SBATCH --job-name=train",
                     "source .venv/bin/activate"]:
        assert expected in lines, f"{expected!r} not in\n{text}"
    assert any(line.startswith("srun ") and "submitit.core._submit FOLDER" in line for line in lines)
    assert sum(line.startswith("#SBATCH --signal") for line in lines) == 1


def test_slurm_launcher_rejects_an_unknown_cluster():
    import hydra

    from flowlab.errors import ConfigError

    cfg = _compose(["hydra/launcher=slurm", "hydra.launcher.cluster=lsf"])
    with pytest.raises(Exception) as info:
        hydra.utils.instantiate(cfg.hydra.launcher)
    cause = info.value
    while cause is not None and not isinstance(cause, ConfigError):
        cause = cause.__cause__
    assert cause is not None and "hydra.launcher.cluster='lsf'" in str(cause)


@pytest.mark.slow  # a submitting process, two DDP tasks, a requeue and two more tasks: ~2 minutes here
def test_slurm_job_runs_ddp_and_requeues_on_sigusr1_then_resumes(tmp_path):
    data, out = write_data(tmp_path / "data"), tmp_path / "out"
    state = tmp_path / "state"
    fakeslurm.install(tmp_path / "bin", state)
    env = child_env(PATH=f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}", FAKE_SLURM_DIR=str(state),
                    FAKE_SLURM_FIRST_ID=str(4100 + os.getpid() % 800))
    max_steps = 40
    args = ["-m", "hydra/launcher=slurm", "hydra.launcher.partition=debug", "hydra.launcher.cpus_per_task=1",
            "hydra.launcher.mem_gb=4", "hydra.launcher.timeout_min=30", "hydra.launcher.gpus_per_node=null",
            "hydra.sweep.subdir=job${hydra.job.num}",  # the default, every override in the name, is too long here
            *base_args(data, out, "trainer=ddp_cpu", "trainer.strategy=ddp", f"trainer.max_steps={max_steps}",
                       "callbacks.checkpoint.every_n_train_steps=4", "trainer.val_check_interval=100",
                       "run_name=slurm", "+callbacks.slow._target_=tests.distributed.helpers.SlowSteps",
                       "+callbacks.slow.seconds=0.1")]
    log = tmp_path / "submit.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(train_cmd(args), cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    sweep = out / "multirun" / "slurm"
    try:
        def first_checkpoint():
            return any(sweep.glob("*/checkpoints/last.ckpt"))

        wait_for(first_checkpoint, proc, 400, "the SLURM job's first checkpoint", log)
        scripts = sorted(state.glob("sbatch_*.sh"))
        assert len(scripts) == 1, "one job for the one sweep point"
        job_id = scripts[0].stem.split("_")[1]
        text = scripts[0].read_text()
        for expected in ["#SBATCH --ntasks-per-node=2", "#SBATCH --nodes=1", "#SBATCH --signal=USR1@120",
                         "#SBATCH --partition=debug", "#SBATCH --time=30"]:
            assert expected in text.splitlines(), text
        pids = [int(p) for p in (state / f"tasks_{job_id}.pids").read_text().split()]
        assert len(pids) == 2, "SLURM started one task per device"
        for pid in pids:  # what sbatch --signal=USR1@120 does before the time limit
            os.kill(pid, signal.SIGUSR1)
        proc.wait(timeout=600)
    finally:
        stop(proc)
    text = log.read_text()
    assert proc.returncode == 0, text[-4000:]
    assert (state / "scontrol.log").read_text().split("\n")[0] == f"requeue {job_id}"
    runs = [p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert len(runs) == 1, runs
    run = runs[0]
    assert (run / "hpc_ckpt_1.ckpt").is_file(), "Lightning's SLURM requeue checkpoint"
    final = load(run / "checkpoints" / "last.ckpt")
    assert final["global_step"] == max_steps
    assert {int(s["step"]) for s in final["optimizer_states"][0]["state"].values()} == {max_steps}
    task_logs = "".join(p.read_text() for p in sweep.glob(".submitit/*/*_0_log.*"))
    assert re.search(r"Resuming from \S+(last\.ckpt|hpc_ckpt_1\.ckpt)", task_logs), task_logs[-3000:]
    assert "test/bpd=" in task_logs


def test_requeues_stop_after_max_num_timeout(monkeypatch):
    from lightning_fabric.plugins.environments import SLURMEnvironment

    from flowlab.cluster import REQUEUE_ENV, cluster_plugins, set_requeue_allowed

    for name in ("SLURM_NTASKS", "SLURM_JOB_NAME", "SLURM_RESTART_COUNT", REQUEUE_ENV):
        monkeypatch.delenv(name, raising=False)
    assert cluster_plugins() == [], "not on SLURM: Lightning's defaults"
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_JOB_NAME", "train")
    for restarts, expected in ((None, True), ("1", True), ("2", False), ("5", False)):
        if restarts is not None:
            monkeypatch.setenv("SLURM_RESTART_COUNT", restarts)
        assert set_requeue_allowed(2) is expected
        (env,) = cluster_plugins()
        assert isinstance(env, SLURMEnvironment) and env.auto_requeue is expected
        assert env.requeue_signal == signal.SIGUSR1
