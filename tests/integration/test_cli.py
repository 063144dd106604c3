"""The console scripts end to end on generated data of the real on-disk formats.

Most runs are in-process (``run_hydra`` with an argv, much faster than a new interpreter); one
true subprocess test per console script checks what a user's shell sees.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.cli_runner import run_cli as run
from tests.fakedata import garbage, write_cifar10

BPD_LINE = re.compile(r"^test/bpd=(\d+\.\d+)$")


def quiet(extra: list[str] | None = None) -> list[str]:
    return ["callbacks.progress_bar=null", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
            *(extra or [])]


@pytest.fixture(scope="module")
def env(fake_data_dir, fake_data_overrides, tmp_path_factory):
    out = tmp_path_factory.mktemp("outputs")
    base = [f"paths.data_dir={fake_data_dir}", f"paths.output_dir={out}", *fake_data_overrides]
    return {"data": fake_data_dir, "out": out, "base": base}


@pytest.fixture(scope="module")
def trained(env):
    """One quick-start run (debug-sized) on the generated Fashion-MNIST files."""
    os.environ.setdefault("WANDB_MODE", "offline")
    args = ["experiment=quickstart", "debug=fast", "run_name=trained", *env["base"], *quiet()]
    code, out, err = run("train", args)
    assert code == 0, err[-3000:]
    return {"args": args, "stdout": out, "dir": env["out"] / "runs" / "trained"}


def _last_bpd(stdout: str) -> str:
    last = stdout.strip().splitlines()[-1]
    m = BPD_LINE.match(last)
    assert m, f"last line is {last!r}"
    return m.group(1)


def test_train_leaves_a_complete_run_directory(trained):
    d = trained["dir"]
    bpd = float(_last_bpd(trained["stdout"]))
    assert 0 < bpd < 12
    assert f"run directory: {d}" in trained["stdout"]
    assert sorted(p.name for p in (d / "samples").glob("*.png"))[-4:] == [
        "step_0000006_T0.00.png", "step_0000006_T0.50.png", "step_0000006_T0.70.png", "step_0000006_T1.00.png"]
    assert (d / "reconstructions" / "step_0000006.png").is_file()
    rows = (d / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert {"train/bpd", "val/bpd", "test/bpd", "step", "lr"} <= set(header)
    ckpts = {p.name for p in (d / "checkpoints").iterdir()}
    assert {"best.ckpt", "last.ckpt", "step_0000006.ckpt"} <= ckpts
    last = torch.load(d / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 6
    assert last["hyper_parameters"]["model"]["permutation"] == "nxn"
    assert list((d / "wandb").glob("offline-run-*/run-*.wandb")), "the W&B offline run"
    assert (d / ".hydra" / "config.yaml").is_file() and (d / ".hydra" / "overrides.yaml").is_file()
    results = json.loads((d / "results.json").read_text())
    assert f"{results['test/bpd']:.6f}" == f"{bpd:.6f}" and results["checkpoint"].endswith("best.ckpt")


def test_eval_reproduces_the_test_bpd_exactly(trained, env):
    code, out, err = run("eval", ["experiment=quickstart", "debug=fast", f"ckpt_path={trained['dir']}",
                                  "run_name=ev", *env["base"], *quiet()])
    assert code == 0, err[-3000:]
    assert _last_bpd(out) == _last_bpd(trained["stdout"])
    # another batch size: the same images with the same noise, so the same value up to float rounding
    code, out2, err = run("eval", ["experiment=quickstart", "debug=fast", f"ckpt_path={trained['dir']}",
                                   "run_name=ev2", *env["base"], *quiet(), "data.batch_size=3",
                                   "trainer.limit_test_batches=null"])
    assert code == 0, err[-3000:]
    full = float(_last_bpd(out2))
    code, out3, err = run("eval", ["experiment=quickstart", "debug=fast", f"ckpt_path={trained['dir']}",
                                   "run_name=ev3", *env["base"], *quiet(), "data.batch_size=10",
                                   "trainer.limit_test_batches=null"])
    assert code == 0, err[-3000:]
    assert float(_last_bpd(out3)) == pytest.approx(full, abs=1e-5)


def test_eval_with_several_draws_reports_their_mean(trained, env):
    code, out, err = run("eval", ["experiment=quickstart", "debug=fast", f"ckpt_path={trained['dir']}/checkpoints/last.ckpt",
                                  "run_name=ev_draws", "eval.draws=3", *env["base"], *quiet()])
    assert code == 0, err[-3000:]
    rec = json.loads((env["out"] / "eval" / "ev_draws" / "results.json").read_text())
    assert rec["draws"] == 3 and len(rec["per_draw"]) == 3 and len(set(rec["per_draw"])) == 3
    assert rec["test/bpd"] == pytest.approx(sum(rec["per_draw"]) / 3, abs=1e-12)
    assert _last_bpd(out) == f"{rec['test/bpd']:.6f}"


def test_sample_writes_grids_of_the_right_size(trained, env):
    code, out, err = run("sample", ["experiment=quickstart", f"ckpt_path={trained['dir']}", "run_name=smp",
                                    "sample.temperatures=[0,0.7]", "sample.n_samples=6", "sample.nrow=3",
                                    "sample.reconstructions=4", *env["base"]])
    assert code == 0, err[-3000:]
    d = env["out"] / "samples" / "smp"
    pad = 2  # torchvision.utils.make_grid's padding
    with Image.open(d / "samples_T0.70.png") as im:
        assert im.size == (3 * (28 + pad) + pad, 2 * (28 + pad) + pad)
    assert (d / "samples_T0.00.png").is_file()
    with Image.open(d / "reconstructions.png") as im:  # 4 pairs in one row: input, reconstruction, ...
        assert im.size == (8 * (28 + pad) + pad, 28 + 2 * pad)
    rec = json.loads((d / "samples.json").read_text())
    assert rec["reconstruction_max_abs_error"] < 1e-3


def test_rerun_with_the_same_run_name_resumes_and_keeps_earlier_results(env):
    args = ["experiment=quickstart", "debug=fast", "run_name=resumed", *env["base"], *quiet()]
    code, _, err = run("train", [*args, "trainer.max_steps=3"])
    assert code == 0, err[-3000:]
    d = env["out"] / "runs" / "resumed"
    first_rows = (d / "metrics.csv").read_text().splitlines()
    first_ckpt = (d / "checkpoints" / "step_0000003.ckpt").read_bytes()
    code, out, err = run("train", [*args, "trainer.max_steps=6"])
    assert code == 0, err[-3000:]
    assert f"Resuming from {d / 'checkpoints' / 'last.ckpt'}" in out
    rows = (d / "metrics.csv").read_text().splitlines()
    assert len(rows) > len(first_rows)
    assert torch.load(d / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6
    assert (d / "checkpoints" / "step_0000003.ckpt").read_bytes() == first_ckpt
    # ckpt_path of another model configuration is refused, naming the keys that differ
    code, _, err = run("train", [*args, "trainer.max_steps=9", "model.hidden_channels=8"])
    assert code == 2 and "model.hidden_channels: 16 in the checkpoint, 8 in the config" in err


def _fingerprint(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file() and p.suffix != ".log"}


BAD_INPUTS = [
    (["model/permutation=nope"], "model/permutation=nope is not a known option; available model/permutation "
                                 "options: conv1x1, conv1x1_lu, emerging, nxn, nxn_lu, reverse, shuffle"),
    (["model.permutation=nope"], "model.permutation='nope' is unknown"),
    (["data=nope"], "data=nope is not a known option; available data options: celebahq256, cifar10"),
    (["model.L=3"], "model.L=3: image size 28 is not divisible by 2^3 = 8"),
    (["data.n_bits=9"], "data.n_bits=9 is not allowed: it must be an integer from 1 to 8"),
    (["data=cifar10", "paths.data_dir={missing}"], "CIFAR-10 not found"),
    (["data=cifar10", "paths.data_dir={corrupt}"], "data_batch_1"),
]


@pytest.fixture(scope="module")
def corrupt_cifar(tmp_path_factory):
    root = tmp_path_factory.mktemp("corrupt")
    write_cifar10(root, n_train=40, n_test=10)
    garbage(root / "cifar-10-batches-py" / "data_batch_1")
    return root


@pytest.mark.parametrize("bad, message", BAD_INPUTS, ids=[b[0][-1] for b in BAD_INPUTS])
def test_bad_input_gives_one_message_and_leaves_earlier_runs_alone(bad, message, trained, env, corrupt_cifar, tmp_path):
    before = _fingerprint(trained["dir"])
    bad = [b.format(missing=tmp_path / "nowhere", corrupt=corrupt_cifar) for b in bad]
    for run_name in ("trained", "fresh_bad_run"):  # an existing run's name, and a new one
        args = ["experiment=quickstart", "debug=fast", f"run_name={run_name}", *env["base"], *quiet(), *bad]
        code, out, err = run("train", args)
        assert code == 2, (out[-2000:], err[-2000:])
        lines = [ln for ln in err.strip().splitlines() if ln.strip()]
        assert lines[0].startswith("error: "), err
        # into an existing run, a config of another model may first be refused as not matching its checkpoint
        assert message in err or (run_name == "trained" and "belongs to another model configuration" in err), err
        assert "Traceback" not in err + out and "test/bpd=" not in out
        assert _fingerprint(trained["dir"]) == before, "an earlier run's files were changed"
    assert not (env["out"] / "runs" / "fresh_bad_run").exists(), "a rejected command left a run directory"


def test_eval_and_sample_refuse_bad_checkpoints(env, tmp_path):
    marker = tmp_path / "payload_ran"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"model": {}}, "p": Payload()}, evil)
    for command in ("eval", "sample"):
        code, out, err = run(command, ["experiment=quickstart", f"ckpt_path={evil}", *env["base"]])
        assert code == 2 and err.startswith("error: ") and "unsafe" in err and "Traceback" not in err
        code, out, err = run(command, ["experiment=quickstart", f"ckpt_path={tmp_path / 'none.ckpt'}", *env["base"]])
        assert code == 2 and "no such checkpoint file" in err
        code, out, err = run(command, ["experiment=quickstart", *env["base"]])
        assert code == 2 and "ckpt_path is not set" in err
    assert not marker.exists()


def test_eval_refuses_data_that_does_not_fit_the_model(trained, env):
    code, _, err = run("eval", ["experiment=quickstart", "data=cifar10", f"ckpt_path={trained['dir']}", *env["base"]])
    assert code == 2 and "does not fit the model" in err and "data.channels=3 but the model expects 1" in err


# ---- true subprocesses: what a shell sees -------------------------------------------------------------------
def _script(name: str) -> str:
    path = Path(sys.executable).with_name(name)
    if not path.exists():
        pytest.skip(f"{name} is not installed next to {sys.executable} (pip install -e .)")
    return str(path)


def _sub(name: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true")
    return subprocess.run([_script(name), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_console_scripts_in_a_shell(env, tmp_path):
    """train -> eval -> sample, each a new process started from another directory, as a user would."""
    base = [f"paths.data_dir={env['data']}", "data.batch_size=4", "data.val_size=0.2", "logger=csv", *quiet()]
    p = _sub("flowlab-train", ["experiment=quickstart", "debug=fast", "run_name=sub", *base], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    bpd = _last_bpd(p.stdout)
    run_dir = tmp_path / "outputs" / "runs" / "sub"  # paths.output_dir defaults to ./outputs
    assert f"run directory: {run_dir}" in p.stdout
    p = _sub("flowlab-eval", ["experiment=quickstart", "debug=fast", f"ckpt_path={run_dir}", *base], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert _last_bpd(p.stdout) == bpd
    p = _sub("flowlab-sample", ["experiment=quickstart", f"ckpt_path={run_dir}", "sample.n_samples=4",
                                "sample.reconstructions=0", "run_name=s"], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (tmp_path / "outputs" / "samples" / "s" / "samples_T1.00.png").is_file()


@pytest.mark.parametrize("script, args, message", [
    ("flowlab-train", ["experiment=quickstart", "model.L=3"],
     "error: model.L=3: image size 28 is not divisible by 2^3 = 8; use a smaller L (at most 2 for size 28) "
     "or resize/pad the images"),
    ("flowlab-eval", ["ckpt_path=missing.ckpt"], "error: ckpt_path=missing.ckpt: no such checkpoint file"),
    ("flowlab-sample", ["data=nope"], "error: data=nope is not a known option; available data options: "),
])
def test_console_scripts_report_mistakes_in_one_line(script, args, message, tmp_path):
    """What a shell sees: the installed script, config found from another directory, one line, status 2."""
    p = _sub(script, args, cwd=tmp_path)
    assert p.returncode == 2 and p.stdout == "", (p.stdout, p.stderr)
    assert p.stderr.startswith(message) and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert not any(tmp_path.iterdir()), "nothing written"
