"""One run, one folder, one W&B run; exact resume; faults that end in one line and lose nothing.

Each test repeats what a user did when the problem was found (findings 1-7), through the real command
line: in this process where that is enough, as a subprocess where a signal, a kill or a second
concurrent command is part of the story. The README's promises "runs never share a directory", "a
rejected command writes nothing" and "nothing an earlier run wrote is overwritten" have their own tests.
"""

from __future__ import annotations

import errno
import hashlib
import json
import random
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from flowlab.cli._hydra import run_stamp
from tests.cli_runner import run_cli
from tests.distributed.helpers import base_args, load, run_train, start_train, stop, wait_for, write_data


@pytest.fixture()
def setup(tmp_path):
    return write_data(tmp_path / "data"), tmp_path / "out"


def train(data, out, *extra) -> tuple[int, str, str]:
    return run_cli("train", base_args(data, out, *extra))


def one_line(code: int, err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err[-3000:]
    return lines[0]


def fingerprint(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _slow(seconds: float) -> list[str]:
    return ["+callbacks.slow._target_=tests.distributed.helpers.SlowSteps", f"+callbacks.slow.seconds={seconds}"]


# ---- finding 1: two runs started in the same second shared one run directory --------------------------------------
def test_default_names_are_unique_within_a_second_and_name_the_slurm_job(monkeypatch):
    names = {run_stamp() for _ in range(50)}
    assert len(names) == 50, "a random suffix tells apart runs started in the same second"
    monkeypatch.delenv("SLURM_STEP_ID", raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    assert run_stamp() == "slurm-77"
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "70")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert run_stamp() == "slurm-70_3"
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    assert run_stamp() == "slurm-70_3.0"


def test_runs_never_share_a_directory_even_with_the_same_default_name(setup):
    """README: runs never share a directory. Two runs whose default name came out the same (same second, same
    suffix): the second gets <name>-1 and says so; each results.json is its own."""
    data, out = setup
    OmegaConf.register_new_resolver("run_stamp", lambda: "same-second", use_cache=True, replace=True)
    try:
        first = train(data, out, "trainer.max_steps=3")
        second = train(data, out, "trainer.max_steps=3", "seed=1")
    finally:
        OmegaConf.register_new_resolver("run_stamp", run_stamp, use_cache=True, replace=True)
    assert first[0] == 0 and second[0] == 0, (first[2][-2000:], second[2][-2000:])
    a, b = out / "runs" / "quickstart_same-second", out / "runs" / "quickstart_same-second-1"
    assert f"{a} holds another run" in second[1] and f"run directory: {b}" in second[1]
    assert json.loads((a / "results.json").read_text())["run_dir"] == str(a)
    assert json.loads((b / "results.json").read_text())["run_dir"] == str(b)
    assert load(a / "checkpoints" / "last.ckpt")["hyper_parameters"]["seed"] == 0
    assert load(b / "checkpoints" / "last.ckpt")["hyper_parameters"]["seed"] == 1


@pytest.mark.slow
def test_the_same_run_name_started_twice_at_once_is_refused_while_the_first_runs(tmp_path):
    data, out = write_data(tmp_path / "data"), tmp_path / "out"
    args = base_args(data, out, "run_name=shared", "trainer.max_steps=400", *_slow(0.05))
    log = tmp_path / "first.log"
    first = start_train(args, log)
    try:
        wait_for(lambda: (out / "runs" / "shared" / "metrics.csv").is_file(), first, 300, "the first run's metrics", log)
        second = run_train(args)
        line = one_line(second.returncode, second.stderr)
        assert f"{out / 'runs' / 'shared'} is in use by process {first.pid}" in line
    finally:
        stop(first)


@pytest.mark.slow
def test_two_default_runs_started_together_get_two_directories(tmp_path):
    """``for s in 0 1; do flowlab-train seed=$s & done``."""
    data, out = write_data(tmp_path / "data"), tmp_path / "out"
    procs = [start_train(base_args(data, out, "trainer.max_steps=3", f"seed={s}"), tmp_path / f"{s}.log")
             for s in (0, 1)]
    for p in procs:
        p.wait(timeout=600)
    logs = [(tmp_path / f"{s}.log").read_text() for s in (0, 1)]
    assert [p.returncode for p in procs] == [0, 0], logs
    dirs = {ln.split(": ", 1)[1] for text in logs for ln in text.splitlines() if ln.startswith("run directory: ")}
    assert len(dirs) == 2
    assert sorted(load(Path(d) / "checkpoints" / "last.ckpt")["hyper_parameters"]["seed"] for d in dirs) == [0, 1]


# ---- finding 2: one refused point stopped every later point of a multirun ---------------------------------------
def test_a_refused_multirun_point_is_recorded_and_the_others_run(setup):
    data, out = setup
    code, stdout, err = run_cli("train", ["-m", *base_args(data, out, "run_name=sweep", "trainer.max_steps=2",
                                                           "model.L=3,2")])
    assert code == 2, err[-3000:]  # 2: every failing point was refused (1 when one failed otherwise)
    assert "error: [model.L=3] model.L=3: image size 28 is not divisible by 2^3 = 8" in err
    assert "sweep: 1 of 2 points done, 1 not" in err
    rows = {ln.split()[0]: ln.split()[1] for ln in err.splitlines() if ln.startswith("model.L=")}
    assert rows == {"model.L=3": "refused", "model.L=2": "done"}, err[-2000:]
    done = [json.loads(p.read_text()) for p in (out / "multirun" / "sweep").glob("*/results.json")]
    assert [r["global_step"] for r in done] == [2] and ",model.L=2," in done[0]["run_dir"]
    assert "Traceback" not in err


def test_a_divergent_multirun_point_is_recorded_as_failed_and_the_sweep_exits_1(setup, monkeypatch):
    from flowlab.lit import FlowModule

    data, out = setup
    original = FlowModule.on_train_batch_end

    def poison_seed_1(self, outputs, batch, batch_idx):
        self.hparams.optim["max_consecutive_skips"] = 2  # (as an override, the job's directory name gets too long)
        if self.hparams.seed == 1 and self.global_step == 2:
            with torch.no_grad():
                next(self.flow.parameters()).fill_(float("nan"))
        original(self, outputs, batch, batch_idx)

    monkeypatch.setattr(FlowModule, "on_train_batch_end", poison_seed_1)
    code, stdout, err = run_cli("train", ["-m", *base_args(data, out, "run_name=lr", "seed=1,0")])
    assert code == 1, err[-3000:]
    rows = {ln.split()[0]: ln.split()[1] for ln in err.splitlines() if ln.startswith("seed=")}
    assert rows == {"seed=1": "failed", "seed=0": "done"} and "error: [seed=1] training stopped at step" in err


# ---- finding 3: a missing last.ckpt started the run from scratch in the same folder -------------------------------
def test_without_last_ckpt_the_run_resumes_from_its_newest_valid_step_checkpoint(setup):
    data, out = setup
    args = ["run_name=r", "callbacks.checkpoint.every_n_train_steps=3"]
    assert train(data, out, *args, "trainer.max_steps=6")[0] == 0
    ckpts = out / "runs" / "r" / "checkpoints"
    (ckpts / "last.ckpt").unlink()
    (ckpts / "step_0000006.ckpt").write_bytes((ckpts / "step_0000006.ckpt").read_bytes()[:1000])  # truncated
    code, stdout, err = train(data, out, *args, "trainer.max_steps=9")
    assert code == 0, err[-3000:]
    assert f"{ckpts / 'step_0000006.ckpt'} could not be read" in err and "resuming from an older checkpoint" in err
    assert f"Resuming from {ckpts / 'step_0000003.ckpt'}" in stdout
    assert load(ckpts / "last.ckpt")["global_step"] == 9


def test_a_folder_with_a_run_but_no_checkpoint_is_never_restarted_silently(setup):
    """README: nothing an earlier run wrote is overwritten."""
    data, out = setup
    args = ["run_name=r", "callbacks.checkpoint.every_n_train_steps=3"]
    assert train(data, out, *args, "trainer.max_steps=3")[0] == 0
    run = out / "runs" / "r"
    shutil.rmtree(run / "checkpoints")
    before = fingerprint(run)
    line = one_line(*train(data, out, *args, "trainer.max_steps=6")[::2])
    assert f"run_name=r: {run} holds a run but no valid checkpoint" in line and "resume=false" in line
    assert fingerprint(run) == before
    code, stdout, err = train(data, out, *args, "trainer.max_steps=3", "resume=false")
    assert code == 0, err[-3000:]
    assert f"run directory: {out / 'runs' / 'r-1'}" in stdout and fingerprint(run) == before


# ---- finding 4: a copied run directory resumed from a stale checkpoint on the second rerun ------------------------
def test_a_moved_run_directory_resumes_from_its_newest_checkpoint_every_time(setup):
    data, out = setup
    args = ["callbacks.checkpoint.every_n_train_steps=3"]
    assert train(data, out, *args, "run_name=a", "trainer.max_steps=3")[0] == 0
    shutil.move(out / "runs" / "a", out / "runs" / "b")
    ckpts = out / "runs" / "b" / "checkpoints"
    for steps in (6, 9):  # resume picks the newest last*.ckpt (a copied folder may also hold Lightning's last-v1.ckpt)
        newest = max(ckpts.glob("last*.ckpt"), key=lambda p: load(p)["global_step"])
        assert load(newest)["global_step"] == steps - 3
        code, stdout, err = train(data, out, *args, "run_name=b", f"trainer.max_steps={steps}")
        assert code == 0 and f"Resuming from {newest}\n" in stdout, (stdout[-2000:], err[-2000:])
    # the version counter is off: last.ckpt itself moves on, no stale copy beside it
    assert load(ckpts / "last.ckpt")["global_step"] == 9 and not (ckpts / "last-v1.ckpt").exists()


# ---- finding 5: resume was not exact -----------------------------------------------------------------------------
def _same_state(a: dict, b: dict) -> None:
    assert a["global_step"] == b["global_step"]
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    sa, sb = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    for i in sa:
        for k in sa[i]:
            assert torch.equal(torch.as_tensor(sa[i][k]), torch.as_tensor(sb[i][k])), (i, k)


def test_a_run_stopped_at_a_random_step_and_resumed_ends_exactly_as_an_uninterrupted_one(setup):
    data, out = setup
    common = ["callbacks.checkpoint.every_n_train_steps=4", "trainer.val_check_interval=6", "optim.ema_decay=0.9"]
    stop_at = random.Random().randint(1, 24)  # 10 batches an epoch: mid-epoch, at an epoch's end, anywhere
    assert train(data, out, *common, "run_name=whole", "trainer.max_steps=25")[0] == 0
    assert train(data, out, *common, "run_name=parts", f"trainer.max_steps={stop_at}")[0] == 0
    code, stdout, err = train(data, out, *common, "run_name=parts", "trainer.max_steps=25")
    assert code == 0 and "Resuming from" in stdout, err[-3000:]
    whole, parts = (load(out / "runs" / n / "checkpoints" / "last.ckpt") for n in ("whole", "parts"))
    _same_state(whole, parts)  # bitwise: the same batches, noise, RNG, EMA and skip counters
    assert "resumable" not in err, "Lightning's warning about a loader that is not resumable"


@pytest.mark.slow
def test_sigkill_at_a_random_step_then_rerun_ends_exactly_as_an_uninterrupted_run(tmp_path):
    data, out = write_data(tmp_path / "data"), tmp_path / "out"
    common = ["callbacks.checkpoint.every_n_train_steps=1", "trainer.max_steps=25", "optim.ema_decay=0.9"]
    assert run_train(base_args(data, out, *common, "run_name=whole")).returncode == 0
    kill_after = random.Random().randint(2, 20)
    args = base_args(data, out, *common, "run_name=killed", *_slow(0.05))
    last = out / "runs" / "killed" / "checkpoints" / "last.ckpt"
    log = tmp_path / "killed.log"
    proc = start_train(args, log)
    try:
        wait_for(lambda: last.is_file() and load(last)["global_step"] >= kill_after, proc, 300, "a checkpoint", log)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        stop(proc)
    assert load(last)["global_step"] < 25
    p = run_train(args)
    assert p.returncode == 0 and f"Resuming from {last}" in p.stdout, p.stderr[-3000:]
    _same_state(load(out / "runs" / "whole" / "checkpoints" / "last.ckpt"), load(last))


# ---- finding 6: a resumed run was a new W&B run ------------------------------------------------------------------
def test_a_resumed_run_continues_its_wandb_run(setup):
    data, out = setup
    args = ["run_name=w", "logger=wandb", "callbacks.checkpoint.every_n_train_steps=3"]
    assert train(data, out, *args, "trainer.max_steps=3")[0] == 0
    code, stdout, err = train(data, out, *args, "trainer.max_steps=6")
    assert code == 0 and "Resuming from" in stdout, err[-3000:]
    run = out / "runs" / "w"
    # offline-run-<date>_<time>-<id>, plus "-1" when both parts start in the same second
    ids = {p.name.split("-")[3] for p in (run / "wandb").glob("offline-run-*")}
    assert len(list((run / "wandb").glob("offline-run-*"))) == 2 and len(ids) == 1, ids  # two parts, one W&B run
    assert ids == {(run / "wandb_id").read_text().strip()}


# ---- finding 7: smaller faults -------------------------------------------------------------------------------------
def test_a_full_disk_ends_in_one_line_naming_the_path_and_the_free_space(setup, monkeypatch):
    import flowlab.lit.checkpoint as ck

    data, out = setup
    assert train(data, out, "run_name=d", "trainer.max_steps=3", "callbacks.checkpoint.every_n_train_steps=3")[0] == 0
    before = fingerprint(out / "runs" / "d" / "checkpoints")

    def full(obj, f):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ck, "_write", full)
    code, stdout, err = train(data, out, "run_name=d", "trainer.max_steps=6",
                              "callbacks.checkpoint.every_n_train_steps=3")
    line = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert code == 2 and len(line) == 1 and "Traceback" not in err, err[-3000:]
    assert "no space left on the device writing" in line[0] and "MiB free in" in line[0]
    assert str(out / "runs" / "d" / "checkpoints") in line[0]
    assert fingerprint(out / "runs" / "d" / "checkpoints") == before, "the earlier checkpoints are intact"


def test_a_text_file_named_ckpt_is_refused_as_not_a_checkpoint(setup, tmp_path):
    data, out = setup
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint\n")
    for command, args in (("train", base_args(data, out, f"ckpt_path={text}")),
                          ("eval", [f"ckpt_path={text}", f"paths.data_dir={data}", f"paths.output_dir={out}"])):
        line = one_line(*run_cli(command, args)[::2])
        assert f"{text} is not a checkpoint: the file is not a PyTorch checkpoint" in line, line
    # ... and as a run's last.ckpt: passed over for the newest valid checkpoint, saying so
    assert train(data, out, "run_name=t", "trainer.max_steps=3", "callbacks.checkpoint.every_n_train_steps=3")[0] == 0
    last = out / "runs" / "t" / "checkpoints" / "last.ckpt"
    last.write_text("not a checkpoint\n")
    code, stdout, err = train(data, out, "run_name=t", "trainer.max_steps=6", "callbacks.checkpoint.every_n_train_steps=3")
    assert code == 0 and f"{last} is not a checkpoint" in err and "Resuming from" in stdout and "step_0000003" in stdout


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGHUP], ids=["SIGINT", "SIGHUP"])
def test_ctrl_c_and_sighup_save_once_and_exit_128_plus_the_signal(tmp_path, signum):
    data, out = write_data(tmp_path / "data"), tmp_path / "out"
    args = base_args(data, out, "trainer.max_steps=400", "callbacks.checkpoint.every_n_train_steps=4",
                     "run_name=ctrlc", *_slow(0.1))
    last = out / "runs" / "ctrlc" / "checkpoints" / "last.ckpt"
    log = tmp_path / "log"
    proc = start_train(args, log)
    try:
        wait_for(last.is_file, proc, 300, "the first checkpoint", log)
        proc.send_signal(signum)
        proc.wait(timeout=120)
    finally:
        stop(proc)
    text = log.read_text()
    assert proc.returncode == 128 + signum, text[-3000:]
    step = load(last)["global_step"]
    assert f"received {signal.Signals(signum).name} at step {step}: saved {last}" in text, text[-3000:]  # not SIGTERM
    assert "Traceback" not in text
    assert 4 <= step < 400 and int(load(last)["optimizer_states"][0]["state"][0]["step"]) == step


