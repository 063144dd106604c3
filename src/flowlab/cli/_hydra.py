"""flowlab's commands as Hydra apps: a rejected command writes nothing and says why in one line.

:class:`CheckConfigBeforeRun` runs the command's ``prepare(cfg)`` before Hydra creates the run directory; a person's
mistake ends in :func:`run_hydra`'s one ``except`` (``error: <message>``, exit 2), a bug keeps its traceback. A train
run locks its directory: a taken one is resumed when its name was chosen, else the run goes to ``<name>-<n>``.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import errno
import importlib
import os
import secrets
import shutil
import socket
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobStatus
from hydra.errors import HydraException, InstantiationException, MissingConfigException, OverrideParseException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict, read_write
from omegaconf.errors import OmegaConfBaseException

from flowlab.cli._build import is_main_process, new_dir, numbered
from flowlab.cli._config import config_dir
from flowlab.errors import ConfigError, UserError, check_bool

EXIT_USER_ERROR = 2
LOCK = ".lock"  # <run dir>/.lock: "<host> <pid> <SLURM job>" of the process that runs there
_PREPARED: dict[str, object] = {}  # what CheckConfigBeforeRun built, by run directory, for the task to take
_SWEEP: list[tuple[str, str, str]] = []  # (sweep point, state, test/bpd or error) of this multirun's jobs
_FAILED: list[BaseException] = []  # the error of a single run, raised again by run_hydra
_COMMON: list[str] = []  # the keys a multirun sets to one value (a point is named by the others)
_LOCKS: list[tuple[Path, str]] = []  # (lock file, its content) of the run directories this process holds


def run_stamp() -> str:
    """The default run name: a time stamp and a random suffix; under SLURM ``slurm-<job>[_<array task>][.<step>]``,
    the same in every task of a job step and after a requeue (which therefore resumes)."""
    array, job, step = (os.environ.get(k) for k in ("SLURM_ARRAY_JOB_ID", "SLURM_JOB_ID", "SLURM_STEP_ID"))
    if array or job:
        name = f"slurm-{array}_{os.environ.get('SLURM_ARRAY_TASK_ID', '0')}" if array else f"slurm-{job}"
        return name + (f".{step}" if step else "")
    return f"{datetime.datetime.now():%Y-%m-%d_%H-%M-%S}-{secrets.token_hex(4)}"


OmegaConf.register_new_resolver("run_stamp", run_stamp, use_cache=True, replace=True)


class Rejected(BaseException):
    """Carries an error (``args[0]``) out of a Hydra callback, which turns an Exception into a warning."""


def _prepare(config: DictConfig) -> object:
    name = config.get("run_name")
    if not isinstance(name, (str, int)) or str(name).strip() in ("", ".", "..") or "\\" in str(name) \
            or str(name).startswith(("/", "~")) or ".." in str(name).split("/"):
        raise ConfigError(f"run_name={name!r} is not allowed: give a name for a run directory inside the outputs "
                          "folder (no absolute path, no '..'); paths.output_dir=... moves the outputs folder")
    task_cfg = OmegaConf.masked_copy(config, [k for k in config if k != "hydra"])
    return importlib.import_module(f"flowlab.cli.{config.hydra.job.config_name}").prepare(task_cfg)


def prepared(cfg: DictConfig, prepare: Callable[[DictConfig], object]) -> object:
    """What the callback built for this run, else (a config without the callback) ``prepare(cfg)`` now."""
    found = _PREPARED.pop(os.path.abspath(HydraConfig.get().runtime.output_dir), None)
    if isinstance(found, Rejected):  # a multirun point refused in on_job_start: Hydra records it as failed
        raise found.args[0]
    return found if found is not None else prepare(cfg)


def _holder(folder: Path) -> str | None:
    """Who holds ``folder``'s lock ("process <pid> on <host>"), or None: nobody alive, our own SLURM job (requeued),
    or this process (in an earlier command: tests, a multirun's earlier point)."""
    try:
        host, pid, job = ((folder / LOCK).read_text().split() + ["", "", ""])[:3]
    except OSError:
        return None
    here = host == socket.gethostname()
    if not pid.isdigit() or (job and job == os.environ.get("SLURM_JOB_ID")) or (here and int(pid) == os.getpid()):
        return None
    if here:
        try:
            with contextlib.suppress(PermissionError):  # another user's process: alive
                os.kill(int(pid), 0)
        except ProcessLookupError:
            return None
    return f"process {pid} on {host}"


def _claim(folder: Path, chosen: bool = True) -> bool:
    """Lock ``folder`` until exit; False when another process holds it (a UserError when the name was ``chosen``)."""
    folder.mkdir(parents=True, exist_ok=True)
    lock, me = folder / LOCK, f"{socket.gethostname()} {os.getpid()} {os.environ.get('SLURM_JOB_ID', '')}"
    for _ in range(3):
        with contextlib.suppress(FileExistsError), open(lock, "x") as f:
            f.write(me + "\n")
            _LOCKS.append((lock, me))
            return True
        holder = _holder(folder)
        if holder is not None:
            break
        lock.unlink(missing_ok=True)  # stale: its process has ended
    if chosen:
        raise _in_use(folder, holder or "another process")
    return False


def _in_use(folder: Path, holder: str) -> UserError:
    return UserError(f"the run directory {folder} is in use by {holder}: wait for it to end, or choose another "
                     f"run_name (remove {folder / LOCK} if no such process runs)")


@atexit.register
def _unlock_all() -> None:
    """Release the run directories this process claimed (at the end of the command, and at exit)."""
    while _LOCKS:
        lock, me = _LOCKS.pop()
        with contextlib.suppress(OSError):
            if lock.read_text().strip() == me:
                lock.unlink()


def _set_run_dir(config: DictConfig, folder: Path) -> None:
    with read_write(config.hydra), open_dict(config.hydra):
        config.hydra.run.dir = str(folder)
        config.hydra.runtime.output_dir = os.path.abspath(folder)  # as Hydra sets it
    HydraConfig.instance().set_config(config)  # ${hydra:...} resolve as in the job


def _hydra_records(folder: Path) -> dict[Path, bytes]:
    """The ``.hydra/*.yaml`` files of the run directories in (or at) ``folder``, by absolute path."""
    return {p: p.read_bytes() for p in Path(os.path.abspath(folder)).glob("**/.hydra/*.yaml")}


class CheckConfigBeforeRun(Callback):
    """Hydra callback: build the command's run before Hydra creates its directory. An accepted command that changes
    a reused directory's ``.hydra/*.yaml`` keeps the earlier ones in ``.hydra/previous/<time>/``."""

    _earlier: dict[Path, bytes] = {}  # the .hydra/*.yaml files read before Hydra rewrites them (replaced, not changed)

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        """Choose the run directory (train: resumed if its name was chosen, else a free ``<dir>-<n>``), then build."""
        command = str(config.hydra.job.config_name)
        train = command == "train" and is_main_process()
        try:
            wanted = Path(str(config.hydra.run.dir))
            named = any(o.split("=", 1)[0].lstrip("+~") == "run_name" for o in config.hydra.overrides.task) \
                or "SLURM_JOB_ID" in os.environ  # the name was chosen (or is SLURM's job): a taken directory is resumed
            resume = check_bool("resume", config.get("resume", True)) and named
            for folder in numbered(wanted) if train else [wanted]:
                if train and folder.is_dir() and any(folder.iterdir()) and not resume:  # it holds another run
                    continue
                if train and (holder := _holder(folder)) is not None:
                    raise _in_use(folder, holder)
                _set_run_dir(config, folder)
                self._earlier = _hydra_records(folder)
                run = _prepare(config)
                if command in ("eval", "sample", "ood") and is_main_process():
                    _set_run_dir(config, new_dir(folder))  # accepted: claim a directory no command has written to
                if not train or _claim(folder, named):
                    break
        except Exception as e:  # noqa: BLE001 - reported by run_hydra: a user error in one line, a bug in full
            raise Rejected(e) from e
        if train and folder != wanted:
            print(f"{wanted} holds another run (resume=false, or a default run_name): this run goes to {folder}",
                  flush=True)
        _PREPARED[str(config.hydra.runtime.output_dir)] = run

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        _COMMON[:] = [o.split("=", 1)[0] for o in config.hydra.overrides.get("task") or []  # the keys not swept
                      if "," not in o.split("=", 1)[-1]]
        try:
            self._earlier = _hydra_records(Path(str(config.hydra.sweep.dir)))
        except Exception as e:  # noqa: BLE001
            raise Rejected(e) from e

    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        """Build a multirun job (Hydra has made its directory and written .hydra/: a rejected job undoes that)."""
        folder = Path(os.path.abspath(config.hydra.runtime.output_dir))
        earlier = {p: b for p, b in self._earlier.items() if p.parent == folder / ".hydra"}
        if str(folder) not in _PREPARED:
            try:
                _PREPARED[str(folder)] = _prepare(config)
                if str(config.hydra.job.config_name) == "train" and is_main_process():
                    _claim(folder)
            except Exception as e:  # noqa: BLE001 - the task raises it: Hydra records the point as failed
                _PREPARED[str(folder)] = Rejected(e)
                if not earlier and all(p.name == ".hydra" or p.suffix == ".log" for p in folder.iterdir()):
                    shutil.rmtree(folder, ignore_errors=True)  # Hydra made it for this job
                for path, content in earlier.items():
                    path.write_bytes(content)
                return
        if any(p.name != "hydra.yaml" and (not p.is_file() or p.read_bytes() != b) for p, b in earlier.items()):
            keep = folder / ".hydra" / "previous" / f"{datetime.datetime.now():%Y-%m-%d_%H-%M-%S-%f}"
            keep.mkdir(parents=True)
            for path, content in earlier.items():
                (keep / path.name).write_bytes(content)

    def on_job_end(self, config: DictConfig, job_return, **kwargs) -> None:
        """Record a multirun point's state and go on with the sweep; leave a single run's error to run_hydra."""
        failed, value = job_return.status == JobStatus.FAILED, job_return._return_value
        if config.hydra.mode == RunMode.MULTIRUN:
            if "BasicLauncher" not in str(OmegaConf.select(config, "hydra.launcher._target_", default="")):
                return  # a job run elsewhere (SLURM): its launcher reports it to the submitting process
            point = " ".join(o for o in config.hydra.overrides.task if o.split("=", 1)[0] not in _COMMON) \
                or f"job {config.hydra.job.num}"
            state, what = "done", f"{value:.6f}" if isinstance(value, float) else str(value)
            if failed:
                what = user_error_message(value)
                if what is None:
                    traceback.print_exception(value, file=sys.stderr)
                    what = f"{type(value).__name__}: {value}"
                print(f"error: [{point}] {what}", file=sys.stderr, flush=True)
                state = "refused" if isinstance(value, UserError) and "training stopped" not in what else "failed"
            _SWEEP.append((point, state, what))
        elif failed:
            _FAILED.append(value)
        if failed:  # reported by run_hydra (a single run, without Hydra's own report) or the sweep goes on
            job_return.status, job_return._return_value = JobStatus.COMPLETED, None


def user_error_message(e: BaseException) -> str | None:
    """The message to print for an error a person caused, or None for a bug."""
    cur, seen = e, set()
    while cur is not None and id(cur) not in seen:  # an error raised inside instantiate() is wrapped
        seen.add(id(cur))
        if isinstance(cur, UserError):
            return str(cur)
        if isinstance(cur, OSError) and cur.errno == errno.ENOSPC:  # a full disk: which file, how much space
            where, free = Path(cur.filename or ".").parent, "unknown space"
            with contextlib.suppress(OSError):
                free = f"{shutil.disk_usage(where).free / 2**20:.1f} MiB"
            return (f"no space left on the device writing {cur.filename or 'a file'} ({free} free in {where}); files "
                    "written before are intact. Free some space, then run the same command again to resume")
        cur = cur.__cause__
    if isinstance(e, MissingConfigException) and e.options and "/" in (e.missing_cfg_file or ""):
        group, _, name = e.missing_cfg_file.rpartition("/")
        return f"{group}={name} is not a known option; available {group} options: {', '.join(sorted(e.options))}"
    if isinstance(e, OverrideParseException):
        return f"cannot parse the override {e.override!r}: {e.message}".strip()
    if isinstance(e, HydraException) and not isinstance(e, InstantiationException):  # unknown keys, bad overrides
        msg = str(e).split("\n\nConfig search path", 1)[0].strip()
        cause = str(e.__cause__) if isinstance(e.__cause__, OmegaConfBaseException) else ""
        return msg if cause in msg else f"{msg}\n{cause.splitlines()[0]}"
    if isinstance(e, OmegaConfBaseException):  # e.g. a required value (???) left unset
        return str(e).splitlines()[0]
    return None


def run_hydra(task: Callable[[DictConfig], object], config_name: str, argv: list[str] | None = None) -> None:
    """Run ``task`` as a Hydra app on ``conf/<config_name>.yaml``; exit 2 with ``error: ...`` on user errors."""
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra re-raises instead of printing its own report
    for found in (_PREPARED, _SWEEP, _FAILED):
        found.clear()
    try:
        hydra.main(version_base="1.3", config_path=str(config_dir()), config_name=config_name)(task)()
        if _FAILED:
            raise _FAILED.pop()
        if _SWEEP:
            _end_sweep()
    except (Exception, Rejected) as e:  # the one place where errors are reported
        error = e.args[0] if isinstance(e, Rejected) else e
        message = user_error_message(error)
        if message is None:  # a bug: its own traceback
            raise error from None
        print(f"error: {message}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_USER_ERROR) from None
    finally:
        _unlock_all()


def _end_sweep() -> None:
    """Print the points of a multirun and their state: ``done`` (with test/bpd), ``refused`` or ``failed`` (why);
    exit 2 when every failing point was refused, 1 when one failed otherwise."""
    width = max(len(p) for p, _, _ in _SWEEP)
    failed = [state for _, state, _ in _SWEEP if state != "done"]
    lines = [f"sweep: {len(_SWEEP) - len(failed)} of {len(_SWEEP)} points done" + (f", {len(failed)} not" if failed else ""),
             f"{'point':<{width}}  {'state':<7}  test/bpd or error"]
    lines += [f"{p:<{width}}  {state:<7}  {what}" for p, state, what in _SWEEP]
    print("\n".join(lines), file=sys.stderr if failed else sys.stdout, flush=True)
    if failed:
        raise SystemExit(1 if "failed" in failed else EXIT_USER_ERROR)
