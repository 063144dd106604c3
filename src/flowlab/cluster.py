"""Multi-process and cluster runs: which DDP strategy works where, and the submitit launcher for SLURM.

``hydra/launcher=slurm`` submits one SLURM job per sweep point (an array per distinct request), derives the
request from each point's trainer, and follows the jobs; SLURM starts every DDP process, so ``ddp_spawn``
runs as ``ddp``. Requeue is :class:`flowlab.lit.preemption.Preemption`'s, not Lightning's (whose handler saves
inside a collective and can deadlock DDP). See README, "Clusters".
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher as _HydraSlurmLauncher
from lightning_fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment
from omegaconf import OmegaConf

from flowlab.errors import ConfigError, UserError, check_choice
from flowlab.lit.preemption import REQUEUE_ENV, note_signal

log = logging.getLogger(__name__)

# strategies whose launcher starts the other local processes by running the script again (sys.argv)
_RELAUNCHING = ("ddp", "ddp_find_unused_parameters_false", "ddp_find_unused_parameters_true", "fsdp", "deepspeed")
# strategies that start the processes themselves; under SLURM, SLURM does (one task per process)
_SPAWNING = ("ddp_spawn", "ddp_fork", "ddp_notebook")
# the final states of a SLURM job besides COMPLETED; in any other state it may still run
_ENDED_BADLY = ("FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL", "DEADLINE")
_ASKED = ("nodes", "tasks_per_node", "gpus_per_node", "cpus_per_task", "mem_gb", "slurm_mem_per_cpu", "slurm_partition",
          "slurm_gres")  # what a refusal names


def cluster_plugins() -> list:
    """Under SLURM, Lightning's SLURMEnvironment without its auto-requeue (Preemption requeues at a step boundary)."""
    return [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else []


def set_requeue_allowed(max_requeues: int) -> bool:
    """On a SLURM node: tell Preemption whether requeues are left (``SLURM_RESTART_COUNT`` < ``max_requeues``)."""
    allowed = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) < int(max_requeues)
    os.environ[REQUEUE_ENV] = "1" if allowed else "0"
    return allowed


def _strategy_name(trainer_cfg: Mapping) -> str:
    strategy = trainer_cfg.get("strategy", "auto")
    return str(strategy.get("_target_", "") if isinstance(strategy, Mapping) else strategy).lower()


def check_strategy_for_multirun(trainer_cfg: Mapping, multirun: bool) -> None:
    """ConfigError for a local multirun with a strategy that relaunches ``sys.argv`` (each child would run the
    whole sweep again), unless something outside Lightning started the processes (SLURM, torchrun, a DDP child)."""
    if not multirun or SLURMEnvironment.detect() or TorchElasticEnvironment.detect() or "LOCAL_RANK" in os.environ:
        return
    devices = trainer_cfg.get("devices", 1)
    count = len(devices) if isinstance(devices, (list, tuple)) else devices
    if (int(trainer_cfg.get("num_nodes", 1) or 1) > 1 or count not in (0, 1, "1")) and \
            _strategy_name(trainer_cfg) in _RELAUNCHING:
        raise ConfigError(
            f"trainer.strategy={_strategy_name(trainer_cfg)} with {devices} devices cannot run inside a local multirun "
            "(-m): Lightning starts its other processes by running the command again, and each would run the whole "
            "sweep. Use trainer.strategy=ddp_spawn (e.g. trainer=ddp_cpu) for a local sweep, or "
            "hydra/launcher=slurm (one SLURM job per sweep point, SLURM starts the processes)")


def slurm_request(cfg) -> dict[str, Any]:
    """The per-job part of the SLURM request for one sweep point's composed config, ``auto`` resolved: GPUs
    only when the trainer uses them, ``data.num_workers + 1`` CPUs per task."""
    get = partial(OmegaConf.select, cfg)
    req = {k: get(f"hydra.launcher.{k}") for k in ("nodes", "tasks_per_node", "gpus_per_node", "cpus_per_task")}
    tasks = req["tasks_per_node"]
    tasks = len(tasks) if isinstance(tasks, (list, tuple)) else tasks
    tasks = int(tasks) if isinstance(tasks, str) and tasks.strip().isdigit() else tasks
    if not isinstance(tasks, int) or isinstance(tasks, bool) or tasks < 1:
        raise ConfigError(f"hydra.launcher.tasks_per_node={tasks!r} (from trainer.devices={get('trainer.devices')!r}): "
                          "SLURM starts one task per process, so give the number of processes per node, "
                          "e.g. trainer.devices=4")
    req["tasks_per_node"] = tasks
    if req["gpus_per_node"] == "auto":
        uses_gpu = str(get("trainer.accelerator", default="auto")).lower() in ("gpu", "cuda")
        req["gpus_per_node"] = tasks if uses_gpu and not get("hydra.launcher.gres") else None
    if req["cpus_per_task"] == "auto":
        req["cpus_per_task"] = int(get("data.num_workers", default=0) or 0) + 1
    return req