@pytest.mark.slow
def test_a_second_ctrl_c_exits_at_once(tmp_path):
    data, out = write_data(tmp_path / "data"), tmp_path / "out"
    args = base_args(data, out, "trainer.max_steps=400", "run_name=twice", *_slow(3.0))
    log = tmp_path / "log"
    proc = start_train(args, log)
    try:
        wait_for(lambda: "Loading" in log.read_text() or (out / "runs" / "twice" / "metrics.csv").is_file(),
                 proc, 300, "training", log)
        time.sleep(4)  # inside a 3-second step
        proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=2)  # long before the step ends
    finally:
        stop(proc)
    assert proc.returncode == 130 and "received SIGINT again: exiting now" in log.read_text()


def test_a_divergent_run_names_the_newest_weights_that_give_a_finite_loss(setup, monkeypatch):
    from flowlab.lit import FlowModule

    data, out = setup
    original = FlowModule.on_train_batch_end

    def poison_at_step_5(self, outputs, batch, batch_idx):
        if self.global_step == 5:
            with torch.no_grad():
                next(self.flow.parameters()).fill_(float("nan"))  # the weights themselves now give NaN
        original(self, outputs, batch, batch_idx)

    monkeypatch.setattr(FlowModule, "on_train_batch_end", poison_at_step_5)
    code, stdout, err = train(data, out, "run_name=div", "trainer.max_steps=30", "optim.max_consecutive_skips=3",
                              "callbacks.checkpoint.every_n_train_steps=2", "callbacks.checkpoint.save_top_k=-1")
    line = one_line(code, err)
    ckpts = out / "runs" / "div" / "checkpoints"
    assert "training stopped at step 8" in line and "already give a non-finite loss" in line, line
    assert f"kept in {ckpts / 'diverged_step_0000008.ckpt'}" in line and not list(ckpts.glob("last_good*"))
    assert f"ckpt_path={ckpts / 'step_0000004.ckpt'}" in line, line  # step 5's weights are NaN, so step 6's too
    # with no limit on skipped steps, the run ends with test/bpd=nan: not a success
    code, stdout, err = train(data, out, "run_name=div2", "trainer.max_steps=8", "optim.max_consecutive_skips=null",
                              "callbacks.best_checkpoint=null", "optim.ema_decay=null")  # the last weights are tested
    line = one_line(code, err)
    assert "test/bpd=nan is not finite" in line and "test/bpd=nan" in stdout


