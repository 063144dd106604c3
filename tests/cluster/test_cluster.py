"""Real SLURM jobs, submitted the way a user does: ``flowlab-train -m hydra/launcher=slurm ...``.

Needs a cluster that answers ``sinfo`` (``make test-cluster`` starts the one-node cluster of
tests/cluster/slurm.sh, runs these tests and stops it); without one every test here is skipped.

- (a) a 2-task CPU DDP job (``trainer=ddp_cpu``: ddp_spawn locally, one SLURM task per process here) trains,
  evaluates, and the submitter prints the job's state and ``test/bpd=``; the request fits a CPU node.
- (b) a 2-point sweep goes out as one job array; both points end COMPLETED with their test/bpd.
- (c) SIGUSR1 (``scancel --signal=USR1``, what SLURM sends before the time limit) under 2-process DDP, three
  times: each time both ranks save last.ckpt at one step boundary and rank 0 requeues the job, which resumes
  ("Resuming from") and ends at exactly max_steps, the submitter printing each requeue; SIGUSR1s during and
  after the test stage change nothing.
- A request the node cannot satisfy is refused at submission in one line and leaves no folder behind.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.distributed.helpers import REPO, base_args, child_env, load, stop, train_cmd, write_data

pytestmark = pytest.mark.cluster


def _answers() -> bool:
    try:
        return shutil.which("sinfo") is not None and subprocess.run(
            ["sinfo", "-h"], capture_output=True, timeout=15).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="module", autouse=True)
def _cluster():
    if not _answers():
        pytest.skip("no SLURM cluster answers `sinfo`: run `make test-cluster` (starts one with tests/cluster/slurm.sh)")


def _args(tmp_path: Path, run_name: str, *extra: str) -> list[str]:
    data = write_data(tmp_path / "data")
    return ["-m", "hydra/launcher=slurm", "hydra.launcher.poll_s=1", "hydra.launcher.timeout_min=15",
            "hydra.sweep.subdir=job${hydra.job.num}",  # the default, every override in the name, is too long here
            *base_args(data, tmp_path / "out", f"run_name={run_name}", *extra)]


def _submit(args: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(train_cmd(args), cwd=REPO, env=child_env(), stdout=open(log, "w"), stderr=subprocess.STDOUT)


def _finish(proc: subprocess.Popen, log: Path, timeout: float = 300) -> str:
    try:
        proc.wait(timeout=timeout)
    finally:
        stop(proc)
    return log.read_text()


def _sacct(job: str) -> str:
    """The job's state in SLURM's accounting (records reach it asynchronously: poll)."""
    state = ""
    for _ in range(30):
        out = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "State", "-j", job], capture_output=True, text=True)
        state = out.stdout.strip().splitlines()[0] if out.stdout.strip() else ""
        if state and state not in ("RUNNING", "COMPLETING", "PENDING", "REQUEUED"):
            return state
        time.sleep(1)
    return state


def _squeue_state(job: str) -> str:
    return subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True).stdout.strip()


def _until(condition, what: str, timeout: float, proc: subprocess.Popen, log: Path):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        if proc.poll() is not None:
            raise AssertionError(f"the submitter ended (status {proc.returncode}) before {what}:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (a deadlocked job shows here):\n"
                         f"{log.read_text()[-3000:]}")


def test_a_ddp_cpu_job_trains_evaluates_and_the_submitter_prints_test_bpd(tmp_path):
    log = tmp_path / "submit.log"
    text = _finish(_submit(_args(tmp_path, "ddp", "trainer=ddp_cpu", "trainer.max_steps=6"), log), log)
    assert "Traceback" not in text, text[-3000:]
    done = re.search(r"^\[slurm\] job (\d+) \(#0\): COMPLETED test/bpd=(\d+\.\d+) run directory: (\S+)$", text, re.M)
    assert done, text[-3000:]
    job, bpd, run = done.group(1), float(done.group(2)), Path(done.group(3))
    assert _sacct(job) == "COMPLETED"
    script = (tmp_path / "out" / "multirun" / "ddp" / ".submitit" / job / f"{job}_submission.sh").read_text().splitlines()
    for line in ("#SBATCH --ntasks-per-node=2", "#SBATCH --nodes=1", "#SBATCH --cpus-per-task=1", "#SBATCH --mem-per-cpu=2GB",
                 "#SBATCH --signal=USR1@120"):
        assert line in script, script
    assert not any("gpus" in line or "gres" in line for line in script), "a CPU trainer asks for no GPUs"
    record = json.loads((run / "results.json").read_text())
    assert record["global_step"] == 6 and abs(record["test/bpd"] - bpd) < 1e-5
    rank0 = (run.parent / ".submitit" / job / f"{job}_0_log.err").read_text()
    assert "Starting with 2 processes" in rank0 and "ddp_spawn" not in rank0, rank0[-2000:]
    assert f"test/bpd={record['test/bpd']:.6f}" in (run.parent / ".submitit" / job / f"{job}_0_log.out").read_text()


def test_b_a_two_point_sweep_is_one_job_array(tmp_path):
    log = tmp_path / "submit.log"
    text = _finish(_submit(_args(tmp_path, "sweep", "trainer=cpu", "trainer.max_steps=4", "seed=1,2"), log), log)
    done = re.findall(r"^\[slurm\] job (\d+)_(\d) \(#(\d) seed=(\d)\): COMPLETED test/bpd=(\d+\.\d+)", text, re.M)
    assert sorted((d[1], d[2], d[3]) for d in done) == [("0", "0", "1"), ("1", "1", "2")], text[-3000:]
    array = {d[0] for d in done}
    assert len(array) == 1, "one array job for the sweep"
    (array_id,) = array
    (script,) = (tmp_path / "out" / "multirun" / "sweep" / ".submitit").glob(".submission_file_*.sh")  # one sbatch
    assert any(line.startswith("#SBATCH --array=0-1") for line in script.read_text().splitlines())
    for task in ("0", "1"):
        assert _sacct(f"{array_id}_{task}") == "COMPLETED"
        record = json.loads((tmp_path / "out" / "multirun" / "sweep" / f"job{task}" / "results.json").read_text())
        assert record["global_step"] == 4


def test_a_request_the_node_cannot_satisfy_is_refused_in_one_line(tmp_path):
    out = subprocess.run(train_cmd(_args(tmp_path, "big", "trainer=ddp_cpu", "trainer.devices=16")), cwd=REPO,
                         env=child_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("error: hydra/launcher=slurm: the cluster refused the job"), out.stderr
    assert "tasks_per_node=16" in errors[0] and "Traceback" not in out.stderr
    assert not (tmp_path / "out" / "multirun" / "big").exists()


def test_c_sigusr1_under_ddp_requeues_resumes_and_ends_at_max_steps(tmp_path):
    max_steps, preemptions = 120, 3
    log = tmp_path / "submit.log"
    progress = tmp_path / "progress"
    proc = _submit(_args(tmp_path, "requeue", "trainer=ddp_cpu", f"trainer.max_steps={max_steps}",
                         "trainer.val_check_interval=1000", "+callbacks.slow._target_=tests.cluster.callbacks.SlowSteps",
                         f"+callbacks.slow.progress={progress}", "+callbacks.slow.seconds=0.1",
                         "+callbacks.slowtest._target_=tests.cluster.callbacks.SlowTest", "+callbacks.slowtest.seconds=2"), log)
    sweep = tmp_path / "out" / "multirun" / "requeue"
    ckpts = sweep / "job0" / "checkpoints"
    try:
        job = _until(lambda: (m := re.search(r"^\[slurm\] job (\d+) \(#0\): RUNNING", log.read_text(), re.M)) and m.group(1),
                     "the job to run", 120, proc, log)
        err = sweep / ".submitit" / job / f"{job}_0_log.err"
        stopped_at = 0
        for n in range(1, preemptions + 1):
            # a step beyond the last stop: this run has resumed and is training
            _until(lambda: progress.is_file() and int(progress.read_text() or 0) > stopped_at,
                   f"training after preemption {n - 1}", 180, proc, log)
            subprocess.run(["scancel", "--signal=USR1", job], check=True)
            said = _until(lambda: (m := re.findall(r"received SIGUSR1 at step (\d+): saved (\S+); requeued SLURM job",
                                                   err.read_text())) and len(m) == n and m[-1], f"preemption {n}", 120, proc, log)
            stopped_at = int(said[0])
            assert Path(said[1]) == ckpts / "last.ckpt" and load(ckpts / "last.ckpt")["global_step"] == stopped_at
            _until(lambda: _squeue_state(job) == "PENDING", f"the requeued job {job} to pend", 120, proc, log)
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)  # skip the ~2 min BeginTime
        # after training: SIGUSR1 during the test stage, then again, is noted and changes nothing
        _until(lambda: f"max_steps={max_steps}` reached" in err.read_text(), "the end of training", 300, proc, log)
        for _ in range(2):
            subprocess.run(["scancel", "--signal=USR1", job], check=False)
            time.sleep(1)
        text = _finish(proc, log, timeout=300)
    finally:
        stop(proc)
    assert proc.returncode == 0, text[-3000:]
    assert re.search(rf"^\[slurm\] job {job} \(#0\): COMPLETED test/bpd=\d+\.\d+", text, re.M), text[-3000:]
    requeues = re.findall(rf"^\[slurm\] job {job} \(#0\): REQUEUED \(restart (\d+)\)$", text, re.M)
    assert requeues == [str(n) for n in range(1, preemptions + 1)], "the submitter saw each requeue"
    assert _sacct(job) == "COMPLETED"
    out = (sweep / ".submitit" / job / f"{job}_0_log.out").read_text()  # rank 0's stdout, every run of the job
    assert out.count("Resuming from ") == preemptions and f"Resuming from {ckpts / 'last.ckpt'}" in out
    final = load(ckpts / "last.ckpt")
    assert final["global_step"] == max_steps
    assert {int(s["step"]) for s in final["optimizer_states"][0]["state"].values()} == {max_steps}
    assert "test/bpd=" in out and json.loads((sweep / "job0" / "results.json").read_text())["global_step"] == max_steps
