"""Bad input through the command line: every config mistake is caught before data is read, naming the
key and the value; every data fault names the file; checkpoints never run code and name mismatched keys;
a rejected command writes nothing, and no command overwrites an earlier command's outputs.

In-process runs (``run_hydra`` with an argv) for the many cases; one test runs five typical mistakes
in a shell, exactly as a new user types them.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.core.global_hydra import GlobalHydra

from flowlab.cli import _build
from tests.cli_runner import QUIET
from tests.cli_runner import run_cli as run
from tests.fakedata import garbage, truncate, write_celebahq, write_cifar10, write_idx, write_imagenet_npz


def one_error_line(err: str, out: str = "") -> str:
    """The single ``error: ...`` line a user error must produce (no traceback, nothing else)."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in err + out, err[-3000:]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1, err[-3000:]
    return errors[0]


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("outputs")


# ---- config values: refused before any work, naming the key and the value ---------------------------------------
CONFIG_ERRORS = [  # (overrides, the key and the value the one line must name)
    (["model.K=0"], "model.K", "0"),
    (["model.L=0"], "model.L", "0"),
    (["model.L=3"], "model.L=3", "image size 28"),
    (["data=cifar10", "model.L=6"], "model.L=6", "image size 32"),
    (["data=celebahq256", "data.image_size=40", "model.L=4"], "model.L=4", "image size 40"),
    (["data=cifar10", "data.image_size=40"], "data.image_size", "40"),
    (["data.n_bits=0"], "data.n_bits", "0"),
    (["data.n_bits=9"], "data.n_bits", "9"),
    (["data.batch_size=0"], "data.batch_size", "0"),
    (["model.hidden_channels=0"], "model.hidden_channels", "0"),
    (["model.hidden_channels=-8"], "model.hidden_channels", "-8"),
    (["model.kernel_size=0"], "model", "kernel_size=0"),
    (["callbacks.samples.temperatures=[0.5,-1]"], "callbacks.samples.temperatures", "-1"),
    (["model.permutation=nope"], "model.permutation", "nope"),
    (["model/permutation=nope"], "model/permutation", "nope"),
    (["model.coupling=nope"], "model.coupling", "nope"),
    (["data=nope"], "data", "nope"),
    (["optim/optimizer=sgd"], "optim/optimizer", "sgd"),
    (["optim.optimizer.lr=-1"], "optim.optimizer", "lr=-1"),
    (["optim.optimizer._target_=os.system"], "optim.optimizer._target_", "os.system"),
    (["optim.scheduler.warmup_steps=0"], "optim.scheduler.warmup_steps", "0"),
    (["optim.ema_decay=1.5"], "optim.ema_decay", "1.5"),
    (["optim.grad_clip=-1"], "optim.grad_clip", "-1"),
    (["optim.max_consecutive_skips=0"], "optim.max_consecutive_skips", "0"),
    (["optim.coupling_dtype=fp8"], "optim.coupling_dtype", "fp8"),
    (["callbacks.invertibility.every_n_steps=0"], "callbacks.invertibility.every_n_steps", "0"),
    (["callbacks.invertibility.cond_bound=-1"], "callbacks.invertibility.cond_bound", "-1"),
    (["callbacks.checkpoint.every_n_train_steps=0"], "callbacks.checkpoint.every_n_train_steps", "0"),
    (["callbacks.throughput.window_size=1"], "callbacks.throughput.window_size", "1"),
    (["trainer.max_steps=0"], "trainer.max_steps", "0"),
    (["trainer.val_check_interval=0"], "trainer.val_check_interval", "0"),
    (["trainer.max_time=abc"], "trainer.max_time", "abc"),
    (["trainer.limit_val_batches=-1"], "trainer", "-1"),
    (["+trainer.bogus=1"], "trainer", "bogus"),
    (["seed=-1"], "seed", "-1"),
    (["run_name="], "run_name", "''"),
]


@pytest.fixture
def data_never_read(monkeypatch):
    """Fail the test if a command reaches the point where data is found and read."""
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise AssertionError("the data was read before the config was checked")

    monkeypatch.setattr(_build, "prepare_data", refuse)
    return calls