def _overrides_for_slurm(cfg, overrides: list[str]) -> list[str]:
    """``trainer.strategy=ddp`` where the point's strategy spawns its processes (SLURM starts them instead)."""
    name = _strategy_name(cfg.trainer)
    if name not in _SPAWNING:
        return overrides
    log.info(f"trainer.strategy={name} runs as ddp under SLURM: SLURM starts one task per process")
    return [o for o in overrides if not o.lstrip("+~").startswith("trainer.strategy=")] + ["trainer.strategy=ddp"]


def slurm_states(job_ids: Sequence[str]) -> dict[str, tuple[str, int]] | None:
    """The controller's (``squeue``) state and requeue count of each job or array task it holds, which alone knows
    a job being requeued from one that ended (sacct once showed one FAILED); ``None`` while it does not answer."""
    ask = ["squeue", "-h", "-t", "all", "-r", "-O", "JobArrayID:|,State:|,RestartCnt:", "-j",
           ",".join(sorted({i.split("_")[0] for i in job_ids}))]
    try:
        queue = subprocess.run(ask, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    rows = [line.split("|") for line in queue.stdout.splitlines() if line.count("|") == 2]
    return None if queue.returncode and "Invalid job id" not in queue.stderr else \
        {job.strip(): (state.strip(), int(n) if n.strip().isdigit() else 0) for job, state, n in rows}


def _short_error(job) -> str:
    """Why a job failed: its last ``error: ...`` line, else the last line of its stderr."""
    with contextlib.suppress(Exception):  # no log yet / unreadable: the message says where to look
        lines = [line for line in (job.stderr() or "").splitlines() if line.strip()]
        line = ([x for x in lines if x.startswith("error: ")] or lines or ["no error output"])[-1].removeprefix("error: ")
        return line.split("] ", 1)[-1] if line.startswith("[") else line  # "error: [<sweep point>] <message>"
    return "no error output"


class RequeueSubmititLauncher(_HydraSlurmLauncher):
    """Hydra's submitit SLURM launcher with the request derived per sweep point, requeue on SIGUSR1 and progress
    lines; its extra keys (``cluster``, ``requeue_signal``, ``poll_s``) are described in conf/hydra/launcher/slurm.yaml."""

    def __init__(self, cluster: str, requeue_signal: str, poll_s: float, **params: Any) -> None:
        check_choice("hydra.launcher.cluster", cluster, ("slurm", "local", "debug"))
        if str(requeue_signal).upper().removeprefix("SIG") != "USR1":
            raise ConfigError(f"hydra.launcher.requeue_signal={requeue_signal!r}: flowlab requeues on USR1; use USR1")
        super().__init__(**params)
        self.cluster, self.poll_s = cluster, float(poll_s)

    def executor_parameters(self, request: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """``(init parameters, update_parameters)`` of the submitit ``AutoExecutor`` for one :func:`slurm_request`."""
        params = {**self.params, **request}
        init = {"folder": params.pop("submitit_folder"), "slurm_max_num_timeout": int(params.pop("max_num_timeout", 0))}
        # sbatch --signal: submitit would ask for its own signal (USR2); flowlab listens to USR1
        params["additional_parameters"] = {"signal": f"USR1@{int(params.get('signal_delay_s', 120))}",
                                           **(params.get("additional_parameters") or {})}
        if params.get("mem_gb") is not None:  # --mem and --mem-per-cpu exclude each other
            params.pop("mem_per_cpu", None)
        if params.get("gres"):
            params.pop("gpus_per_node", None)
        generic = set(OmegaConf.structured(BaseQueueConf).keys())
        return init, {k if k in generic else f"slurm_{k}": v for k, v in params.items() if v is not None}

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int):
        import submitit

        sweep_dir = Path(str(self.config.hydra.sweep.dir))  # resolves ${run_name} (and caches ${now:...})
        sweep_dir.mkdir(parents=True, exist_ok=True)
        new = all(p.name == "multirun.yaml" for p in sweep_dir.iterdir())  # Hydra's; a refusal leaves no folder
        log.info(f"submitit '{self.cluster}' sweep output dir: {sweep_dir}")
        common = set.intersection(*(set(o) for o in job_overrides))  # a job's label shows what differs
        points: dict[int, tuple[str, list]] = {}  # label, overrides
        groups: dict[tuple, list[tuple]] = {}  # one array per distinct request
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            label = " ".join(o for o in filter_overrides(overrides) if o not in common)
            points[idx] = (f"#{idx} {label}".strip(), list(overrides))
            mapped = _overrides_for_slurm(cfg, list(overrides))
            log.info(f"\t#{idx} : {' '.join(filter_overrides(mapped))}")
            groups.setdefault(tuple(sorted(slurm_request(cfg).items())), []).append(
                (mapped, "hydra.sweep.dir", idx, f"job_id_for_{idx}", Singleton.get_state()))
        jobs: dict[int, tuple] = {}  # job, label, overrides
        for request, params in groups.items():
            init, update = self.executor_parameters(dict(request))
            executor = submitit.AutoExecutor(cluster=self.cluster, **init)
            executor.update_parameters(**update)
            said = io.StringIO()  # sbatch's stderr, which submitit echoes: one line below on a refusal
            try:
                with contextlib.redirect_stderr(said):
                    submitted = executor.map_array(self, *zip(*params))
            except submitit.core.utils.FailedJobError as e:  # sbatch refused the request
                if new and not jobs:
                    shutil.rmtree(sweep_dir, ignore_errors=True)
                reason = str(e).strip().splitlines()[-1].split("error: ")[-1] if str(e).strip() else type(e).__name__
                asked = ", ".join(f"{k}={v}" for k, v in update.items() if k in _ASKED)
                raise UserError(f"hydra/launcher=slurm: the cluster refused the job ({reason}); it asked for {asked}. "
                                "Change the trainer (devices, accelerator) or the hydra.launcher.* key, e.g. "
                                "hydra.launcher.partition, cpus_per_task or mem_per_cpu") from None
            sys.stderr.write(said.getvalue())
            jobs.update({p[2]: (job, *points[p[2]]) for p, job in zip(params, submitted)})
        return self._follow([jobs[i] for i in sorted(jobs)])

    def _follow(self, jobs: list[tuple]) -> list:
        """Wait for the jobs, printing each one's state when it changes and each requeue; their JobReturns, in
        sweep order."""
        returns: dict[int, Any] = {}
        seen: dict[int, tuple[str, int]] = {}
        states: dict[str, tuple[str, int]] = {}
        while True:
            if self.cluster != "slurm":  # local, debug (whose done() runs the job)
                states = {job.job_id: ("COMPLETED" if job.done() else "RUNNING", 0) for job, *_ in jobs}
            elif (held := slurm_states([job.job_id for job, *_ in jobs])) is not None:  # else: as before
                states = {job.job_id: held.get(job.job_id) or (job.watcher.get_state(job.job_id, "force"), 0)
                          for job, *_ in jobs}
            for i, (job, label, overrides) in enumerate(jobs):
                (state, restarts), (before, requeues) = states.get(job.job_id, ("", 0)), seen.get(i, ("", 0))
                if i in returns or state in ("UNKNOWN", ""):
                    continue
                if restarts > requeues:
                    print(f"[slurm] job {job.job_id} ({label}): REQUEUED (restart {restarts})", flush=True)
                if state.split(" ")[0] in ("COMPLETED", *_ENDED_BADLY):
                    returns[i] = self._ended(job, label, overrides, state)
                elif state != before or restarts > requeues:  # after a requeue: the state it is in now
                    print(f"[slurm] job {job.job_id} ({label}): {state}", flush=True)
                seen[i] = (state, max(restarts, requeues))
            if len(returns) == len(jobs):
                return [returns[i] for i in range(len(jobs))]
            time.sleep(self.poll_s)

    def _ended(self, job, label: str, overrides: list[str], state: str):
        """Print how a finished job ended (``COMPLETED test/bpd=...``, else its state and why); its JobReturn."""
        try:
            ret = job.results()[0]  # rank 0's
        except Exception:  # noqa: BLE001 - the job died outside the task: SLURM's state and its log say why
            ret = None
        value = ret.return_value if ret is not None and ret.status == JobStatus.COMPLETED else None
        if isinstance(value, (int, float)):  # flowlab-train returns the test bits/dim
            print(f"[slurm] job {job.job_id} ({label}): COMPLETED test/bpd={value:.6f} "
                  f"run directory: {OmegaConf.select(ret.hydra_cfg, 'hydra.runtime.output_dir')}", flush=True)
            return ret
        error = getattr(ret, "_return_value", None)  # the task raised, or recorded its error on the node
        why = str(error) if isinstance(error, BaseException) else _short_error(job)
        state = state if (state.split() or [""])[0] in _ENDED_BADLY else "FAILED"
        print(f"[slurm] job {job.job_id} ({label}): {state} {why}", flush=True)
        if not isinstance(error, BaseException):
            error = UserError(f"job {job.job_id} ({label}) ended {state}: {why} (log: {job.paths.stderr})")
        return JobReturn(overrides=overrides, status=JobStatus.FAILED, _return_value=error)

    def __call__(self, sweep_overrides, job_dir_key, job_num, job_id, singleton_state):
        """The job side, once per task. SIGUSR1 is only ever noted (its default action kills): Preemption acts on it
        during training; it is ignored once the task has returned (Python's shutdown would restore the default)."""
        set_requeue_allowed(int(self.params.get("max_num_timeout", 0) or 0))
        signal.signal(signal.SIGUSR1, note_signal)
        try:
            return super().__call__(sweep_overrides, job_dir_key, job_num, job_id, singleton_state)
        finally:
            signal.signal(signal.SIGUSR1, signal.SIG_IGN)
