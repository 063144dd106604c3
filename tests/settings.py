"""Settings several test files build modules with."""


def optim(lr: float = 1e-3, warmup_steps: int = 0, **kw) -> dict:
    """``optim`` as conf/ composes it: an Adam partial, the warm-up schedule (none for 0 steps), the rest."""
    scheduler = {"_target_": "flowlab.lit.module.LinearWarmup", "_partial_": True, "warmup_steps": warmup_steps}
    return {"optimizer": {"_target_": "torch.optim.Adam", "_partial_": True, "lr": lr},
            "scheduler": scheduler if warmup_steps else None, "grad_clip": 50.0, "ema_decay": None, **kw}


def run_settings() -> dict:
    """FlowModule's seed and evaluation settings as conf/train.yaml sets them (the only defaults)."""
    from pathlib import Path

    from omegaconf import OmegaConf

    cfg = OmegaConf.load(Path(__file__).parents[1] / "conf" / "train.yaml")
    return {"seed": cfg.seed, "eval_seed": cfg.eval.seed, "use_ema": cfg.eval.use_ema}


def datamodule(name: str, root, **overrides):
    """The DataModule of ``conf/data/<name>.yaml`` reading ``root``: conf/'s settings (the only defaults) with
    ``overrides``. The class is called directly, so its errors arrive unwrapped."""
    from pathlib import Path

    from hydra.utils import get_class
    from omegaconf import OmegaConf

    node = OmegaConf.to_container(OmegaConf.load(Path(__file__).parents[1] / "conf" / "data" / f"{name}.yaml"))
    return get_class(node.pop("_target_"))(**{**node, "root": root, **overrides})