@pytest.mark.parametrize("bad, key, value", CONFIG_ERRORS, ids=[" ".join(b) for b, _, _ in CONFIG_ERRORS])
def test_config_mistakes_are_named_before_any_data_is_read(bad, key, value, data_never_read, tmp_path):
    out_dir = tmp_path / "outputs"
    args = ["experiment=quickstart", "run_name=cfg_bad", f"paths.output_dir={out_dir}",
            f"paths.data_dir={tmp_path / 'no_data'}", *QUIET, *bad]
    code, out, err = run("train", args)
    assert code == 2, (out[-2000:], err[-2000:])
    line = one_error_line(err, out)
    assert key in line and value in line, line
    assert not data_never_read
    assert not out_dir.exists(), "a rejected command wrote files"


@pytest.mark.parametrize("command, bad, key, value", [
    ("sample", ["sample.temperatures=[-0.5]"], "sample.temperatures", "-0.5"),
    ("sample", ["sample.n_samples=0"], "sample.n_samples", "0"),
    ("sample", ["sample.reconstructions=-1"], "sample.reconstructions", "-1"),
    ("eval", ["data.n_bits=9"], "data.n_bits", "9"),
    ("eval", ["eval.draws=0"], "eval.draws", "0"),
    ("eval", ["eval.split=train"], "eval.split", "train"),
    ("eval", ["trainer.max_time=abc"], "trainer.max_time", "abc"),
])
def test_eval_and_sample_check_their_config_first(command, bad, key, value, data_never_read, tmp_path):
    ckpt = tmp_path / "never_opened.ckpt"  # a check that ran after loading it would say "no such checkpoint"
    out_dir = tmp_path / "outputs"
    code, out, err = run(command, ["experiment=quickstart", f"ckpt_path={ckpt}", "run_name=cfg_bad",
                                   f"paths.output_dir={out_dir}", *bad])
    line = one_error_line(err, out)
    assert code == 2 and key in line and value in line and "no such checkpoint" not in line, line
    assert not data_never_read
    assert not out_dir.exists(), "a rejected command wrote files"


# ---- §3: data faults through the command line --------------------------------------------------------------------
def _train_data(root: Path, data: str, *extra: str) -> tuple[int, str, str]:
    return run("train", [f"data={data}", f"paths.data_dir={root}", "debug=fast", "trainer=cpu", "logger=csv",
                         "data.batch_size=4", "data.val_size=0.2", "data.num_workers=0", "run_name=data_fault",
                         f"paths.output_dir={root / 'outputs'}", *QUIET, *extra])


def test_missing_and_empty_data_folders_are_named(tmp_path):
    code, out, err = _train_data(tmp_path / "nowhere", "cifar10")
    assert code == 2 and str(tmp_path / "nowhere" / "cifar-10-batches-py") in one_error_line(err, out)
    (tmp_path / "empty" / "cifar-10-batches-py").mkdir(parents=True)
    code, out, err = _train_data(tmp_path / "empty", "cifar10")
    assert code == 2 and "data_batch_1" in one_error_line(err, out)
    (tmp_path / "e2" / "celebahq256").mkdir(parents=True)
    code, out, err = _train_data(tmp_path / "e2", "celebahq256", "data.image_size=16")
    line = one_error_line(err, out)
    assert code == 2 and str(tmp_path / "e2" / "celebahq256") in line and "no .png/.jpg/.jpeg" in line
    code, out, err = _train_data(tmp_path / "e3", "mnist")
    assert code == 2 and str(tmp_path / "e3" / "mnist") in one_error_line(err, out)
    assert not (tmp_path / "nowhere" / "outputs" / "runs" / "data_fault").exists()


@pytest.mark.parametrize("fault", ["cifar_garbage", "cifar_truncated", "npz_truncated", "npz_garbage",
                                   "idx_magic", "idx_truncated", "image_unreadable"])
def test_a_corrupt_file_is_named(fault, tmp_path):
    root = tmp_path / "d"
    if fault.startswith("cifar"):
        folder = write_cifar10(root, n_train=40, n_test=10)
        bad = folder / "data_batch_2"
        (garbage if fault == "cifar_garbage" else truncate)(bad)
        data, extra = "cifar10", []
    elif fault.startswith("npz"):
        write_imagenet_npz(root / "imagenet32_chrabaszcz", 32, n_train=40, n_val=10)
        bad = root / "imagenet32_chrabaszcz" / ("val_data.npz" if fault == "npz_garbage" else "train_data_batch_2.npz")
        (garbage if fault == "npz_garbage" else truncate)(bad)
        data, extra = "imagenet32_chrabaszcz", []
    elif fault.startswith("idx"):
        files = write_idx(root / "mnist", n_train=40, n_test=10,
                          magic={"train-images-idx3-ubyte": 2049} if fault == "idx_magic" else None)
        bad = files["t10k-images-idx3-ubyte" if fault == "idx_truncated" else "train-images-idx3-ubyte"]
        if fault == "idx_truncated":
            truncate(bad, keep=0.6)
        data, extra = "mnist", []
    else:
        paths = write_celebahq(root / "celebahq256", n=20, size=16)
        bad = paths[5]
        garbage(bad)
        data, extra = "celebahq256", ["data.image_size=16"]
    code, out, err = _train_data(root, data, *extra)
    line = one_error_line(err, out)
    assert code == 2 and str(bad) in line, line
    if fault == "idx_magic":
        assert "2049" in line and "2051" in line
    if fault == "image_unreadable":
        assert "data.skip_corrupt=true" in line
    assert "test/bpd=" not in out


