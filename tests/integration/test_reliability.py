"""Numerical faults in training: non-finite steps are skipped and counted, a run that keeps
failing stops with one message and a loadable checkpoint of its last good state, the invertibility
monitor reports reconstruction errors and near-singular mixing weights by layer name, and
constant images (all black, all white, one colour) give finite bits/dim for every mixing layer."""

from __future__ import annotations

import copy
import csv
import math

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from flowlab import flows
from flowlab.errors import CheckpointError, UserError
from flowlab.lit import FlowModule, load_checkpoint, module_from_checkpoint
from flowlab.lit.loggers import CSVLogger
from flowlab.lit.monitors import InvertibilityMonitor, InvertibilityWarning, TrainingDiverged, mixing_weights
from tests import settings
from tests.settings import run_settings

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:pytorch_lightning")

def tiny(permutation: str = "nxn", channels: int = 1, n_bits: int = 8, **kw) -> dict:
    """A small Glow; the n×n conv with an LU 1×1 inside (the form whose log-det cannot pass through 0)."""
    return {"_target_": "flowlab.flows.Glow", "in_channels": channels, "image_size": 8, "K": 1, "L": 2,
            "hidden_channels": 8, "permutation": permutation, "nxn_conv1x1": "lu", "n_bits": n_bits, **kw}


def optim(**kw) -> dict:
    return settings.optim(**{"max_consecutive_skips": 20, **kw})