@pytest.mark.parametrize("bad, named", [("trainer.val_check_interval=0", "trainer.val_check_interval=0"),
                                        ("trainer.max_time=abc", "trainer.max_time='abc'"),
                                        ("run_name=../../x", "run_name='../../x'"),
                                        ("data.batch_size=100000", "data.batch_size=100000")])
def test_a_rejected_command_writes_nothing(setup, bad, named):
    """README: a rejected command writes nothing, also into an existing run's directory (.hydra/config.yaml,
    hparams.yaml)."""
    data, out = setup
    assert train(data, out, "run_name=kept", "trainer.max_steps=2")[0] == 0
    before = fingerprint(out)
    for name in ("kept", "new"):
        line = one_line(*train(data, out, f"run_name={name}", "trainer.max_steps=4", bad)[::2])
        assert named in line, line
        assert fingerprint(out) == before
    assert not (out.parent / "x").exists()


def test_evaluation_says_which_data_files_it_read(setup):
    data, out = setup
    code, stdout, err = train(data, out, "run_name=e", "trainer.max_steps=2")
    assert code == 0
    folder = data / "fashion-mnist"
    assert f"train 40 + val 8 images from {folder}" in stdout and f"test 11 images from {folder}" in stdout
    results = json.loads((out / "runs" / "e" / "results.json").read_text())
    assert f"test 11 images from {folder}" in results["data"]
    code, stdout, err = run_cli("eval", [f"ckpt_path={out / 'runs' / 'e'}", f"paths.data_dir={data}",
                                         f"paths.output_dir={out}", "run_name=e"])
    assert code == 0 and f"test 11 images from {folder}" in stdout, err[-2000:]
    assert f"test 11 images from {folder}" in json.loads((out / "eval" / "e" / "results.json").read_text())["data"]