def test_skip_corrupt_skips_unreadable_images_and_counts_them(tmp_path):
    paths = write_celebahq(tmp_path / "celebahq256", n=20, size=16)
    garbage(paths[2])
    paths[7].write_bytes(b"")
    truncate(paths[11], keep=0.1)
    folder = tmp_path / "celebahq256"
    with pytest.warns(UserWarning) as record:  # a user sees these on stderr
        code, out, err = _train_data(tmp_path, "celebahq256", "data.image_size=16", "data.skip_corrupt=true")
    assert code == 0, err[-3000:]
    assert "Traceback" not in err
    text = " | ".join(str(w.message) for w in record)
    # unreadable headers are found by the scan before training and counted in one warning ...
    assert f"skipped 2 unreadable image(s) of 20 in {folder}: {folder / '2.png'}, {folder / '7.png'}" in text, text
    # ... pixel data cut short is found when the image is decoded, and named
    assert f"skipping unreadable image {folder / '11.png'}" in text, text
    assert out.strip().splitlines()[-1].startswith("test/bpd=")


# ---- §4: checkpoints ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(fake_data_dir, fake_data_overrides, out_dir):
    base = [f"paths.data_dir={fake_data_dir}", f"paths.output_dir={out_dir}", *fake_data_overrides, *QUIET]
    code, out, err = run("train", ["experiment=quickstart", "debug=fast", "run_name=rel_trained", "logger=csv", *base])
    assert code == 0, err[-3000:]
    return {"dir": out_dir / "runs" / "rel_trained", "base": base}


