"""Reading flowlab checkpoints safely, and finding a run's checkpoints.

Checkpoints are loaded with ``torch.load(weights_only=True)``: only tensors and plain containers
are unpickled, so a crafted file cannot run code. The model is rebuilt from the hyper-parameters
stored in the checkpoint (see :class:`flowlab.lit.module.FlowModule`).
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from flowlab.errors import CheckpointError

__all__ = ["load_checkpoint", "resolve_checkpoint", "module_from_checkpoint", "CHECKPOINT_DIRNAME"]

CHECKPOINT_DIRNAME = "checkpoints"


def resolve_checkpoint(path: str | Path, key: str = "ckpt_path") -> Path:
    """A checkpoint file from a file path or a run directory (its best.ckpt, else last.ckpt)."""
    if path is None or str(path).strip() == "":
        raise CheckpointError(f"{key} is not set: give a checkpoint file or a run directory, "
                              f"e.g. {key}=outputs/runs/<run_name>/checkpoints/best.ckpt")
    p = Path(str(path)).expanduser()
    if p.is_dir():
        for folder in (p / CHECKPOINT_DIRNAME, p):
            for name in ("best.ckpt", "last.ckpt"):
                if (folder / name).is_file():
                    return folder / name
        raise CheckpointError(f"{key}={path}: the directory holds no best.ckpt or last.ckpt "
                              f"(looked in {p / CHECKPOINT_DIRNAME} and {p})")
    if not p.is_file():
        raise CheckpointError(f"{key}={path}: no such checkpoint file")
    return p


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", key: str = "ckpt_path") -> dict[str, Any]:
    """The checkpoint dict, loaded without executing code; CheckpointError for anything else."""
    p = resolve_checkpoint(path, key)
    try:
        ckpt = torch.load(p, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{key}={p} was refused: it is not a flowlab checkpoint or it is unsafe to load "
                              f"(it holds objects other than tensors and plain containers: {str(e).splitlines()[0]})") from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(f"{key}={p} could not be read: the file is truncated, corrupt or not a PyTorch "
                              f"checkpoint ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "hyper_parameters" not in ckpt \
            or not isinstance(ckpt.get("hyper_parameters"), dict) or "model" not in ckpt["hyper_parameters"]:
        raise CheckpointError(f"{key}={p} is not a flowlab checkpoint (no model hyper-parameters and state_dict); "
                              "give a .ckpt written by flowlab-train")
    return ckpt


def module_from_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", key: str = "ckpt_path"):
    """``(FlowModule, checkpoint dict, path)``: the model rebuilt from the checkpoint alone, weights loaded."""
    from flowlab.lit.module import FlowModule

    p = resolve_checkpoint(path, key)
    ckpt = load_checkpoint(p, map_location=map_location, key=key)
    try:
        module = FlowModule.from_checkpoint(ckpt)
    except RuntimeError as e:  # load_state_dict: missing / unexpected / mis-shaped keys
        raise CheckpointError(f"{key}={p}: the weights do not fit the model described by its own "
                              f"hyper-parameters: {str(e).splitlines()[0]} ...") from e
    return module, ckpt, p
