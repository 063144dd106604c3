"""Every config composes and instantiates: each option of each group, the data × model grid, every
experiment (with every trainer), and the eval/sample configs; a bad value is refused by the constructor
that takes it, naming the key. Uses Hydra's compose API."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict

from flowlab.cli import _build as build
from flowlab.cli import eval as eval_cli
from flowlab.cli import sample as sample_cli
from flowlab.cli import train as train_cli
from flowlab.errors import CheckpointError, ConfigError
from flowlab.lit.module import FlowModule, build_flow
from tests.settings import run_settings

CONF = Path(__file__).resolve().parents[2] / "conf"


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


DATA = _options("data")
PERMUTATIONS = _options("model/permutation")
MODELS = _options("model")
TRAINERS = _options("trainer")
LOGGERS = _options("logger")
EXPERIMENTS = _options("experiment")
DEBUG = _options("debug")
CALLBACKS = _options("callbacks")
OPTIMIZERS = _options("optim/optimizer")
TINY = {"_target_": "flowlab.flows.Glow", "in_channels": 1, "image_size": 8, "K": 1, "L": 2, "hidden_channels": 4}


def _compose(overrides: list[str], tmp_path: Path, config_name: str = "train"):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(tmp_path)
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    return cfg


@pytest.fixture(autouse=True)
def _clear_hydra():
    yield
    GlobalHydra.instance().clear()


def test_groups_are_complete():
    assert set(PERMUTATIONS) == {"nxn", "nxn_lu", "conv1x1", "conv1x1_lu", "reverse", "shuffle", "emerging"}
    assert set(DATA) >= {"cifar10", "imagenet32", "imagenet64", "imagenet32_chrabaszcz", "imagenet64_chrabaszcz",
                         "celebahq256", "mnist", "fashion_mnist"}
    assert set(TRAINERS) == {"default", "cpu", "gpu", "ddp", "ddp_cpu"}
    assert set(LOGGERS) == {"wandb", "csv", "tensorboard", "none"}
    assert set(EXPERIMENTS) >= {"quickstart", "paper_cifar10", "paper_imagenet32", "paper_imagenet64",
                                "paper_celebahq256"}


@pytest.mark.parametrize("data", DATA)
@pytest.mark.parametrize("model", [f"model/permutation={p}" for p in PERMUTATIONS]
                         + [f"model={m}" for m in MODELS if m != "glow"])
def test_data_times_model_composes_and_instantiates(data, model, tmp_path):
    cfg = _compose([f"data={data}", model, "model.K=1", "model.hidden_channels=4",
                    f"model.L={2 if 'realnvp' not in model else 3}"], tmp_path)
    dm = build.instantiate(cfg.data, "data")  # the constructor checks its arguments; no data is read
    assert dm.n_bits == cfg.data.n_bits and dm.channels == cfg.data.channels
    flow = build_flow(build.container(cfg.model))  # real weights: small width keeps it quick
    assert flow.n_bits == cfg.data.n_bits
    if "permutation" in model:
        choice = model.split("=")[1]
        assert flow.permutation == ("nxn" if choice == "nxn_lu" else choice)
        if choice.startswith("nxn"):
            assert cfg.model.nxn_conv1x1 == ("lu" if choice == "nxn_lu" else "plain")


@pytest.mark.parametrize("logger", LOGGERS)
def test_loggers_instantiate(logger, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = _compose([f"logger={logger}"], tmp_path)
    loggers = build.instantiate_loggers(cfg)
    names = sorted(type(lg).__name__ for lg in loggers)
    expected = {"wandb": ["CSVLogger", "WandbLogger"], "csv": ["CSVLogger"],
                "tensorboard": ["CSVLogger", "TensorBoardLogger"], "none": []}[logger]
    assert names == expected
    for lg in loggers:
        if type(lg).__name__ == "CSVLogger":
            assert Path(lg.log_dir) == tmp_path  # metrics.csv lands in the run directory


@pytest.mark.parametrize("callbacks", CALLBACKS)
def test_callbacks_instantiate(callbacks, tmp_path):
    from pytorch_lightning.callbacks import ModelCheckpoint

    cfg = _compose([f"callbacks={callbacks}"], tmp_path)
    cbs = build.instantiate_callbacks(cfg)
    if callbacks == "default":
        names = {type(c).__name__ for c in cbs}
        assert {"StepCheckpoint", "ModelCheckpoint", "SampleGrid", "ReconstructionGrid", "LearningRateMonitor",
                "RichProgressBar"} <= names
        ckpts = [c for c in cbs if isinstance(c, ModelCheckpoint)]
        assert all(Path(c.dirpath) == tmp_path / "checkpoints" for c in ckpts)
    cfg = _compose([f"callbacks={callbacks}", "callbacks.progress_bar=null"] if callbacks == "default"
                   else [f"callbacks={callbacks}"], tmp_path)
    assert not any(type(c).__name__ == "RichProgressBar" for c in build.instantiate_callbacks(cfg))


def test_checkpoint_interval_override(tmp_path):
    cfg = _compose(["callbacks.checkpoint.every_n_train_steps=7"], tmp_path)
    ckpt = next(c for c in build.instantiate_callbacks(cfg) if type(c).__name__ == "StepCheckpoint")
    assert ckpt._every_n_train_steps == 7 and ckpt.save_last


@pytest.mark.parametrize("trainer", TRAINERS)
def test_trainers_instantiate(trainer, tmp_path):
    cfg = _compose([f"trainer={trainer}", "callbacks=none", "logger=none"], tmp_path)
    if cfg.trainer.accelerator == "gpu" and not torch.cuda.is_available():
        pytest.skip("needs a GPU to instantiate (composition checked)")
    t = build.instantiate_trainer(cfg, [], [])
    assert t.max_steps == cfg.trainer.max_steps


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_optimizers_instantiate(optimizer, tmp_path):
    cfg = _compose([f"optim/optimizer={optimizer}"], tmp_path)
    module = FlowModule(TINY, build.container(cfg.optim), **run_settings())
    conf = module.configure_optimizers()
    assert type(conf["optimizer"]).__name__.lower() == optimizer
    assert conf["optimizer"].defaults["lr"] == cfg.optim.optimizer.lr
    assert conf["lr_scheduler"]["scheduler"].get_last_lr()[0] == cfg.optim.optimizer.lr / cfg.optim.scheduler.warmup_steps


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiments_compose_with_paper_settings(experiment, tmp_path):
    cfg = _compose([f"experiment={experiment}"], tmp_path)
    build.instantiate(cfg.data, "data")
    with torch.device("meta"):  # the full-size model, without memory or arithmetic
        flow = build_flow(build.container(cfg.model))
    FlowModule(TINY, build.container(cfg.optim), **run_settings())  # the experiment's optimiser settings, on a small model
    assert {type(c).__name__ for c in build.instantiate_callbacks(cfg)} >= {"StepCheckpoint", "ThroughputMonitor"}
    paper = {"paper_cifar10": ("cifar10", 32, 3, 64, 8), "paper_imagenet32": ("imagenet32", 48, 3, 64, 8),
             "paper_imagenet64": ("imagenet64", 48, 4, 64, 8), "paper_celebahq256": ("celebahq256", 32, 6, 64, 5)}
    if experiment in paper:
        data, K, L, batch, n_bits = paper[experiment]
        assert cfg.hydra.runtime.choices.data == data
        assert (cfg.model.K, cfg.model.L, cfg.data.batch_size, cfg.data.n_bits) == (K, L, batch, n_bits)
        assert cfg.optim.optimizer.lr == 1e-3 and cfg.optim.optimizer._target_ == "torch.optim.Adam"
        assert cfg.model.permutation == "nxn" and cfg.model.hidden_channels == 512
        assert flow.K == K and flow.L == L
        assert flow.memory_saving == ("invertible" if data == "celebahq256" else "none")


@pytest.mark.parametrize("experiment", EXPERIMENTS)
@pytest.mark.parametrize("trainer", ["cpu", "ddp", "ddp_cpu"])
def test_experiments_combine_with_every_trainer(experiment, trainer, tmp_path):
    cfg = _compose([f"experiment={experiment}", f"trainer={trainer}"], tmp_path)
    assert cfg.trainer.accelerator == ("gpu" if trainer == "ddp" else "cpu")
    assert cfg.trainer.max_steps == _compose([f"experiment={experiment}"], tmp_path).trainer.max_steps


@pytest.mark.parametrize("debug", DEBUG)
def test_debug_configs(debug, tmp_path):
    cfg = _compose([f"debug={debug}"], tmp_path)
    FlowModule(build.container(cfg.model), build.container(cfg.optim), **run_settings())
    build.instantiate_trainer(cfg, build.instantiate_callbacks(cfg), [])
    if debug == "fdr":
        assert cfg.trainer.fast_dev_run
    else:
        assert cfg.trainer.max_steps <= 20


def test_run_directories_and_defaults(tmp_path, monkeypatch):
    cfg = _compose(["run_name=abc"], tmp_path)
    assert cfg.hydra.run.dir == "outputs/runs/abc"
    assert cfg.hydra.sweep.dir == "outputs/multirun/abc"
    assert cfg.hydra.job.chdir is False and cfg.hydra.output_subdir == ".hydra"  # Hydra writes the record
    monkeypatch.setenv("FLOWLAB_OUTPUT", "/tmp/out")
    monkeypatch.setenv("FLOWLAB_DATA", "/tmp/data")
    cfg = _compose([], tmp_path)
    assert cfg.paths.output_dir == "/tmp/out" and cfg.data.root == "/tmp/data/fashion-mnist"
    assert str(cfg.hydra.run.dir).startswith("/tmp/out/runs/20")  # a time stamp: runs never share a directory
    assert cfg.logger.wandb.mode == "offline" or cfg.logger.wandb.mode == __import__("os").environ["WANDB_MODE"]
    assert cfg.ckpt_path is None and cfg.seed == 0


@pytest.mark.parametrize("name", ["eval", "sample"])
def test_eval_and_sample_configs(name, tmp_path):
    cfg = _compose(["experiment=quickstart"], tmp_path, config_name=name)
    assert str(cfg.hydra.run.dir).startswith(f"outputs/{'eval' if name == 'eval' else 'samples'}/quickstart_")
    assert cfg.data.channels == 1  # the experiment's data choice applies
    with pytest.raises(CheckpointError, match="ckpt_path is not set"):
        (eval_cli if name == "eval" else sample_cli).prepare(cfg)


@pytest.mark.parametrize("override, named", [
    ("model.L=3", "model.L=3"), ("data.n_bits=9", "data.n_bits=9"), ("data.n_bits=0", "data.n_bits=0"),
    ("model.K=0", "model.K=0"), ("model.hidden_channels=0", "model.hidden_channels=0"),
    ("model.permutation=nope", "model.permutation='nope'"), ("model.coupling=nope", "model.coupling='nope'"),
    ("optim.optimizer._target_=torch.optim.SGDX", "optim.optimizer._target_='torch.optim.SGDX'"),
    ("optim.optimizer.lr=-1", "lr=-1"), ("optim.scheduler.warmup_steps=0", "optim.scheduler.warmup_steps=0"),
    ("optim.ema_decay=1.5", "optim.ema_decay=1.5"),
    ("callbacks.samples.temperatures=[0.5,-1]", "callbacks.samples.temperatures=[0.5, -1]"),
    ("model._target_=os.system", "model._target_='os.system'"),
    ("trainer.val_check_interval=0", "trainer.val_check_interval=0"), ("trainer.max_time=abc", "trainer.max_time='abc'"),
])
def test_constructors_refuse_bad_values_naming_the_key(override, named, tmp_path):
    """The whole of flowlab-train's preparation; it stops at the bad value, before any data is read."""
    cfg = _compose(["experiment=quickstart", "logger=csv", f"paths.data_dir={tmp_path / 'none'}", override], tmp_path)
    with pytest.raises(ConfigError) as e:
        train_cli.prepare(cfg)
    assert named in str(e.value)


def test_config_values_resolve_to_plain_containers(tmp_path):
    cfg = _compose(["experiment=quickstart"], tmp_path)
    model = build.container(cfg.model)
    assert isinstance(model, dict) and model["_target_"] == "flowlab.flows.Glow"
    assert OmegaConf.create(model).image_size == 28
    assert instantiate(cfg.trainer, _partial_=True)  # a valid Trainer target
