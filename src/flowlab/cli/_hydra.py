"""Running a flowlab command as a Hydra application, with flowlab's handling of user errors.

``run_hydra(task, "train")`` composes ``conf/train.yaml`` with the command-line overrides and
calls ``task(cfg)``. A mistake a person can make — an unknown config option (``data=nope``), a
malformed override, a bad value (:class:`flowlab.errors.UserError`) — ends with one line
``error: <message>`` on stderr and exit status 2, without a traceback. Bugs keep their traceback.

Config checks run in a Hydra callback *before* Hydra creates the run directory, so a rejected
command leaves no trace and never touches an earlier run.
"""

from __future__ import annotations

import functools
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from hydra.errors import HydraException, InstantiationException, MissingConfigException, OverrideParseException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from flowlab.errors import UserError

__all__ = ["run_hydra", "CheckConfigBeforeRun", "user_error_message", "EXIT_USER_ERROR"]

EXIT_USER_ERROR = 2
# run directories this process found absent before Hydra created them (removed again on a user error),
# each with the topmost of its folders that did not exist either
_NEW_RUN_DIRS: dict[str, str] = {}


def _validator(config_name: str | None) -> Callable[[DictConfig], None] | None:
    from flowlab.cli import validate

    return {"train": validate.validate_train_config, "eval": validate.validate_eval_config,
            "sample": validate.validate_sample_config}.get(config_name or "")


class CheckConfigBeforeRun(Callback):
    """Hydra callback: validate the composed config before the run directory is created.

    Hydra turns exceptions raised in callbacks into warnings, so a rejected config ends the
    program here (``error: ...``, exit 2) instead of raising.
    """

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        check = _validator(kwargs.get("config_name"))
        if check is None:
            return
        try:
            run_dir = Path(str(config.hydra.run.dir)).absolute()
            if not run_dir.exists():
                top = run_dir
                while not top.parent.exists():
                    top = top.parent
                _NEW_RUN_DIRS[str(run_dir)] = str(top)
        except Exception:  # noqa: BLE001 - an unresolvable run dir is reported by the check below
            pass
        try:
            from hydra.core.hydra_config import HydraConfig

            HydraConfig.instance().set_config(config)  # ${hydra:runtime.choices...} resolve as in the job
            check(config)
        except Exception as e:  # noqa: BLE001 - only user errors end here, bugs are left to the task's own check
            message = user_error_message(e)
            if message is None:
                return
            print(f"error: {message}", file=sys.stderr, flush=True)
            raise SystemExit(EXIT_USER_ERROR) from None

    # A multirun's base config may be incomplete until the sweep values are in; each job checks its own.


def _missing_config_message(e: MissingConfigException) -> str:
    missing = e.missing_cfg_file or ""
    group, _, name = missing.rpartition("/")
    if group and e.options:
        return f"{group}={name} is not a known option; available {group} options: {', '.join(sorted(e.options))}"
    return str(e).split("\n\nConfig search path", 1)[0].strip()


def user_error_message(e: BaseException) -> str | None:
    """The message to print for an error a person caused, or None for a bug."""
    seen = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:  # an error raised inside instantiate() is wrapped
        seen.add(id(cur))
        if isinstance(cur, UserError):
            return str(cur)
        cur = cur.__cause__
    if isinstance(e, MissingConfigException):
        return _missing_config_message(e)
    if isinstance(e, OverrideParseException):
        return f"cannot parse the override {e.override!r}: {e.message}".strip()
    if isinstance(e, InstantiationException):
        return None
    if isinstance(e, HydraException):  # composition errors: unknown keys, bad override targets
        msg = str(e).split("\n\nConfig search path", 1)[0].strip()
        if isinstance(e.__cause__, OmegaConfBaseException):
            msg = f"{msg}\n{str(e.__cause__).splitlines()[0]}" if str(e.__cause__) not in msg else msg
        return msg
    if isinstance(e, OmegaConfBaseException):  # e.g. a required value (???) left unset
        return str(e).splitlines()[0]
    return None


def _remove_if_only_log(run_dir: Path) -> None:
    """Remove a run directory this command created that holds nothing but Hydra's log file."""
    top = _NEW_RUN_DIRS.get(str(run_dir))
    if top is None or not run_dir.is_dir():
        return
    if not all(p.is_file() and p.suffix == ".log" for p in run_dir.iterdir()):
        return
    shutil.rmtree(run_dir, ignore_errors=True)
    folder = run_dir.parent
    while str(folder).startswith(top) and folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()  # the empty folders created on the way (outputs/, outputs/runs/)
        folder = folder.parent


def _guarded(task: Callable[[DictConfig], object]) -> Callable[[DictConfig], object]:
    """The task, with user errors reported as ``error: ...`` + exit 2 from inside the job (so Hydra adds
    no report of its own), and the run directory removed again if the job wrote nothing into it."""

    @functools.wraps(task)
    def job(cfg: DictConfig):
        try:
            return task(cfg)
        except Exception as e:  # noqa: BLE001
            message = user_error_message(e)
            if message is None:
                raise
            print(f"error: {message}", file=sys.stderr, flush=True)
            try:
                from hydra.core.hydra_config import HydraConfig

                _remove_if_only_log(Path(HydraConfig.get().runtime.output_dir).absolute())
            except Exception:  # noqa: BLE001 - clean-up is best effort
                pass
            raise SystemExit(EXIT_USER_ERROR) from None

    return job


def run_hydra(task: Callable[[DictConfig], object], config_name: str, argv: list[str] | None = None) -> None:
    """Run ``task`` as a Hydra app on ``conf/<config_name>.yaml``; exit 2 with ``error: ...`` on user errors."""
    import hydra

    from flowlab.cli._config import config_dir

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    # Hydra re-raises instead of printing its own report, so the handler below sees every error.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        app = hydra.main(version_base="1.3", config_path=str(config_dir()), config_name=config_name)(_guarded(task))
        app()
    except Exception as e:  # noqa: BLE001 - sorted into user errors and bugs below
        message = user_error_message(e)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_USER_ERROR) from None
