"""What the numbers were measured on: hardware, software versions, the command line, the time."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import torch


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str | None:
    """The flowlab commit (with ``-dirty`` when the tree has changes), or ``None`` outside a git checkout.

    ``FLOWLAB_COMMIT`` in the environment overrides it (for copies of the tree without ``.git``).
    """
    if os.environ.get("FLOWLAB_COMMIT"):
        return os.environ["FLOWLAB_COMMIT"]
    root = Path(__file__).resolve().parents[3]
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return sha + ("-dirty" if dirty else "")


def environment(device: torch.device, argv: list[str] | None = None) -> dict:
    argv = sys.argv if argv is None else argv
    info = {
        "timestamp_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in [Path(argv[0]).name, *argv[1:]]) if argv else "",
        "hostname": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "flowlab_commit": git_commit(),
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    gpu_capability=f"{props.major}.{props.minor}", gpu_count=torch.cuda.device_count())
    return info


def hardware_line(env: dict) -> str:
    hw = env.get("gpu") or f"{env['cpu']} ({env['torch_threads']} threads)"
    return f"{hw}; torch {env['torch']}; python {env['python']}"
