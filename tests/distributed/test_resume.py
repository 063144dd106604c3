"""Preemption and resume, with true subprocesses killed and signalled the way a scheduler does it.

- SIGKILL after the first checkpoint, then the same command again: "Resuming from ...", and the run ends at
  exactly trainer.max_steps with optimiser (Adam's step count), scheduler and EMA state carried over.
- SIGTERM and SIGUSR1: the run saves last.ckpt at a step boundary, says so, exits 128 + signal; the same
  command resumes from that checkpoint.
- A save killed midway leaves the previous checkpoint loadable and never a half-written file under a
  checkpoint's name.
"""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys

import pytest

from flowlab.errors import CheckpointError
from flowlab.lit.checkpoint import load_checkpoint, module_from_checkpoint
from tests.distributed.helpers import (
    REPO,
    base_args,
    child_env,
    load,
    run_train,
    signal_when,
    start_train,
    stop,
    wait_for,
    write_data,
)

pytestmark = pytest.mark.distributed


def _slow(seconds: float) -> list[str]:
    return ["+callbacks.slow._target_=tests.distributed.helpers.SlowSteps", f"+callbacks.slow.seconds={seconds}"]


def _adam_steps(ckpt: dict) -> set[int]:
    return {int(s["step"]) for s in ckpt["optimizer_states"][0]["state"].values()}


def _step(path) -> int:
    return int(load(path)["global_step"])


def test_sigkill_then_same_command_resumes_and_ends_at_max_steps(tmp_path):
    data, out = write_data(tmp_path / "data"), tmp_path / "out"
    max_steps = 30
    args = base_args(data, out, f"trainer.max_steps={max_steps}", "callbacks.checkpoint.every_n_train_steps=4",
                     "trainer.val_check_interval=10", "optim.ema_decay=0.9", "run_name=killed", *_slow(0.1))
    last = out / "runs" / "killed" / "checkpoints" / "last.ckpt"
    log = tmp_path / "first.log"
    proc = start_train(args, log)
    signal_when(last.is_file, proc, "the first checkpoint", log, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    killed_at = _step(last)
    assert 4 <= killed_at < max_steps, killed_at
    assert "test/bpd=" not in log.read_text()

    p = run_train(args)  # exactly the same command
    assert p.returncode == 0, p.stderr[-4000:]
    assert f"Resuming from {last}" in p.stdout
    final = load(last)
    assert final["global_step"] == max_steps
    assert _adam_steps(final) == {max_steps}, "Adam's state continued from the checkpoint"
    assert final["lr_schedulers"][0]["last_epoch"] == max_steps
    assert int(final["state_dict"]["ema.num_updates"]) == max_steps, "the EMA continued, it was not reset"
    assert {"python", "numpy", "torch"} <= set(final["callbacks"]["Preemption"]["rng"])
    results = json.loads((out / "runs" / "killed" / "results.json").read_text())
    assert results["global_step"] == max_steps
    with open(out / "runs" / "killed" / "metrics.csv", newline="") as f:
        steps = {int(r["step"]) for r in csv.DictReader(f) if r.get("train/bpd")}
    assert min(steps) < killed_at and max(steps) >= max_steps - 1, "metrics of both parts are kept"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_signal_saves_a_checkpoint_before_exit_and_the_same_command_resumes(tmp_path, signum):
    data, out = write_data(tmp_path / "data"), tmp_path / "out"
    args = base_args(data, out, "trainer.max_steps=400", "callbacks.checkpoint.every_n_train_steps=4",
                     "trainer.val_check_interval=50", "run_name=signalled", *_slow(0.1))
    ckpts = out / "runs" / "signalled" / "checkpoints"
    last = ckpts / "last.ckpt"
    log = tmp_path / "first.log"
    proc = start_train(args, log)
    signal_when(last.is_file, proc, "the first checkpoint", log, signum, wait_s=120)
    text = log.read_text()
    assert proc.returncode == 128 + signum, text[-3000:]
    saved = _step(last)
    assert f"received {signal.Signals(signum).name} at step {saved}: saved {last}" in text
    assert 4 <= saved < 400 and _adam_steps(load(last)) == {saved}
    assert "Traceback" not in text

    log2 = tmp_path / "second.log"
    proc = start_train(args, log2)  # the same command: resumes from the signal's checkpoint
    try:
        wait_for(lambda: f"Resuming from {last}" in log2.read_text() and _step(last) > saved, proc, 300,
                 "a checkpoint after resuming", log2)
    finally:
        stop(proc)
    resumed = load(last)
    assert resumed["global_step"] > saved and _adam_steps(resumed) == {resumed["global_step"]}


_SLOW_WRITER = r"""
import io, os, sys, time
import torch
import flowlab.lit.checkpoint as ck

real = ck._write

def half_then_hang(obj, f):
    if int(obj.get("global_step", 0)) >= 8:  # the saves from step 8 on are killed midway
        buf = io.BytesIO()
        torch.save(obj, buf)
        data = buf.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        os.fsync(f.fileno())
        with open(os.environ["FLOWLAB_TEST_MARKER"], "w") as m:
            m.write(f.name)
        time.sleep(3600)
    real(obj, f)

ck._write = half_then_hang
from flowlab.cli.train import main
sys.argv = ["flowlab-train", *sys.argv[1:]]
main()
"""


def test_a_save_killed_midway_leaves_the_previous_checkpoint_intact(tmp_path):
    data, out = write_data(tmp_path / "data"), tmp_path / "out"
    args = base_args(data, out, "trainer.max_steps=12", "callbacks.checkpoint.every_n_train_steps=4",
                     "trainer.val_check_interval=100", "run_name=torn")
    ckpts = out / "runs" / "torn" / "checkpoints"
    marker = tmp_path / "writing"
    log = tmp_path / "torn.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-c", _SLOW_WRITER, *args], cwd=REPO, stdout=f,
                                stderr=subprocess.STDOUT, env=child_env(FLOWLAB_TEST_MARKER=str(marker)))
    signal_when(marker.is_file, proc, "a save at step 8 to start", log, signal.SIGKILL)
    partial = ckpts / marker.read_text().rsplit("/", 1)[-1]
    assert partial.is_file() and partial.name.startswith(".") and ".tmp-" in partial.name
    with pytest.raises(CheckpointError):
        load_checkpoint(partial)  # the torn file really is unreadable ...
    final_name = partial.name[1:].split(".tmp-")[0]
    assert not (ckpts / final_name).exists() or _step(ckpts / final_name) < 8  # ... and it is not under its name
    assert _step(ckpts / "last.ckpt") == 4  # the previous good checkpoint
    module, ckpt, _ = module_from_checkpoint(ckpts / "last.ckpt")
    assert ckpt["global_step"] == 4 and module.num_params > 0
    assert sorted(p.name for p in ckpts.glob("*.ckpt")) == ["last.ckpt", "step_0000004.ckpt"]

    p = run_train(args)  # the run goes on from the intact checkpoint
    assert p.returncode == 0, p.stderr[-4000:]
    assert f"Resuming from {ckpts / 'last.ckpt'}" in p.stdout
    assert _step(ckpts / "last.ckpt") == 12
    assert not list(ckpts.glob(".*.tmp-*")), "the next save of that name removed the torn file"