class Payload:
    """Unpickling this runs ``Path(marker).touch()``: proof of execution if the file appears."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def crafted_checkpoint(path: Path, marker: Path) -> Path:
    """A file shaped like a flowlab checkpoint whose pickle runs ``Payload`` when loaded without weights_only."""
    torch.save({"state_dict": {}, "hyper_parameters": {"model": {"_target_": "flowlab.flows.Glow"}},
                "pytorch-lightning_version": "2.4.0", "callbacks": Payload(marker)}, path)
    return path


def test_the_crafted_checkpoint_payload_is_live(tmp_path):
    """Control for the tests below: loaded the unsafe way, the payload does run (the marker appears)."""
    marker = tmp_path / "payload_ran"
    path = crafted_checkpoint(tmp_path / "evil.ckpt", marker)
    torch.load(path, weights_only=False)
    assert marker.exists()
    marker.unlink()
    raw = tmp_path / "evil.pkl"
    raw.write_bytes(pickle.dumps(Payload(marker)))
    pickle.loads(raw.read_bytes())
    assert marker.exists()


@pytest.mark.parametrize("command", ["eval", "sample", "train"])
def test_a_crafted_checkpoint_is_refused_and_never_runs(command, trained, out_dir, tmp_path):
    marker = tmp_path / "payload_ran"
    evil = crafted_checkpoint(tmp_path / "evil.ckpt", marker)
    code, out, err = run(command, ["experiment=quickstart", "debug=fast", f"ckpt_path={evil}", "run_name=evil",
                                   *trained["base"]])
    line = one_error_line(err, out)
    assert code == 2 and str(evil) in line and "unsafe" in line and "not a flowlab checkpoint" in line, line
    assert not marker.exists(), "the checkpoint's payload ran"


def test_a_checkpoint_of_another_model_configuration_names_the_keys(trained, out_dir, tmp_path):
    ckpt = torch.load(trained["dir"] / "checkpoints" / "last.ckpt", weights_only=True)
    ckpt["hyper_parameters"]["model"]["hidden_channels"] = 8  # the weights have width 16
    other = tmp_path / "other.ckpt"
    torch.save(ckpt, other)
    for command in ("eval", "sample"):
        code, out, err = run(command, ["experiment=quickstart", "debug=fast", f"ckpt_path={other}",
                                       "run_name=other", *trained["base"]])
        line = one_error_line(err, out)
        assert code == 2 and str(other) in line and "shape mismatches" in line, line
        assert "coupling.net.conv1.weight (16, 2, 3, 3) in the file, (8, 2, 3, 3) in the model" in line, line
    # training from it: the config's model differs from the checkpoint's, key by key
    code, out, err = run("train", ["experiment=quickstart", "debug=fast", f"ckpt_path={trained['dir']}",
                                   "run_name=other", "model.hidden_channels=8", "model.K=3", *trained["base"]])
    line = one_error_line(err, out)
    assert code == 2 and "belongs to another model configuration" in line
    assert "model.K: 2 in the checkpoint, 3 in the config" in line
    assert "model.hidden_channels: 16 in the checkpoint, 8 in the config" in line


def _stat(d: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(d)): (p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(d.rglob("*"))}


@pytest.mark.parametrize("bad", [["model.K=0"], ["trainer.max_time=abc"], ["data=mnist", "data.root=/nonexistent"],
                                 ["model.hidden_channels=8"], ["ckpt_path=/nonexistent.ckpt"]],
                         ids=["config", "trainer", "data", "another model", "checkpoint"])
def test_a_rejected_command_leaves_an_earlier_run_untouched(bad, trained):
    """Into the directory of an existing run (its run_name): not a file written, not even Hydra's log or
    .hydra/config.yaml, whether the config, the data or the checkpoint is at fault."""
    before = _stat(trained["dir"])
    assert ".hydra/config.yaml" in before and "hparams.yaml" in before
    code, out, err = run("train", ["experiment=quickstart", "debug=fast", "run_name=rel_trained", "logger=csv",
                                   *trained["base"], *bad])
    assert code == 2 and one_error_line(err, out)
    assert _stat(trained["dir"]) == before


def _fingerprint(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file() and p.suffix != ".log"}


def test_eval_and_sample_never_overwrite_earlier_outputs(trained, out_dir):
    run_dir = trained["dir"]
    before_run = _fingerprint(run_dir)
    args = {"eval": ["experiment=quickstart", "debug=fast", f"ckpt_path={run_dir}", "run_name=same", *trained["base"]],
            "sample": ["experiment=quickstart", f"ckpt_path={run_dir}", "run_name=same", "sample.n_samples=4",
                       "sample.reconstructions=2", *trained["base"]]}
    for command, folder in (("eval", "eval"), ("sample", "samples")):
        code, out, err = run(command, args[command])
        assert code == 0, err[-3000:]
        first = out_dir / folder / "same"
        assert f"run directory: {first}" in out
        kept = _fingerprint(first)
        assert kept
        for i in (1, 2):  # the same run_name again: a new directory each time, the first one untouched
            code, out, err = run(command, args[command] + (["eval.draws=2"] if command == "eval" else ["sample.seed=1"]))
            assert code == 0, err[-3000:]
            again = out_dir / folder / f"same-{i}"
            assert f"run directory: {again}" in out
            assert _fingerprint(first) == kept
            assert _fingerprint(again)
    assert _fingerprint(run_dir) == before_run, "eval/sample changed the training run's files"


# ---- typical mistakes in a shell, as a new user types them ---------------------------------------------------------
def _script(name: str) -> str:
    path = Path(sys.executable).with_name(name)
    if not path.exists():
        pytest.skip(f"{name} is not installed next to {sys.executable} (pip install -e .)")
    return str(path)


@pytest.mark.slow  # ~30 s of console-script starts; each mistake is also checked in-process by the quick tests above
def test_typical_mistakes_in_a_shell_end_in_one_line_and_write_nothing(tmp_path):
    garbage_root = tmp_path / "garbage"
    folder = write_cifar10(garbage_root, n_train=40, n_test=10)
    for i, f in enumerate(sorted(folder.iterdir())):
        garbage(f, seed=i)
    marker = tmp_path / "payload_ran"
    evil = crafted_checkpoint(tmp_path / "evil.ckpt", marker)
    commands = [  # (command, what the one line must name)
        (["flowlab-train", "experiment=quickstart", "model.L=3"], ["model.L=3", "image size 28"]),
        (["flowlab-train", "experiment=quickstart", "data.n_bits=9"], ["data.n_bits=9"]),
        (["flowlab-train", "experiment=quickstart", "trainer.max_time=abc"], ["trainer.max_time", "abc"]),
        (["flowlab-train", "data=cifar10", f"paths.data_dir={tmp_path / 'missing'}"],
         [str(tmp_path / "missing" / "cifar-10-batches-py")]),
        (["flowlab-train", "data=cifar10", f"paths.data_dir={garbage_root}"], [str(folder / "data_batch_1")]),
        (["flowlab-eval", "experiment=quickstart", f"ckpt_path={evil}"], [f"ckpt_path={evil}", "unsafe"]),
    ]
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true")
    env.pop("FLOWLAB_DATA", None)
    env.pop("FLOWLAB_OUTPUT", None)
    for argv, named in commands:
        p = subprocess.run([_script(argv[0]), *argv[1:]], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=300)
        shown = f"{' '.join(argv)}\nstdout: {p.stdout[-1500:]}\nstderr: {p.stderr[-1500:]}"
        assert p.returncode == 2, shown
        assert p.stdout == "" and "Traceback" not in p.stderr, shown
        lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and all(n in lines[0] for n in named), shown
    assert not marker.exists(), "the crafted checkpoint's payload ran"
    assert not (tmp_path / "outputs").exists(), "a rejected command wrote files"


# ---- §1 through the command line: a run that keeps failing -------------------------------------------------------
def test_a_diverging_run_ends_in_one_message_and_can_continue_from_its_last_good_state(
        trained, out_dir, monkeypatch):
    from flowlab.lit import FlowModule, module_from_checkpoint

    original = FlowModule.dequantize_train

    def nan_from_step_4(self, x):
        y = original(self, x)
        return y * float("nan") if self.global_step >= 4 else y

    monkeypatch.setattr(FlowModule, "dequantize_train", nan_from_step_4)
    args = ["experiment=quickstart", "debug=fast", "run_name=diverges", "logger=csv", "trainer.max_steps=20",
            "optim.max_consecutive_skips=5", "callbacks.checkpoint.every_n_train_steps=100", *trained["base"]]
    code, out, err = run("train", args)
    line = one_error_line(err, out)
    run_dir = out_dir / "runs" / "diverges"
    good = run_dir / "checkpoints" / "last_good_step_0000009.ckpt"
    assert code == 2 and line.startswith("error: training stopped at step 9: the last 5 optimiser steps"), line
    assert f"are in {good}" in line and f"ckpt_path={good}" in line and "test/bpd=" not in out
    assert "train/skipped_steps" in (run_dir / "metrics.csv").read_text().splitlines()[0]
    module, ckpt, _ = module_from_checkpoint(good)
    assert ckpt["global_step"] == 9 and ckpt["skipped_steps"] == 5
    assert all(torch.isfinite(p).all() for p in module.parameters())

    monkeypatch.setattr(FlowModule, "dequantize_train", original)  # the cause is fixed: continue from it
    code, out, err = run("train", [*args[:-len(trained["base"])], f"ckpt_path={good}", "trainer.max_steps=12",
                                   *trained["base"]])
    assert code == 0, err[-3000:]
    assert f"Resuming from {good}" in out and out.strip().splitlines()[-1].startswith("test/bpd=")
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 12 and last["skipped_steps"] == 5
    assert good.is_file(), "the last good state is kept"


def test_every_config_trains_with_warmup_clipping_skip_limit_and_the_monitor():
    """The defaults that keep flows from NaN-ing: on in train.yaml and in every experiment (gradient clipping
    except in the paper's protocols, which follow openai/glow: no clipping)."""
    from hydra import compose, initialize_config_dir

    from flowlab.cli._config import config_dir

    experiments = sorted(p.stem for p in (config_dir() / "experiment").glob("*.yaml"))
    assert "quickstart" in experiments
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        for exp in [None, *experiments]:
            cfg = compose("train", overrides=[] if exp is None else [f"experiment={exp}"])
            o = cfg.optim
            assert o.scheduler.warmup_steps >= 1, exp
            assert o.grad_clip is not None and o.grad_clip > 0 or str(exp).startswith(("paper_", "table2_")), exp
            assert o.max_consecutive_skips is not None and o.max_consecutive_skips >= 1, exp
            assert cfg.callbacks.invertibility.every_n_steps >= 1, exp
    GlobalHydra.instance().clear()
