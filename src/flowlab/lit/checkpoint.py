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
    except BaseException as e:
        try:
            tmp.unlink()
        except OSError:
            pass
        if isinstance(e, OSError) and _disk_full(e, path) is not e:
            raise _disk_full(e, path) from e
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


def continue_epoch(checkpoint: dict) -> None:
    """Make Lightning resume a checkpoint written when fit ended (``on_train_end``: max_steps, max_time) where an
    uninterrupted run goes on. Lightning counts the epoch of such a checkpoint as finished: after its last batch,
    it would start the next epoch with the batch count already full (cutting it short); inside an epoch, it would
    start a new epoch instead of the rest of this one."""
    fit = checkpoint.get("loops", {}).get("fit_loop", {})
    epochs, batches = fit.get("epoch_progress", {}), fit.get("epoch_loop.batch_progress", {})
    current = batches.get("current", {})
    if not (epochs and current and len(set(epochs["current"].values())) == 1 and len(set(current.values())) == 1
            and epochs["current"]["completed"] > 0 and current["completed"] > 0):
        return
    if batches.get("is_last_batch"):
        batches["current"], batches["is_last_batch"] = dict.fromkeys(current, 0), False
    else:
        for part in ("current", "total"):
            epochs[part] = {k: v - 1 for k, v in epochs[part].items()}


def resume_candidates(run_dir: str | Path) -> list[Path]:
    """The checkpoints a run can resume from, in the order to try them: ``checkpoints/last*.ckpt`` (Lightning
    writes ``last-v<n>.ckpt`` beside a ``last.ckpt`` it did not write, e.g. in a moved run directory) and the
    ``hpc_ckpt_<n>.ckpt`` files of a SLURM requeue, newest first; then ``step_*.ckpt``, highest step first."""
    run_dir = Path(run_dir)
    last = [p for p in [*(run_dir / CHECKPOINT_DIRNAME).glob("last*.ckpt"), *run_dir.glob("hpc_ckpt_*.ckpt")]
            if p.is_file()]
    steps = sorted((p for p in (run_dir / CHECKPOINT_DIRNAME).glob("step_*.ckpt") if p.is_file()),
                   key=lambda p: p.name, reverse=True)
    return sorted(last, key=lambda p: p.stat().st_mtime_ns, reverse=True) + steps


def _disk_full(e: OSError, path: Path) -> OSError:
    """ENOSPC as one line naming the path and the free space (the previous file of that name is intact)."""
    import errno
    import shutil

    if e.errno != errno.ENOSPC:
        return e
    try:
        free = f"{shutil.disk_usage(path.parent).free / 2**20:.1f} MiB free"
    except OSError:
        free = "free space unknown"
    return CheckpointError(f"no space left on the device to write {path} ({free} in {path.parent}); the previous "
                           "checkpoint of that name is intact. Free some space, then run the same command again")


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
        with open(p, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise CheckpointError(f"{key}={p} could not be read: {e}") from e
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):  # torch.save's zip archive, or a legacy pickle
        raise CheckpointError(f"{key}={p} is not a checkpoint: " + ("the file is empty" if not head else
                              f"the file is not a PyTorch checkpoint (it starts with {head!r})")
                              + "; give a .ckpt written by flowlab-train")
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
