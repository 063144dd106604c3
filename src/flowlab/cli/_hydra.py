"""Running a flowlab command as a Hydra app, so that a rejected command writes nothing and says why in one line.

The Hydra callback :class:`CheckConfigBeforeRun` (conf/train.yaml) calls the command's ``prepare(cfg)``
— data, model, callbacks, loggers and trainer built once, then the checkpoint and data read — before
Hydra creates the run directory and writes ``.hydra/``; the task takes what was built. Every mistake a
person can make (an unknown option, a malformed override, a :class:`flowlab.errors.UserError`) ends in
the one ``except`` of :func:`run_hydra`: ``error: <message>`` on stderr, exit status 2. Bugs keep their
traceback. (Multirun jobs get their directory from Hydra first: a rejected job's is removed again.)
"""

from __future__ import annotations

import datetime
import importlib
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from hydra.errors import HydraException, InstantiationException, MissingConfigException, OverrideParseException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write
from omegaconf.errors import OmegaConfBaseException

from flowlab.errors import ConfigError, UserError

__all__ = ["run_hydra", "CheckConfigBeforeRun", "prepared", "user_error_message", "EXIT_USER_ERROR"]

EXIT_USER_ERROR = 2
#: the commands whose every run gets a new directory (``<run_name>``, else ``<run_name>-1``, ...)
NEW_DIRECTORY_COMMANDS = ("eval", "sample")
# what CheckConfigBeforeRun built, by run directory, for the task to take
_PREPARED: dict[str, object] = {}


class Rejected(BaseException):
    """Carries an error out of a Hydra callback (Hydra turns an Exception there into a warning)."""

    def __init__(self, error: Exception):
        super().__init__(str(error))
        self.error = error


def _prepare(config: DictConfig) -> object:
    name = str(config.hydra.job.config_name)
    task_cfg = OmegaConf.masked_copy(config, [k for k in config if k != "hydra"])
    return importlib.import_module(f"flowlab.cli.{name}").prepare(task_cfg)


def prepared(cfg: DictConfig, prepare: Callable[[DictConfig], object]) -> object:
    """What the callback built for this run, else (a config without the callback) ``prepare(cfg)`` now."""
    from flowlab.cli._build import run_dir

    found = _PREPARED.pop(os.path.abspath(run_dir()), None)
    return found if found is not None else prepare(cfg)


def _check_run_name(config: DictConfig) -> None:
    name = config.get("run_name")
    if not isinstance(name, (str, int)) or str(name).strip() in ("", ".", "..") or "\\" in str(name):
        raise ConfigError(f"run_name={name!r} is not allowed: give a non-empty name for the run directory")


def _set_run_dir(config: DictConfig, folder: Path) -> None:
    with read_write(config.hydra), open_dict(config.hydra):
        config.hydra.run.dir = str(folder)
        config.hydra.runtime.output_dir = os.path.abspath(folder)  # as Hydra sets it


def _hydra_records(folder: Path) -> dict[Path, bytes]:
    """The ``.hydra/*.yaml`` files of the run directories in (or at) ``folder``, by absolute path."""
    folder = Path(os.path.abspath(folder))
    return {p: p.read_bytes() for p in folder.glob("**/.hydra/*.yaml")} if folder.is_dir() else {}


class CheckConfigBeforeRun(Callback):
    """Hydra callback: build the command's run (``prepare``) before Hydra creates its directory.

    The ``.hydra/*.yaml`` files a run directory already holds (an earlier run of the same ``run_name``)
    are read first: when the new command is accepted and its record differs, the earlier one is kept in
    ``.hydra/previous/<time>/``; when a multirun job is rejected, they are put back.
    """

    def __init__(self) -> None:
        self._earlier: dict[Path, bytes] = {}

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        from hydra.core.hydra_config import HydraConfig

        from flowlab.cli._build import is_main_process, new_dir

        _PREPARED.clear()
        try:
            _check_run_name(config)
            folder = Path(str(config.hydra.run.dir))
            _set_run_dir(config, folder)
            HydraConfig.instance().set_config(config)  # ${hydra:...} resolve as in the job
            self._earlier = _hydra_records(folder)
            run = _prepare(config)
            if str(config.hydra.job.config_name) in NEW_DIRECTORY_COMMANDS and is_main_process():
                _set_run_dir(config, new_dir(folder))  # accepted: claim a directory no command has written to
        except Exception as e:  # noqa: BLE001 - reported by run_hydra: a user error in one line, a bug in full
            raise Rejected(e) from e
        _PREPARED[str(config.hydra.runtime.output_dir)] = run

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        _PREPARED.clear()
        try:
            self._earlier = _hydra_records(Path(str(config.hydra.sweep.dir)))
        except Exception as e:  # noqa: BLE001
            raise Rejected(e) from e

    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        """A multirun job: built here (Hydra has made its directory and written .hydra/); a single run: built
        in on_run_start. Either way, keep the earlier record of a reused directory."""
        folder = Path(os.path.abspath(config.hydra.runtime.output_dir))
        if str(folder) not in _PREPARED:
            try:
                _check_run_name(config)
                _PREPARED[str(folder)] = _prepare(config)
            except Exception as e:  # noqa: BLE001 - reported by run_hydra
                self._undo(folder)
                raise Rejected(e) from e
        self._keep_earlier(folder)

    def _undo(self, folder: Path) -> None:
        """Remove a rejected job's directory if Hydra made it for this job, else put back its earlier record."""
        earlier = {p: b for p, b in self._earlier.items() if p.parent == folder / ".hydra"}
        if not earlier and folder.is_dir() and all(p.name == ".hydra" or p.suffix == ".log" for p in folder.iterdir()):
            shutil.rmtree(folder, ignore_errors=True)
        for path, content in earlier.items():
            path.write_bytes(content)

    def _keep_earlier(self, folder: Path) -> None:
        """Keep the earlier record in ``.hydra/previous/<time>/`` when the config or the overrides changed."""
        earlier = {p: b for p, b in self._earlier.items() if p.parent == folder / ".hydra"}
        if any(p.name != "hydra.yaml" and (not p.is_file() or p.read_bytes() != b) for p, b in earlier.items()):
            keep = folder / ".hydra" / "previous" / datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S-%f")
            keep.mkdir(parents=True)
            for path, content in earlier.items():
                (keep / path.name).write_bytes(content)


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


def run_hydra(task: Callable[[DictConfig], object], config_name: str, argv: list[str] | None = None) -> None:
    """Run ``task`` as a Hydra app on ``conf/<config_name>.yaml``; exit 2 with ``error: ...`` on user errors."""
    import hydra

    from flowlab.cli._config import config_dir

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    # Hydra re-raises instead of printing its own report, so the handler below sees every error.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        hydra.main(version_base="1.3", config_path=str(config_dir()), config_name=config_name)(task)()
    except (Exception, Rejected) as e:  # the one place where errors are reported
        error = e.error if isinstance(e, Rejected) else e
        message = user_error_message(error)
        if message is None:  # a bug: its own traceback
            raise error from None
        print(f"error: {message}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_USER_ERROR) from None
