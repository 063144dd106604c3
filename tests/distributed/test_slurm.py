"""SLURM through Hydra's submitit launcher (``hydra/launcher=slurm``), without a cluster.

- The request follows the trainer: one task per process, GPUs only for a GPU trainer, ``data.num_workers + 1``
  CPUs per task, memory per CPU; ``ddp_spawn`` runs as ``ddp`` (SLURM starts the processes); an unusable
  ``trainer.devices`` is refused in one line.
- The sbatch script submitit writes for a 2-node × 4-GPU DDP job (which the one-node test cluster could never
  run) asks for what that job needs — checked on the script text, with a stand-in ``srun``
  (tests/distributed/fakeslurm.py).
- Requeues stop after ``max_num_timeout``; Lightning's own SLURM auto-requeue is off.

Real jobs (DDP, arrays, SIGUSR1 and requeue) are in tests/cluster/ (``make test-cluster``).
"""

from __future__ import annotations

import os

import pytest

from tests.distributed import fakeslurm

pytestmark = pytest.mark.distributed


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    import flowlab.cli._hydra  # noqa: F401 - registers the resolvers the configs use
    from flowlab.cli._config import config_dir

    with initialize_config_dir(str(config_dir()), version_base="1.3", job_name="train"):
        return compose("train", overrides=overrides, return_hydra_config=True)


@pytest.mark.parametrize("trainer, tasks, gpus", [("cpu", 1, None), ("ddp_cpu", 2, None), ("gpu", 1, 1), ("ddp", 4, 4)])
def test_the_request_follows_the_trainer(trainer, tasks, gpus):
    from flowlab.cluster import _overrides_for_slurm, slurm_request

    cfg = _compose(["hydra/launcher=slurm", "experiment=quickstart", f"trainer={trainer}", "data.num_workers=3"])
    assert slurm_request(cfg) == {"nodes": 1, "tasks_per_node": tasks, "gpus_per_node": gpus, "cpus_per_task": 4}
    mapped = _overrides_for_slurm(cfg, [f"trainer={trainer}", "trainer.strategy=ddp_spawn"])
    if trainer == "ddp_cpu":  # ddp_spawn locally; one SLURM task per process under SLURM
        assert mapped == ["trainer=ddp_cpu", "trainer.strategy=ddp"]
    else:
        assert mapped == [f"trainer={trainer}", "trainer.strategy=ddp_spawn"]


def test_a_device_count_slurm_cannot_start_tasks_for_is_refused():
    from flowlab.cluster import slurm_request
    from flowlab.errors import ConfigError

    with pytest.raises(ConfigError, match=r"tasks_per_node='auto' \(from trainer.devices='auto'\)"):
        slurm_request(_compose(["hydra/launcher=slurm", "trainer.devices=auto"]))


def test_the_sbatch_script_of_a_two_node_gpu_job_asks_for_it(tmp_path, monkeypatch):
    import hydra
    import submitit

    from flowlab.cluster import RequeueSubmititLauncher, slurm_request

    monkeypatch.setenv("PATH", f"{fakeslurm.install(tmp_path / 'bin')}{os.pathsep}{os.environ['PATH']}")
    cfg = _compose(["hydra/launcher=slurm", "experiment=paper_cifar10", "trainer=ddp", "trainer.devices=4",
                    "trainer.num_nodes=2", "hydra.launcher.partition=gpu", "hydra.launcher.timeout_min=720",
                    "run_name=cifar_nxn", f"paths.output_dir={tmp_path / 'out'}",
                    "hydra.launcher.setup=[source .venv/bin/activate]"])
    launcher = hydra.utils.instantiate(cfg.hydra.launcher)
    assert isinstance(launcher, RequeueSubmititLauncher) and launcher.cluster == "slurm"
    init, update = launcher.executor_parameters(slurm_request(cfg))
    assert init["folder"] == f"{tmp_path / 'out'}/multirun/cifar_nxn/.submitit/%j"
    assert init["slurm_max_num_timeout"] == 10
    executor = submitit.AutoExecutor(cluster="slurm", **init)
    executor.update_parameters(**update)
    text = executor._executor._make_submission_file_text("python -u -m submitit.core._submit FOLDER", "uid")
    lines = set(text.splitlines())
    for expected in ["#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4",
                     "#SBATCH --partition=gpu", "#SBATCH --time=720", "#SBATCH --mem-per-cpu=2GB",
                     "#SBATCH --cpus-per-task=1", "#SBATCH --signal=USR1@120", "#SBATCH --job-name=train",
                     "source .venv/bin/activate"]:
        assert expected in lines, f"{expected!r} not in\n{text}"
    assert any(line.startswith("srun ") and "submitit.core._submit FOLDER" in line for line in lines)
    assert sum(line.startswith("#SBATCH --signal") for line in lines) == 1
    assert not any(line.startswith("#SBATCH --mem=") for line in lines), "--mem and --mem-per-cpu exclude each other"
    _, update = launcher.executor_parameters({**slurm_request(cfg), "mem_gb": 64})
    assert update["mem_gb"] == 64 and "slurm_mem_per_cpu" not in update


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


