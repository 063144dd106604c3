"""Checkpoints: written so that an interrupted save loses nothing, read without running code, found in a run.

Saving (:class:`AtomicCheckpointIO`, every checkpoint ``flowlab-train`` writes) is atomic: Lightning's own writer
holds the whole checkpoint in memory, stages it in the system's temporary folder (a copy, not a rename, across
file systems) and never fsyncs. Loading uses ``torch.load(weights_only=True)``: a file cannot run code.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from flowlab.errors import CheckpointError

CHECKPOINT_DIRNAME = "checkpoints"


def _write(obj: Any, f) -> None:
    """Serialise ``obj`` into the open temporary file (a seam: tests slow it down to kill a save midway)."""
    torch.save(obj, f)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, made atomic: the data goes to ``<dir>/.<name>.tmp-<pid>``, is fsync'ed and
    renamed over ``path``. A killed writer leaves that file and the previous ``path`` intact; the next save of
    ``path`` removes it. Remote paths (``s3://``, ...) keep Lightning's own writer."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
        try:
            with open(tmp, "wb") as f:
                _write(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException as e:
            with contextlib.suppress(OSError):
                tmp.unlink()
            if isinstance(e, OSError) and e.errno == errno.ENOSPC:
                e.filename = str(path)  # the command's one line names it (flowlab.cli._hydra.user_error_message)
            raise
        with contextlib.suppress(OSError):  # the rename itself; some file systems cannot fsync a directory
            fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        for stale in path.parent.glob(f".{path.name}.tmp-*"):
            with contextlib.suppress(OSError):
                stale.unlink()


def continue_epoch(checkpoint: dict) -> None:
    """Resume a checkpoint written when fit ended (max_steps, max_time) where an uninterrupted run goes on: Lightning
    counts its epoch as finished, so it would cut the next epoch short, or start a new one instead of this one's rest."""
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
    """The checkpoints a run can resume from, in the order to try them: ``checkpoints/last*.ckpt`` newest first (a moved
    run directory gets Lightning's ``last-v<n>.ckpt``), then ``step_*.ckpt``, highest step first."""
    folder = Path(run_dir) / CHECKPOINT_DIRNAME
    last = sorted((p for p in folder.glob("last*.ckpt") if p.is_file()), key=lambda p: p.stat().st_mtime_ns, reverse=True)
    return last + sorted((p for p in folder.glob("step_*.ckpt") if p.is_file()), key=lambda p: p.name, reverse=True)


def resolve_checkpoint(path: str | Path, key: str = "ckpt_path") -> Path:
    """A checkpoint file from a file path or a run directory (its best.ckpt, else last.ckpt)."""
    if path is None or str(path).strip() == "":
        raise CheckpointError(f"{key} is not set: give a checkpoint file or a run directory, "
                              f"e.g. {key}=outputs/runs/<run_name>/checkpoints/best.ckpt")
    p = Path(str(path)).expanduser()
    if p.is_dir():
        found = [f / name for f in (p / CHECKPOINT_DIRNAME, p) for name in ("best.ckpt", "last.ckpt") if (f / name).is_file()]
        if found:
            return found[0]
        raise CheckpointError(f"{key}={path}: the directory holds no best.ckpt or last.ckpt "
                              f"(looked in {p / CHECKPOINT_DIRNAME} and {p})")
    if not p.is_file():
        raise CheckpointError(f"{key}={path}: no such checkpoint file")
    return p


def load_checkpoint(path: str | Path, key: str = "ckpt_path") -> dict[str, Any]:
    """The checkpoint dict, loaded on the CPU without executing code; CheckpointError for anything else."""
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
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
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


def module_from_checkpoint(path: str | Path, key: str = "ckpt_path"):
    """``(FlowModule, checkpoint dict, path)``: the model rebuilt from the checkpoint alone, weights loaded."""
    from flowlab.lit.module import FlowModule

    p = resolve_checkpoint(path, key)
    ckpt = load_checkpoint(p, key=key)
    try:
        module = FlowModule.from_checkpoint(ckpt)
    except RuntimeError as e:  # load_state_dict: missing / unexpected / mis-shaped keys
        raise CheckpointError(f"{key}={p}: the weights do not fit the model described by its own "
                              f"hyper-parameters: {str(e).splitlines()[0]} ...") from e
    return module, ckpt, p
