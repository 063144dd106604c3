"""Running a flowlab command as a Hydra app, so that a rejected command writes nothing and says why in one line.

The Hydra callback :class:`CheckConfigBeforeRun` (conf/train.yaml) calls the command's ``prepare(cfg)``
— data, model, callbacks, loggers and trainer built once, then the checkpoint and data read — before
Hydra creates the run directory and writes ``.hydra/``; the task takes what was built. Every mistake a
person can make (an unknown option, a malformed override, a :class:`flowlab.errors.UserError`) ends in
the one ``except`` of :func:`run_hydra`: ``error: <message>`` on stderr, exit status 2. Bugs keep their
traceback. (Multirun jobs get their directory from Hydra first: a rejected job's is removed again.)

One run, one folder: ``flowlab-train`` claims its run directory with a lock file created exclusively
(``O_CREAT|O_EXCL``). A directory that holds a run is resumed when its name was chosen (``run_name=`` on
the command line, or under SLURM, where the default name is the job's), and refused while another live
process holds it; a default name that is taken, or ``resume=false``, gives a new directory ``<name>-<n>``.
In a multirun, a refused or failed point is recorded and the others run; a table of the points and their
state ends the sweep, which then exits with status 2 (every failing point refused) or 1.
"""

from __future__ import annotations

import atexit
import datetime
import importlib
import os
import secrets
import shutil
import socket
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

from hydra.errors import HydraException, InstantiationException, MissingConfigException, OverrideParseException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write
from omegaconf.errors import OmegaConfBaseException

from flowlab.errors import ConfigError, UserError, check_bool

__all__ = ["run_hydra", "CheckConfigBeforeRun", "prepared", "user_error_message", "EXIT_USER_ERROR"]

EXIT_USER_ERROR = 2
#: the commands whose every run gets a new directory (``<run_name>``, else ``<run_name>-1``, ...)
NEW_DIRECTORY_COMMANDS = ("eval", "sample", "ood")
# what CheckConfigBeforeRun built, by run directory, for the task to take
_PREPARED: dict[str, object] = {}
LOCK = ".lock"  # <run dir>/.lock: "<host> <pid> <SLURM job>" of the process that runs there
_SWEEP: list[tuple[str, str, str]] = []  # (sweep point, state, test/bpd or error) of this multirun's jobs
_FAILED: list[BaseException] = []  # the error of a single run, raised again by run_hydra
_COMMON: list[str] = []  # the keys a multirun sets to one value (a point is named by the others)


def run_stamp() -> str:
    """The default run name: a time stamp and a random suffix (unique for runs started in the same second);
    under SLURM ``slurm-<job>[_<array task>][.<step>]``, the same in every task of a job step and after a requeue
    (which therefore resumes)."""
    array, job, step = (os.environ.get(k) for k in ("SLURM_ARRAY_JOB_ID", "SLURM_JOB_ID", "SLURM_STEP_ID"))
    if array or job:
        name = f"slurm-{array}_{os.environ.get('SLURM_ARRAY_TASK_ID', '0')}" if array else f"slurm-{job}"
        return name + (f".{step}" if step else "")
    return f"{datetime.datetime.now():%Y-%m-%d_%H-%M-%S}-{secrets.token_hex(2)}"


OmegaConf.register_new_resolver("run_stamp", run_stamp, use_cache=True, replace=True)


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
    if isinstance(found, Rejected):  # a multirun point refused in on_job_start: Hydra records it as failed
        raise found.error
    return found if found is not None else prepare(cfg)


def _check_run_name(config: DictConfig) -> None:
    name = config.get("run_name")
    parts = str(name).split("/")
    if not isinstance(name, (str, int)) or str(name).strip() in ("", ".", "..") or "\\" in str(name) \
            or str(name).startswith(("/", "~")) or ".." in parts:
        raise ConfigError(f"run_name={name!r} is not allowed: give a name for a run directory inside the outputs "
                          "folder (no absolute path, no '..'); paths.output_dir=... moves the outputs folder")


def _name_chosen(config: DictConfig) -> bool:
    """Whether this run's name is fixed (``run_name=`` given, or SLURM's job id): a taken directory is resumed."""
    task = list(config.hydra.overrides.get("task") or [])
    return any(o.split("=", 1)[0].lstrip("+~") == "run_name" for o in task) or "SLURM_JOB_ID" in os.environ


def _taken(folder: Path) -> bool:
    return folder.is_dir() and any(folder.iterdir())


