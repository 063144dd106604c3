"""Unit tests of flowlab.lit: the bits/dim metric, evaluation noise, EMA, the LightningModule's
training mechanics (ActNorm init, warm-up, clipping), optimizer configs, and safe checkpoint loading."""

from __future__ import annotations

import os
import pickle

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from flowlab.data.transforms import eval_uniform
from flowlab.errors import CheckpointError, ConfigError
from flowlab.flows import ActNorm
from flowlab.lit import EMA, FlowModule, build_flow, load_checkpoint, module_from_checkpoint
from tests.settings import optim, run_settings

TINY = {"_target_": "flowlab.flows.Glow", "in_channels": 1, "image_size": 8, "K": 1, "L": 2,
        "hidden_channels": 8, "permutation": "nxn", "nxn_conv1x1": "plain", "n_bits": 8}


OPTIM = optim()


def _images(n: int, seed: int = 0, size: int = 8) -> torch.Tensor:
    return torch.randint(0, 256, (n, 1, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _trainer(**kw) -> pl.Trainer:
    args = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                accelerator="cpu", devices=1, num_sanity_val_steps=0)
    args.update(kw)
    return pl.Trainer(**args)


# ---- metric ------------------------------------------------------------------------------------------------
def test_training_bits_per_dim_is_the_exact_mean_over_unequal_batches():
    values = torch.rand(23, dtype=torch.float64) * 5
    m = FlowModule(TINY, OPTIM, **run_settings()).train_bpd  # torchmetrics' MeanMetric, summing in float64
    for chunk in (values[:1], values[1:8], values[8:]):
        m.update(chunk.float())
    assert m.compute().item() == pytest.approx(values.float().double().mean().item(), abs=1e-12)
    assert m.weight.item() == 23 and m.mean_value.dtype == torch.float64


# ---- evaluation noise -------------------------------------------------------------------------------------------
def test_eval_noise_depends_only_on_seed_index_and_draw():
    idx = torch.tensor([5, 17, 2, 1000003, 42])
    u = eval_uniform(idx, (5, 3, 4, 4), seed=7, draw=0)
    assert u.shape == (5, 3, 4, 4) and u.dtype == torch.float32
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    perm = torch.tensor([3, 0, 4, 1, 2])
    assert torch.equal(eval_uniform(idx[perm], (5, 3, 4, 4), seed=7, draw=0), u[perm])  # batch order irrelevant
    assert torch.equal(eval_uniform(idx[:2], (2, 3, 4, 4), seed=7, draw=0), u[:2])  # batch size irrelevant
    assert not torch.equal(eval_uniform(idx, (5, 3, 4, 4), seed=7, draw=1), u)
    assert not torch.equal(eval_uniform(idx, (5, 3, 4, 4), seed=8, draw=0), u)
    assert not torch.equal(u[0], u[1])


def test_eval_noise_is_uniform():
    u = eval_uniform(torch.arange(2000), (2000, 64), seed=0).flatten()
    assert abs(u.mean().item() - 0.5) < 0.005
    assert abs(u.var().item() - 1 / 12) < 0.002
    hist = torch.histc(u, bins=10, min=0, max=1) / u.numel()
    assert torch.allclose(hist, torch.full_like(hist, 0.1), atol=0.005)


# ---- EMA ---------------------------------------------------------------------------------------------------------
def test_ema_reset_and_update():
    net = torch.nn.Sequential(torch.nn.Linear(3, 3), ActNorm(3))
    ema = EMA(net, decay=0.9)
    ema.reset(net)
    before = [p.clone() for p in ema.module.parameters()]
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    net[1].initialized.fill_(True)
    ema.update(net)  # first update: effective decay min(0.9, 1/10) = 0.1
    for b, p_ema, p in zip(before, ema.module.parameters(), net.parameters()):
        assert torch.allclose(p_ema, 0.1 * b + 0.9 * p)
    assert bool(ema.module[1].initialized)  # buffers are copied, not averaged
    assert not any(p.requires_grad for p in ema.module.parameters())
    with pytest.raises(ValueError):
        EMA(net, decay=1.0)


# ---- the module ------------------------------------------------------------------------------------------------
def test_actnorm_is_initialised_from_the_first_training_batch_before_the_first_step(monkeypatch):
    x = _images(16)
    train = DataLoader(TensorDataset(x, torch.zeros(16, dtype=torch.long)), batch_size=8)
    val = DataLoader(TensorDataset(x, torch.zeros(16, dtype=torch.long), torch.arange(16)), batch_size=8)
    module = FlowModule(TINY, optim(lr=0.0), **run_settings())  # lr 0: the step leaves the initialisation as it was
    first = next(m for m in module.flow.modules() if isinstance(m, ActNorm))
    calls = []
    original = ActNorm.initialize

    def spy(self, inp):
        if self is first:
            t = module.trainer
            calls.append((t.sanity_checking, t.training, t.global_step, inp.detach().clone()))
        return original(self, inp)

    monkeypatch.setattr(ActNorm, "initialize", spy)
    # sanity-check validation batches run first, in eval mode: they must not initialise anything
    _trainer(max_steps=1, num_sanity_val_steps=1, val_check_interval=1, check_val_every_n_epoch=None).fit(
        module, train, val)
    assert len(calls) == 1
    sanity, training, step, init_input = calls[0]
    assert not sanity and training and step == 0
    mean = init_input.double().mean(dim=(0, 2, 3))
    assert torch.allclose(first.bias.detach().double().flatten(), -mean, atol=1e-5)
    assert all(bool(m.initialized) for m in module.flow.modules() if isinstance(m, ActNorm))


def test_training_lowers_bits_per_dim_with_warmup_clipping_and_ema():
    x = (_images(32) // 64) * 64  # a simple distribution: 4 grey levels
    dl = DataLoader(TensorDataset(x, torch.zeros(32, dtype=torch.long)), batch_size=16, shuffle=True)
    test = DataLoader(TensorDataset(x, torch.zeros(32, dtype=torch.long), torch.arange(32)), batch_size=16)
    module = FlowModule(TINY, optim(lr=5e-3, warmup_steps=5, grad_clip=1.0, ema_decay=0.9), **run_settings())
    before = _trainer().test(module, test, verbose=False)[0]["test/bpd"]
    trainer = _trainer(max_steps=40)
    trainer.fit(module, dl)
    after = trainer.test(module, test, verbose=False)[0]["test/bpd"]
    assert after < before - 0.5
    assert module.ema is not None and module.ema.num_updates.item() == 40
    assert trainer.lr_scheduler_configs[0].scheduler.get_last_lr()[0] == pytest.approx(5e-3)
    for p_ema, p in zip(module.ema.module.parameters(), module.flow.parameters()):
        assert not torch.equal(p_ema, p)  # evaluation used the average, not the last weights


def test_test_bpd_does_not_depend_on_batch_size():
    x = _images(13, seed=3)
    module = FlowModule(TINY, OPTIM, **run_settings())
    module.flow.initialize(module.dequantize_train(x))
    values = []
    for bs in (13, 4, 1):
        ds = TensorDataset(x, torch.zeros(13, dtype=torch.long), torch.arange(13))
        values.append(_trainer().test(module, DataLoader(ds, batch_size=bs), verbose=False)[0]["test/bpd"])
    assert values[0] == pytest.approx(values[1], abs=1e-6) and values[0] == pytest.approx(values[2], abs=1e-6)


def test_optimizer_and_schedule_come_from_target_configs():
    module = FlowModule(TINY, optim(lr=2e-3, warmup_steps=4, optimizer={"_target_": "torch.optim.Adamax", "lr": 2e-3,
                                                                         "betas": [0.8, 0.9], "foreach": True}), **run_settings())
    conf = module.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    assert type(opt) is torch.optim.Adamax and opt.defaults["betas"] == [0.8, 0.9] and opt.defaults["foreach"]
    assert sched.get_last_lr()[0] == pytest.approx(2e-3 / 4) and conf["lr_scheduler"]["interval"] == "step"
    for _ in range(5):
        opt.step()
        sched.step()
    assert sched.get_last_lr()[0] == pytest.approx(2e-3)
    assert type(FlowModule(TINY, OPTIM, **run_settings()).configure_optimizers()) is torch.optim.Adam  # no schedule: constant lr


@pytest.mark.parametrize("change, named", [
    (dict(optimizer={"_target_": "os.system", "command": "true"}), "optim.optimizer._target_='os.system'"),
    (dict(optimizer={"_target_": "torch.optim.Nope"}), "optim.optimizer._target_='torch.optim.Nope'"),
    (dict(optimizer="sgd"), "optim.optimizer='sgd'"),
    (dict(optimizer={"_target_": "torch.optim.Adam", "lr": -1.0}), "lr=-1.0"),  # torch's own check
    (dict(optimizer={"_target_": "torch.optim.Adamax", "fused": True}), "fused=True"),  # an argument it lacks
    (dict(optimizer={"_target_": "torch.optim.Adam", "x": {"_target_": "os.system"}}), "optim.optimizer.x._target_"),
    (dict(scheduler={"_target_": "flowlab.lit.module.LinearWarmup", "warmup_steps": 0}),
     "optim.scheduler.warmup_steps=0"),
    (dict(scheduler={"_target_": "builtins.eval"}), "optim.scheduler._target_='builtins.eval'"),
    (dict(grad_clip=0.0), "optim.grad_clip=0.0"), (dict(ema_decay=1.5), "optim.ema_decay=1.5"),
    (dict(max_consecutive_skips=0), "optim.max_consecutive_skips=0"),
    (dict(coupling_dtype="fp8"), "optim.coupling_dtype='fp8'"), (dict(lr=0.1), "optim.lr=0.1"),
])
def test_bad_optim_settings_are_refused_when_the_module_is_made(change, named):
    with pytest.raises(ConfigError) as e:
        FlowModule(TINY, dict(OPTIM, **change), **run_settings())
    assert named in str(e.value) and "\n" not in str(e.value)


# ---- building models: checkpoints are data, not code -------------------------------------------------------------
@pytest.mark.parametrize("target", ["os.system", "builtins.eval", "torch.nn.Linear", "flowlab.flows.nope"])
def test_build_flow_refuses_anything_but_flow_classes(target):
    with pytest.raises(ConfigError, match="_target_"):
        build_flow({"_target_": target, "in_channels": 1})


def test_build_flow_refuses_nested_directives():
    with pytest.raises(ConfigError):
        build_flow(dict(TINY, permutation={"_target_": "os.system", "command": "true"}))


# ---- checkpoints --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_checkpoint(tmp_path_factory):
    x = _images(16)
    dl = DataLoader(TensorDataset(x, torch.zeros(16, dtype=torch.long)), batch_size=8)
    module = FlowModule(TINY, optim(warmup_steps=3, ema_decay=0.99), data={"name": "tiny"}, **run_settings())
    trainer = _trainer(max_steps=2)
    trainer.fit(module, dl)
    path = tmp_path_factory.mktemp("ckpt") / "model.ckpt"
    trainer.save_checkpoint(path)
    return path, module


def test_checkpoint_loads_with_weights_only_and_rebuilds_the_model(saved_checkpoint):
    path, module = saved_checkpoint
    raw = torch.load(path, map_location="cpu", weights_only=True)  # no code, no custom classes
    hp = raw["hyper_parameters"]
    assert hp["model"] == TINY and hp["optim"]["ema_decay"] == 0.99 and hp["data"] == {"name": "tiny"}
    rebuilt, ckpt, p = module_from_checkpoint(path)
    assert p == path and ckpt["global_step"] == 2
    for (k, a), b in zip(module.state_dict().items(), rebuilt.state_dict().values()):
        assert torch.equal(a, b), k
    rebuilt.flow.eval()
    z = [torch.zeros(2, *s) for s in rebuilt.flow.latent_shapes]
    assert torch.isfinite(rebuilt.flow.decode(z)).all()
    assert type(rebuilt.configure_optimizers()["optimizer"]) is torch.optim.Adam  # the optimizer, from the file alone


def test_a_checkpoint_with_the_earlier_optim_settings_still_loads(saved_checkpoint, tmp_path):
    """Checkpoints written before optim.optimizer/scheduler were _target_ configs name the optimizer by name."""
    path, module = saved_checkpoint
    raw = torch.load(path, weights_only=True)
    raw["hyper_parameters"]["optim"] = {"optimizer": "adamax", "lr": 2e-3, "betas": [0.9, 0.99], "weight_decay": 0.0,
                                        "warmup_steps": 7, "grad_clip": 50.0, "ema_decay": 0.99, "fused": True}
    torch.save(raw, tmp_path / "old.ckpt")
    rebuilt, _, _ = module_from_checkpoint(tmp_path / "old.ckpt")
    conf = rebuilt.configure_optimizers()
    assert type(conf["optimizer"]) is torch.optim.Adamax and conf["optimizer"].defaults["lr"] == 2e-3
    assert conf["optimizer"].defaults["foreach"]
    assert conf["lr_scheduler"]["scheduler"].get_last_lr()[0] == pytest.approx(2e-3 / 7)
    assert all(torch.equal(a, b) for a, b in zip(module.state_dict().values(), rebuilt.state_dict().values()))


def test_checkpoint_from_a_run_directory(saved_checkpoint, tmp_path):
    path, _ = saved_checkpoint
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(path.read_bytes())
    _, _, p = module_from_checkpoint(tmp_path)
    assert p == tmp_path / "checkpoints" / "last.ckpt"


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_crafted_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "payload_ran"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"model": TINY}, "x": _Payload(str(marker))}, evil)
    with pytest.raises(CheckpointError, match="unsafe"):
        load_checkpoint(evil)
    assert not marker.exists()
    raw = tmp_path / "raw.pkl"
    raw.write_bytes(pickle.dumps(_Payload(str(marker))))
    with pytest.raises(CheckpointError):
        load_checkpoint(raw)
    assert not marker.exists()