def test_requeues_stop_after_max_num_timeout(monkeypatch):
    from lightning_fabric.plugins.environments import SLURMEnvironment

    from flowlab.cluster import cluster_plugins, set_requeue_allowed
    from flowlab.lit.preemption import REQUEUE_ENV

    for name in ("SLURM_NTASKS", "SLURM_JOB_NAME", "SLURM_RESTART_COUNT", REQUEUE_ENV):
        monkeypatch.delenv(name, raising=False)
    assert cluster_plugins() == [], "not on SLURM: Lightning's defaults"
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_JOB_NAME", "train")
    (env,) = cluster_plugins()
    assert isinstance(env, SLURMEnvironment) and not env.auto_requeue, "flowlab's Preemption requeues, not Lightning"
    for restarts, expected in ((None, True), ("1", True), ("2", False), ("5", False)):
        if restarts is not None:
            monkeypatch.setenv("SLURM_RESTART_COUNT", restarts)
        assert set_requeue_allowed(2) is expected
        assert os.environ[REQUEUE_ENV] == ("1" if expected else "0")



def _squeue(tmp_path, monkeypatch, *answers: str):
    """A stand-in ``squeue`` that gives one answer per call; ``!<error>``: that error, status 1."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (tmp_path / "answers").write_text("\n".join(answers) + "\n")
    (bin_dir / "squeue").write_text(f"""#!/bin/sh
n=$(cat {tmp_path}/calls 2>/dev/null || echo 0); echo $((n + 1)) > {tmp_path}/calls
line=$(sed -n "$((n + 1))p" {tmp_path}/answers)
case "$line" in "!"*) echo "slurm_load_jobs error: ${{line#!}}" >&2; exit 1;; esac
printf '%s\\n' "$line" | tr ';' '\\n'
""")
    os.chmod(bin_dir / "squeue", 0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def test_slurm_states_are_the_controllers(tmp_path, monkeypatch):
    from flowlab.cluster import slurm_states

    _squeue(tmp_path, monkeypatch, "7|PENDING|1;9_1|RUNNING|0", "!Invalid job id specified",
            "!Unable to contact slurm controller (connect failure)")
    assert slurm_states(["7", "8", "9_1"]) == {"7": ("PENDING", 1), "9_1": ("RUNNING", 0)}  # 8: purged
    assert slurm_states(["7", "8"]) == {}, "the controller holds none of them"
    assert slurm_states(["7"]) is None, "no answer: no states, so no job ends"


def test_a_requeued_job_is_followed_to_its_end_whatever_sacct_shows_meanwhile(tmp_path, monkeypatch, capsys):
    """A job ends when the controller says so: while it is being requeued sacct once showed it FAILED (CI), and
    the submitter, which then followed sacct, reported the requeued job as failed. sacct is asked only about a
    job the controller no longer holds."""
    from types import SimpleNamespace

    from hydra.core.utils import JobReturn, JobStatus
    from omegaconf import OmegaConf

    from flowlab.cluster import RequeueSubmititLauncher

    asked = []
    done = JobReturn(overrides=[], status=JobStatus.COMPLETED, _return_value=3.25,
                     hydra_cfg=OmegaConf.create({"hydra": {"runtime": {"output_dir": "/runs/r"}}}))
    job = SimpleNamespace(job_id="7", results=lambda: [done], watcher=SimpleNamespace(
        get_state=lambda job_id, mode: asked.append(job_id) or "COMPLETED"))
    _squeue(tmp_path, monkeypatch, "7|RUNNING|0", "!Unable to contact slurm controller", "7|COMPLETING|1",
            "7|PENDING|1", "7|RUNNING|1", "7|RUNNING|2", "!Invalid job id specified")  # requeued twice
    launcher = RequeueSubmititLauncher(cluster="slurm", requeue_signal="USR1", poll_s=0)
    (ret,) = launcher._follow([(job, "#0", [])])
    assert ret is done and asked == ["7"], "sacct only once the controller has purged the job"
    assert capsys.readouterr().out.splitlines() == [
        "[slurm] job 7 (#0): RUNNING", "[slurm] job 7 (#0): REQUEUED (restart 1)", "[slurm] job 7 (#0): COMPLETING",
        "[slurm] job 7 (#0): PENDING", "[slurm] job 7 (#0): RUNNING", "[slurm] job 7 (#0): REQUEUED (restart 2)",
        "[slurm] job 7 (#0): RUNNING",
        "[slurm] job 7 (#0): COMPLETED test/bpd=3.250000 run directory: /runs/r"]
