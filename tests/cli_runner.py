"""Run a flowlab console command in this process, as its shell entry point would, and capture it.

In-process runs (``run_hydra`` with an argv) are much faster than a new interpreter; the test
files that need a true shell start subprocesses themselves.
"""

from __future__ import annotations

import contextlib
import io
import sys

from hydra.core.global_hydra import GlobalHydra

from flowlab.cli._hydra import run_hydra
from flowlab.cli.eval import evaluate
from flowlab.cli.ood import ood
from flowlab.cli.sample import sample
from flowlab.cli.train import train

TASKS = {"train": train, "eval": evaluate, "sample": sample, "ood": ood}
#: overrides that keep a run's console output short
QUIET = ["callbacks.progress_bar=null", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]


def run_cli(command: str, args: list[str]) -> tuple[int, str, str]:
    """``flowlab-<command> *args`` in this process: (exit status, stdout, stderr)."""
    GlobalHydra.instance().clear()
    out, err = io.StringIO(), io.StringIO()
    argv, code = sys.argv[:], 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            run_hydra(TASKS[command], command, argv=args)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv = argv
        GlobalHydra.instance().clear()
    return code, out.getvalue(), err.getvalue()