def test_foreign_missing_and_corrupt_checkpoints(tmp_path, saved_checkpoint):
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"weight": torch.zeros(3)}, foreign)
    with pytest.raises(CheckpointError, match="not a flowlab checkpoint"):
        load_checkpoint(foreign)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "missing.ckpt")
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(saved_checkpoint[0].read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated|corrupt"):
        load_checkpoint(cut)


def test_fast_path_switches(monkeypatch):
    """optim.optimizer.fused picks the fused Adam kernel; optim.coupling_dtype=bfloat16 runs the coupling
    networks in bfloat16 during training steps only (evaluation stays float32);
    optim.coupling_channels_last lays their activations out channels-last, always."""
    from flowlab.flows.coupling import CouplingNet
    from flowlab.lit.module import FlowModule

    model = {"_target_": "flowlab.flows.Glow", "in_channels": 1, "image_size": 8, "K": 2, "L": 1,
             "hidden_channels": 8, "permutation": "nxn", "n_bits": 8}
    optim = {"optimizer": {"_target_": "torch.optim.Adam", "lr": 1e-3, "fused": True}, "coupling_dtype": "bfloat16",
             "coupling_channels_last": True, "ema_decay": 0.99}
    module = FlowModule(model=model, optim=optim, **run_settings())
    opt = module.configure_optimizers()
    assert opt.defaults.get("fused") is True
    module.on_fit_start()  # resolves optim.coupling_dtype on the device
    assert module._train_coupling_dtype == torch.bfloat16
    nets = [m for m in module.modules() if isinstance(m, CouplingNet)]  # the flow's and the EMA copy's
    assert len(nets) == 4 and all(net.channels_last for net in nets)
    seen = []
    original = CouplingNet.forward

    def spy(self, x, *args, **kwargs):
        seen.append(self.compute_dtype)
        return original(self, x, *args, **kwargs)

    monkeypatch.setattr(CouplingNet, "forward", spy)
    x = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    loss = module.training_step((x, torch.zeros(4, dtype=torch.long)), 0)
    assert torch.isfinite(loss)
    # the training forward of the two couplings in bfloat16 (the ActNorm initialisation before it: float32)
    assert seen[-2:] == [torch.bfloat16] * 2 and None in seen[:-2]
    assert all(net.compute_dtype is None for net in module.flow.modules() if isinstance(net, CouplingNet))
    plain = FlowModule(model=model, optim={**optim, "coupling_channels_last": False}, **run_settings())
    assert not any(net.channels_last for net in plain.modules() if isinstance(net, CouplingNet))
    monkeypatch.setattr("flowlab.lit.module.fast_coupling_dtype", lambda device: None)
    auto = FlowModule(model=model, optim={**optim, "coupling_dtype": "auto"}, **run_settings())
    auto.on_fit_start()
    assert auto._train_coupling_dtype is None  # where bfloat16 is not native: float32


def test_the_sweep_table_reads_each_jobs_bits_per_dim_under_the_modules_metric_name(tmp_path):
    """A class-conditional job reports test/bpd_cond (FlowModule.bpd_name), and the sweep table's test/bpd reads it."""
    import json

    import yaml

    from flowlab.lit.loggers import _sweep_rows

    conditional = dict(TINY, y_condition=True, n_classes=2)
    for name, model, key in (("a", TINY, "test/bpd"), ("b", conditional, "test/bpd_cond")):
        (tmp_path / name / ".hydra").mkdir(parents=True)
        (tmp_path / name / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"model": model, "seed": 0}))
        (tmp_path / name / "results.json").write_text(json.dumps({key: 4.0 if name == "a" else 3.5, "params": 1}))
    assert [r["test/bpd"] for r in _sweep_rows(tmp_path)] == [4.0, 3.5]
    assert FlowModule(conditional, OPTIM, **run_settings()).bpd_name == "bpd_cond"
    assert FlowModule(TINY, OPTIM, **run_settings()).bpd_name == "bpd"