def images(n: int = 64, seed: int = 0, channels: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (n, channels, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def loader(x: torch.Tensor, batch_size: int = 8) -> DataLoader:
    return DataLoader(TensorDataset(x, torch.zeros(len(x), dtype=torch.long)), batch_size=batch_size)


def trainer(tmp_path, **kw) -> pl.Trainer:
    args = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                accelerator="cpu", devices=1, num_sanity_val_steps=0, default_root_dir=str(tmp_path))
    args.update(kw)
    return pl.Trainer(**args)


class Poisoned(FlowModule):
    """A FlowModule whose training input (``loss``) or one gradient (``grad``) is NaN/inf at chosen steps."""

    bad_steps: set[int] = set()
    fault: str = "nan_loss"

    def dequantize_train(self, x):
        y = super().dequantize_train(x)
        if self.global_step in self.bad_steps and self.fault in ("nan_loss", "inf_loss"):
            y = y.clone()
            y[0, 0, 0, 0] = math.nan if self.fault == "nan_loss" else math.inf
        return y

    def on_after_backward(self):
        if self.global_step in self.bad_steps and self.fault == "nan_grad":
            p = next(p for p in self.flow.parameters() if p.grad is not None)
            p.grad[(0,) * p.grad.dim()] = math.nan


class Snapshots(pl.Callback):
    """Weights, optimiser state and EMA before and after every training step."""

    def __init__(self):
        self.before, self.after = {}, {}

    @staticmethod
    def _state(trainer, module):
        opt = trainer.optimizers[0].state_dict()["state"]
        return {"flow": copy.deepcopy(module.flow.state_dict()), "opt": copy.deepcopy(opt),
                "ema": None if module.ema is None else copy.deepcopy(module.ema.module.state_dict())}

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.before[trainer.global_step] = self._state(trainer, module)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.after[trainer.global_step - 1] = self._state(trainer, module)


def _same(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return a == b


# ---- skipping non-finite steps -------------------------------------------------------------------------------
@pytest.mark.parametrize("fault", ["nan_loss", "inf_loss", "nan_grad"])
def test_a_non_finite_step_is_skipped_and_changes_nothing(fault, tmp_path):
    torch.manual_seed(0)
    module = Poisoned(tiny(), optim(ema_decay=0.9), **run_settings())
    module.fault, module.bad_steps = fault, {2, 3, 6}
    snaps = Snapshots()
    trainer(tmp_path, max_steps=8, callbacks=[snaps]).fit(module, loader(images()))
    assert module.skipped_steps == 3
    for step in range(1, 8):  # step 0 initialises Adam's state
        unchanged = _same(snaps.before[step], snaps.after[step])
        assert unchanged == (step in module.bad_steps), f"step {step}"
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert all(torch.isfinite(p).all() for p in module.ema.module.parameters())


def test_skipped_steps_are_logged_saved_and_restored(tmp_path):
    torch.manual_seed(0)
    module = Poisoned(tiny(), optim(), **run_settings())
    module.bad_steps = {1, 4}
    logger = CSVLogger(save_dir=str(tmp_path), name="", version="")
    t = trainer(tmp_path, max_steps=6, logger=logger, log_every_n_steps=1)
    t.fit(module, loader(images()))
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    logged = {int(r["step"]): float(r["train/skipped_steps"]) for r in rows if r.get("train/skipped_steps")}
    assert logged[0] == 0 and logged[1] == 1 and logged[3] == 1 and logged[4] == 2 and logged[5] == 2
    t.save_checkpoint(tmp_path / "a.ckpt")
    assert load_checkpoint(tmp_path / "a.ckpt")["skipped_steps"] == 2  # weights_only=True loads it
    resumed = Poisoned(tiny(), optim(), **run_settings())
    resumed.bad_steps = {7}
    trainer(tmp_path, max_steps=9).fit(resumed, loader(images()), ckpt_path=str(tmp_path / "a.ckpt"))
    assert resumed.skipped_steps == 3


def test_a_run_that_keeps_failing_stops_with_one_message_and_its_last_good_state(tmp_path):
    torch.manual_seed(0)
    module = Poisoned(tiny(), optim(max_consecutive_skips=4), **run_settings())
    module.bad_steps = set(range(5, 1000))
    snaps = Snapshots()
    logger = CSVLogger(save_dir=str(tmp_path), name="", version="")
    t = trainer(tmp_path, max_steps=50, callbacks=[snaps], logger=logger, log_every_n_steps=1)
    with pytest.raises(TrainingDiverged) as e:
        t.fit(module, loader(images(256)))
    assert isinstance(e.value, UserError)  # the CLI prints it as `error: ...`, exit 2, no traceback
    path = tmp_path / "checkpoints" / "last_good_step_0000009.ckpt"
    msg = str(e.value)
    assert "training stopped at step 9" in msg and "last 4 optimiser steps" in msg and str(path) in msg
    assert "step 5" in msg and "optim.optimizer.lr" in msg
    assert t.global_step == 9 and module.skipped_steps == 4
    assert not list(path.parent.glob(".*tmp*")), "no temporary file left"
    # the file holds the weights as they were after the last good step, and loads safely
    restored, ckpt, _ = module_from_checkpoint(path)
    good = snaps.after[4]["flow"]
    assert all(torch.equal(restored.flow.state_dict()[k], v) for k, v in good.items())
    assert ckpt["skipped_steps"] == 4 and ckpt["global_step"] == 9
    assert "train/skipped_steps" in open(tmp_path / "metrics.csv").readline()  # the logger was flushed
    # ... and training continues from it
    clean = FlowModule(tiny(), optim(max_consecutive_skips=4), **run_settings())
    t2 = trainer(tmp_path / "again", max_steps=12)
    t2.fit(clean, loader(images(256)), ckpt_path=str(path))
    assert t2.global_step == 12 and clean.skipped_steps == 4
    assert all(torch.isfinite(p).all() for p in clean.parameters())


def test_no_limit_means_never_stop(tmp_path):
    module = Poisoned(tiny(), optim(max_consecutive_skips=None), **run_settings())
    module.bad_steps = set(range(2, 100))
    trainer(tmp_path, max_steps=8).fit(module, loader(images()))
    assert module.skipped_steps == 6
    assert not (tmp_path / "checkpoints").exists()


def test_a_checkpoint_of_another_model_names_the_mismatched_keys(tmp_path):
    module = FlowModule(tiny(), optim(), **run_settings())
    t = trainer(tmp_path, max_steps=1)
    t.fit(module, loader(images(8)))
    t.save_checkpoint(tmp_path / "m.ckpt")
    ckpt = torch.load(tmp_path / "m.ckpt", weights_only=True)
    ckpt["hyper_parameters"]["model"]["hidden_channels"] = 4  # weights of width 8, model of width 4
    ckpt["hyper_parameters"]["model"]["K"] = 2  # and a second flow step per level
    torch.save(ckpt, tmp_path / "other.ckpt")
    with pytest.raises(CheckpointError) as e:
        module_from_checkpoint(tmp_path / "other.ckpt")
    msg = str(e.value)
    assert str(tmp_path / "other.ckpt") in msg and "\n" not in msg
    assert "missing keys (48): flow.levels.0.2.actnorm.bias, " in msg and "(and 40 more)" in msg
    assert "shape mismatches (14): flow.levels.0.1.coupling.net.conv1.weight (8, 2, 3, 3) in the file, " \
           "(4, 2, 3, 3) in the model" in msg


# ---- the invertibility monitor ----------------------------------------------------------------------------------
MONITOR = {"every_n_steps": 500, "n_images": 16, "recon_threshold": None, "logdet_bound": 20.0, "cond_bound": 1.0e4}


class TinyData(pl.LightningDataModule):
    def __init__(self, x):
        super().__init__()
        self.train_dataset = TensorDataset(x, torch.zeros(len(x), dtype=torch.long))
        self.val_dataset = TensorDataset(x[:8], torch.zeros(8, dtype=torch.long))

    def train_dataloader(self):
        return DataLoader(self.train_dataset, batch_size=8)


@pytest.mark.parametrize("permutation", ["conv1x1", "conv1x1_lu", "nxn", "emerging"])
def test_monitor_logs_reconstruction_error_and_weight_health(permutation, tmp_path):
    torch.manual_seed(0)
    module = FlowModule(tiny(permutation), optim(), **run_settings())
    monitor = InvertibilityMonitor(**dict(MONITOR, every_n_steps=2, n_images=4))
    logger = CSVLogger(save_dir=str(tmp_path), name="", version="")
    with _no_invertibility_warning():
        trainer(tmp_path, max_steps=5, callbacks=[monitor], logger=logger).fit(module, datamodule=TinyData(images()))
    assert [h["step"] for h in monitor.history] == [2, 4, 5]  # every 2 steps and at the end
    for h in monitor.history:
        assert 0 <= h["recon_error"] < 1e-4
        assert h["max_abs_logdet"] < 1.0 and 1.0 <= h["max_cond"] < 100 and h["near_singular"] == []
    rows = [r for r in csv.DictReader(open(tmp_path / "metrics.csv")) if r.get("train/recon_error")]
    assert [int(r["step"]) for r in rows] == [2, 4, 5]
    assert all(r["train/mixing_max_cond"] for r in rows)


class _no_invertibility_warning:
    def __enter__(self):
        import warnings

        self._cm = warnings.catch_warnings(record=True)
        self.records = self._cm.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc):
        self._cm.__exit__(*exc)
        bad = [str(w.message) for w in self.records if issubclass(w.category, InvertibilityWarning)]
        assert not bad, bad


def _near_singular(module: FlowModule, permutation: str) -> str:
    """Make the first learned mixing weight of level 0 nearly singular; returns its module name."""
    name, _ = mixing_weights(module)[0]
    layer = module.get_submodule(name)
    with torch.no_grad():
        if permutation == "nxn":
            layer.conv.log_s[0] = -40.0
        elif hasattr(layer, "log_s"):  # an LU 1×1
            layer.log_s[0] = -40.0
        else:  # a plain 1×1 weight: Glow's conv1x1, the 1×1 inside Emerging
            layer.weight[0].mul_(1e-9)
    return name


@pytest.mark.parametrize("permutation", ["conv1x1", "conv1x1_lu", "nxn", "emerging"])
def test_monitor_names_a_near_singular_weight_and_warns_about_reconstructions(permutation, tmp_path):
    torch.manual_seed(0)
    module = FlowModule(tiny(permutation), optim(), **run_settings())
    monitor = InvertibilityMonitor(**dict(MONITOR, every_n_steps=1000, n_images=4))
    t = trainer(tmp_path, max_steps=2, callbacks=[monitor])
    t.fit(module, datamodule=TinyData(images()))
    name = _near_singular(module, permutation)
    assert name.startswith("flow.levels.0.1.permutation")
    with pytest.warns(InvertibilityWarning) as record:
        monitor._run(t, module, t.global_step)
    text = " | ".join(str(w.message) for w in record)
    assert f"{name}: log|det W| = " in text and "approach singularity" in text and "condition number" in text
    h = monitor.history[-1]
    assert h["near_singular"] == [name] and h["max_abs_logdet"] > 20 and h["max_cond"] > 1e4
    if permutation in ("conv1x1",):  # a float32 inverse of a matrix with cond ~1e9 no longer reconstructs
        assert "max|decode(encode(x)) - x|" in text and not h["recon_error"] <= 1 / 512


def test_monitor_warns_when_reconstructions_fail(tmp_path):
    torch.manual_seed(0)
    module = FlowModule(tiny("conv1x1"), optim(), **run_settings())
    monitor = InvertibilityMonitor(**dict(MONITOR, every_n_steps=1000, n_images=4, recon_threshold=1e-12, cond_bound=1e9))
    t = trainer(tmp_path, max_steps=1, callbacks=[monitor])
    with pytest.warns(InvertibilityWarning, match=r"step 1: max\|decode\(encode\(x\)\) - x\| = .* exceeds 1e-12"):
        t.fit(module, datamodule=TinyData(images()))
    assert monitor.threshold(8) == 1e-12 and InvertibilityMonitor(**MONITOR).threshold(8) == 1 / 512


@pytest.mark.parametrize("bad", [{"every_n_steps": 0}, {"n_images": -1}, {"recon_threshold": 0},
                                 {"logdet_bound": math.inf}, {"cond_bound": "big"}])
def test_monitor_arguments_are_checked(bad):
    from flowlab.errors import ConfigError

    key = next(iter(bad))
    with pytest.raises(ConfigError, match=f"callbacks.invertibility.{key}="):
        InvertibilityMonitor(**dict(MONITOR, **bad))


# ---- constant images ----------------------------------------------------------------------------------------------
def _constant(kind: str, n_bits: int, channels: int = 3, n: int = 4) -> torch.Tensor:
    top = 2**n_bits - 1
    value = {"black": [0] * channels, "white": [top] * channels, "grey": [top // 2] * channels,
             "red": [top, 0, 0][:channels]}[kind]
    return torch.tensor(value, dtype=torch.uint8).view(1, channels, 1, 1).expand(n, channels, 8, 8).contiguous()


MODELS = [*flows.PERMUTATIONS, "realnvp"]


def _model(name: str, n_bits: int) -> dict:
    if name == "realnvp":
        return {"_target_": "flowlab.flows.RealNVP", "in_channels": 3, "image_size": 8, "K": 1, "L": 2,
                "hidden_channels": 8, "n_bits": n_bits}
    return tiny(name, channels=3, n_bits=n_bits)


@pytest.mark.parametrize("n_bits", [8, 1])
@pytest.mark.parametrize("name", MODELS)
def test_constant_images_give_finite_bits_per_dim(name, n_bits):
    """Through the LightningModule: ActNorm initialised on a constant batch (zero variance but for the
    dequantisation noise) trains with finite loss and gradients; constant images evaluate to finite
    bits/dim both with that model and with one initialised on ordinary images."""
    torch.manual_seed(0)
    random = images(8, channels=3) >> (8 - n_bits)
    for kind in ("black", "white", "grey", "red"):
        x = _constant(kind, n_bits)
        for init in (x, random):
            module = FlowModule(_model(name, n_bits), optim(), **run_settings())
            module.train()
            loss = module.training_step((init, torch.zeros(len(init), dtype=torch.long)), 0)
            assert torch.isfinite(loss), (kind, "train loss")
            loss.backward()
            assert all(torch.isfinite(p.grad).all() for p in module.parameters() if p.grad is not None), kind
            module.eval()
            with torch.no_grad():
                bpd = module.flow.bits_per_dim(module.dequantize_eval(x, torch.arange(len(x))))
            assert torch.isfinite(bpd).all() and (bpd > -50).all(), (kind, bpd)