def _holder(folder: Path) -> str | None:
    """Who holds ``folder``'s lock ("process <pid> on <host>"), or None when nobody alive does."""
    try:
        host, pid, job = ((folder / LOCK).read_text().split() + ["", "", ""])[:3]
    except OSError:
        return None
    if (job and job == os.environ.get("SLURM_JOB_ID")) or not pid.isdigit():  # our own job, requeued
        return None
    if host == socket.gethostname():
        if int(pid) == os.getpid():  # this process, in an earlier command (tests, a multirun's earlier point)
            return None
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
    return f"process {pid} on {host}"


def _lock(folder: Path) -> str | None:
    """Claim ``folder`` (created if needed) with ``<folder>/.lock``, made exclusively; released at exit. Returns
    None, or who holds it."""
    folder.mkdir(parents=True, exist_ok=True)
    lock, me = folder / LOCK, f"{socket.gethostname()} {os.getpid()} {os.environ.get('SLURM_JOB_ID', '')}"
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _holder(folder)
            if holder is not None:
                return holder
            lock.unlink(missing_ok=True)  # stale: its process has ended
            continue
        with os.fdopen(fd, "w") as f:
            f.write(me + "\n")
        _LOCKS.append((lock, me))
        return None
    return "another process"


def _unlock_all() -> None:
    """Release the run directories this process claimed (at the end of the command, and at exit)."""
    while _LOCKS:
        lock, me = _LOCKS.pop()
        try:
            if lock.read_text().strip() == me:
                lock.unlink()
        except OSError:
            pass


_LOCKS: list[tuple[Path, str]] = []
atexit.register(_unlock_all)


def _in_use(folder: Path, holder: str) -> UserError:
    return UserError(f"the run directory {folder} is in use by {holder}: wait for it to end, or choose another "
                     f"run_name (remove {folder / LOCK} if no such process runs)")


