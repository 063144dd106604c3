"""Writing checkpoints so that an interrupted save loses nothing, reading them safely, and finding a
run's checkpoints.

Saving (:class:`AtomicCheckpointIO`, every checkpoint Lightning writes in ``flowlab-train``): the file
is written under a temporary name in its own directory, flushed and fsync'ed, and only then renamed
over the target with ``os.replace`` (atomic on POSIX), after which the directory is fsync'ed too. A
process killed mid-write (SIGKILL, node failure, full disk) leaves the previous checkpoint of that
name intact plus a hidden ``.<name>.tmp-<pid>`` file, which the next save of that name removes.

Loading: checkpoints are loaded with ``torch.load(weights_only=True)``: only tensors and plain
containers are unpickled, so a crafted file cannot run code. The model is rebuilt from the
hyper-parameters stored in the checkpoint (see :class:`flowlab.lit.module.FlowModule`).
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from flowlab.errors import CheckpointError

__all__ = ["load_checkpoint", "resolve_checkpoint", "module_from_checkpoint", "CHECKPOINT_DIRNAME",
           "atomic_save", "AtomicCheckpointIO", "resume_candidates"]

CHECKPOINT_DIRNAME = "checkpoints"


# ---- saving -------------------------------------------------------------------------------------------
def _write(obj: Any, f) -> None:
    """Serialise ``obj`` into the open temporary file (a seam: tests slow it down to kill a save midway)."""
    torch.save(obj, f)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. platforms without directory file descriptors
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some file systems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save(obj, path)`` such that ``path`` holds either its previous content or the complete new one.

    The data goes to ``<dir>/.<name>.tmp-<pid>`` (same directory, hence same file system), is fsync'ed,
    then renamed over ``path``; the directory entry is fsync'ed last. Leftover temporary files of the same
    name from killed writers are removed after a successful save.
    """
    path = Path(path)
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{path.name}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            _write(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    _fsync_dir(folder)
    for stale in folder.glob(f".{path.name}.tmp-*"):
        try:
            stale.unlink()
        except OSError:
            pass
    return path


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer with :func:`atomic_save`: ``last.ckpt``, ``best.ckpt``, the periodic,
    the signal-triggered and SLURM's ``hpc_ckpt_*.ckpt`` checkpoints are never left half-written.

    Remote paths (``s3://`` and the like) keep Lightning's own writer.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_save(checkpoint, path)


def resume_candidates(run_dir: str | Path) -> list[Path]:
    """The checkpoints a run can resume from, newest first: ``checkpoints/last.ckpt`` and the
    ``hpc_ckpt_<n>.ckpt`` files Lightning writes into the run directory when SLURM asks it to requeue."""
    run_dir = Path(run_dir)
    found = [p for p in [run_dir / CHECKPOINT_DIRNAME / "last.ckpt", *run_dir.glob("hpc_ckpt_*.ckpt")] if p.is_file()]
    return sorted(found, key=lambda p: p.stat().st_mtime_ns, reverse=True)


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