def _train_folder(config: DictConfig, folder: Path) -> Path:
    """Where a new ``flowlab-train`` run goes: ``folder``, or a new ``<folder>-<n>`` when ``folder`` holds a run
    and its name was not chosen (or ``resume=false``). Refuses a chosen name whose directory is in use."""
    resume = check_bool("resume", config.get("resume", True))
    if not _taken(folder):
        return folder
    if _name_chosen(config) and resume:
        holder = _holder(folder)
        if holder is not None:
            raise _in_use(folder, holder)
        return folder
    n = 1
    while _taken(folder.with_name(f"{folder.name}-{n}")):
        n += 1
    return folder.with_name(f"{folder.name}-{n}")


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
        command = str(config.hydra.job.config_name)
        try:
            _check_run_name(config)
            wanted = folder = Path(str(config.hydra.run.dir))
            for _ in range(100):  # a new run that loses the race for its directory tries the next name
                if command == "train" and is_main_process():
                    folder = _train_folder(config, folder)
                _set_run_dir(config, folder)
                HydraConfig.instance().set_config(config)  # ${hydra:...} resolve as in the job
                self._earlier = _hydra_records(folder)
                run = _prepare(config)
                if command in NEW_DIRECTORY_COMMANDS and is_main_process():
                    _set_run_dir(config, new_dir(folder))  # accepted: claim a directory no command has written to
                if command != "train" or not is_main_process():
                    break
                holder = _lock(folder)
                if holder is None:
                    break
                if _name_chosen(config):
                    raise _in_use(folder, holder)
        except Exception as e:  # noqa: BLE001 - reported by run_hydra: a user error in one line, a bug in full
            raise Rejected(e) from e
        if command == "train" and folder != wanted:
            print(f"{wanted} holds another run (resume=false, or a default run_name): this run goes to {folder}",
                  flush=True)
        _PREPARED[str(config.hydra.runtime.output_dir)] = run

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        _PREPARED.clear()
        _SWEEP.clear()
        _COMMON[:] = [o.split("=", 1)[0] for o in config.hydra.overrides.get("task") or []  # the keys not swept
                      if "," not in o.split("=", 1)[-1]]
        try:
            self._earlier = _hydra_records(Path(str(config.hydra.sweep.dir)))
        except Exception as e:  # noqa: BLE001
            raise Rejected(e) from e

    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        """A multirun job: built here (Hydra has made its directory and written .hydra/); a single run: built
        in on_run_start. Either way, keep the earlier record of a reused directory."""
        from flowlab.cli._build import is_main_process

        folder = Path(os.path.abspath(config.hydra.runtime.output_dir))
        if str(folder) not in _PREPARED:
            try:
                _check_run_name(config)
                _PREPARED[str(folder)] = _prepare(config)
                holder = _lock(folder) if str(config.hydra.job.config_name) == "train" and is_main_process() else None
                if holder is not None:
                    raise _in_use(folder, holder)
            except Exception as e:  # noqa: BLE001 - the task raises it: Hydra records the point as failed
                self._undo(folder)
                _PREPARED[str(folder)] = Rejected(e)
                return
        self._keep_earlier(folder)

    def on_job_end(self, config: DictConfig, job_return, **kwargs) -> None:
        """A multirun point run in this process: record its state; a failure is reported here, and the sweep goes
        on. A single run: its error is left to run_hydra (without Hydra's own report)."""
        from hydra.core.utils import JobStatus
        from hydra.types import RunMode

        if config.hydra.mode != RunMode.MULTIRUN:  # a single run: run_hydra reports its error, alone
            if job_return.status == JobStatus.FAILED:
                _FAILED.append(job_return._return_value)
                job_return.status, job_return._return_value = JobStatus.COMPLETED, None
            return
        if "BasicLauncher" not in str(OmegaConf.select(config, "hydra.launcher._target_", default="")):
            return  # a job run elsewhere (SLURM): its launcher reports it to the submitting process
        point = " ".join(o for o in config.hydra.overrides.get("task") or [] if o.split("=", 1)[0] not in _COMMON) \
            or f"job {config.hydra.job.num}"
        if job_return.status == JobStatus.COMPLETED:
            value = job_return.return_value
            _SWEEP.append((point, "done", f"{value:.6f}" if isinstance(value, float) else str(value)))
            return
        error = job_return._return_value
        message = user_error_message(error) if isinstance(error, BaseException) else None
        if message is None:
            traceback.print_exception(error, file=sys.stderr)
            message = f"{type(error).__name__}: {error}"
        print(f"error: [{point}] {message}", file=sys.stderr, flush=True)
        _SWEEP.append((point, "refused" if isinstance(error, UserError) and "training stopped" not in message
                       else "failed", message))
        job_return.status, job_return._return_value = JobStatus.COMPLETED, None  # the sweep goes on

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
    import errno

    seen = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:  # an error raised inside instantiate() is wrapped
        seen.add(id(cur))
        if isinstance(cur, UserError):
            return str(cur)
        if isinstance(cur, OSError) and cur.errno == errno.ENOSPC:  # a full disk: which file, how much space
            where = Path(cur.filename or ".").parent
            try:
                free = f"{shutil.disk_usage(where).free / 2**20:.1f} MiB free in {where}"
            except OSError:
                free = f"free space in {where} unknown"
            return (f"no space left on the device writing {cur.filename or 'a file'} ({free}); files written "
                    "before are intact. Free some space, then run the same command again to resume")
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
    _SWEEP.clear()
    _FAILED.clear()
    try:
        hydra.main(version_base="1.3", config_path=str(config_dir()), config_name=config_name)(task)()
        if _FAILED:
            raise _FAILED.pop()
        if any(state != "done" for _, state, _ in _SWEEP):
            print(sweep_table(_SWEEP), file=sys.stderr, flush=True)
            raise SystemExit(EXIT_USER_ERROR if all(state != "failed" for _, state, _ in _SWEEP) else 1)
        if _SWEEP:
            print(sweep_table(_SWEEP), flush=True)
    except (Exception, Rejected) as e:  # the one place where errors are reported
        error = e.error if isinstance(e, Rejected) else e
        message = user_error_message(error)
        if message is None:  # a bug: its own traceback
            raise error from None
        print(f"error: {message}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_USER_ERROR) from None
    finally:
        _unlock_all()


def sweep_table(rows: list[tuple[str, str, str]]) -> str:
    """The points of a multirun and their state: ``done`` (with test/bpd), ``refused`` or ``failed`` (why)."""
    width = max(len(p) for p, _, _ in rows)
    failed = sum(state != "done" for _, state, _ in rows)
    lines = [f"sweep: {len(rows) - failed} of {len(rows)} points done" + (f", {failed} not" if failed else ""),
             f"{'point':<{width}}  {'state':<7}  test/bpd or error"]
    lines += [f"{p:<{width}}  {state:<7}  {what}" for p, state, what in rows]
    return "\n".join(lines)
