"""Multi-process and cluster runs: the submitit launcher for SLURM, and which DDP strategy works where.

How the pieces fit (see also README, "Clusters"):

- ``flowlab-train -m hydra/launcher=slurm trainer=ddp ...`` submits **one SLURM job per sweep point**
  (a job array for a sweep) through Hydra's submitit launcher. The request follows each point's config:
  ``nodes = trainer.num_nodes``, one task per process (``tasks_per_node = trainer.devices``), GPUs only when
  the trainer uses them, ``data.num_workers + 1`` CPUs per task. SLURM starts every DDP process and
  Lightning's ``SLURMEnvironment`` wires them together, so ``ddp_spawn`` (``trainer=ddp_cpu``) runs as
  ``ddp`` there. Points that ask for different resources go out as separate arrays. The submitting
  process prints each job's state as it changes and ``test/bpd`` when it ends.
- **Requeue** is flowlab's (:class:`flowlab.lit.preemption.Preemption`), not Lightning's auto-requeue,
  whose signal handler saves in the middle of a collective and can deadlock DDP: SLURM sends SIGUSR1
  ``signal_delay_s`` seconds before the time limit, every rank saves ``last.ckpt`` together at the next
  step boundary, rank 0 runs ``scontrol requeue`` and the job resumes there (at most ``max_num_timeout``
  times, counted by ``SLURM_RESTART_COUNT``).
- **Locally**, ``trainer=ddp`` (Lightning starts the other processes by running the same command again)
  works for single runs, ``trainer=ddp_cpu`` (``ddp_spawn``) for single runs and multiruns. A local
  multirun with a relaunching strategy would make every child run the whole sweep; it is refused.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher as _HydraSlurmLauncher

from flowlab.errors import ConfigError, UserError, check_choice
from flowlab.lit.preemption import REQUEUE_ENV, note_signal

__all__ = ["RequeueSubmititLauncher", "cluster_plugins", "check_strategy_for_multirun", "set_requeue_allowed", "REQUEUE_ENV"]

log = logging.getLogger(__name__)

# strategies whose launcher starts the other local processes by running the script again (sys.argv)
_RELAUNCHING = ("ddp", "ddp_find_unused_parameters_false", "ddp_find_unused_parameters_true", "fsdp", "deepspeed")
# strategies that start the processes themselves; under SLURM, SLURM does (one task per process)
_SPAWNING = ("ddp_spawn", "ddp_fork", "ddp_notebook")
_ENDED_BADLY = ("FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL", "DEADLINE")
_PER_JOB = ("nodes", "tasks_per_node", "gpus_per_node", "cpus_per_task")  # follow each sweep point's config


def cluster_plugins() -> list:
    """Trainer plugins for the cluster this process runs on: under SLURM, Lightning's SLURMEnvironment without
    its auto-requeue (flowlab's Preemption callback requeues at a step boundary)."""
    from lightning_fabric.plugins.environments import SLURMEnvironment

    return [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else []


def set_requeue_allowed(max_requeues: int) -> bool:
    """On a SLURM node: allow requeues while this job has been requeued fewer than ``max_requeues`` times
    (``SLURM_RESTART_COUNT``); the decision reaches the Preemption callback through the environment."""
    restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    allowed = restarts < int(max_requeues)
    os.environ[REQUEUE_ENV] = "1" if allowed else "0"
    return allowed


def _external_launch() -> bool:
    """True when something outside Lightning started every process (SLURM, torchrun, a Lightning child)."""
    from lightning_fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    return SLURMEnvironment.detect() or TorchElasticEnvironment.detect() or "LOCAL_RANK" in os.environ


def _strategy_name(trainer_cfg: Mapping) -> str:
    strategy = trainer_cfg.get("strategy", "auto")
    return str(strategy if isinstance(strategy, str) else getattr(strategy, "get", lambda *_: "")("_target_", "")).lower()


def check_strategy_for_multirun(trainer_cfg: Mapping, multirun: bool) -> None:
    """ConfigError for a local multirun with a strategy that relaunches ``sys.argv`` (each child would run
    the whole sweep again); ``ddp_spawn`` or the SLURM launcher is what works."""
    if not multirun or _external_launch():
        return
    devices = trainer_cfg.get("devices", 1)
    nodes = int(trainer_cfg.get("num_nodes", 1) or 1)
    many = nodes > 1 or devices in (-1, "auto") or (isinstance(devices, int) and devices > 1) or \
        (isinstance(devices, (list, tuple)) and len(devices) > 1) or (isinstance(devices, str) and devices not in ("1",))
    if many and _strategy_name(trainer_cfg) in _RELAUNCHING:
        raise ConfigError(
            f"trainer.strategy={_strategy_name(trainer_cfg)} with {devices} devices cannot run inside a local multirun "
            "(-m): Lightning starts its other processes by running the command again, and each would run the whole "
            "sweep. Use trainer.strategy=ddp_spawn (e.g. trainer=ddp_cpu) for a local sweep, or "
            "hydra/launcher=slurm (one SLURM job per sweep point, SLURM starts the processes)")


def slurm_request(cfg) -> dict[str, Any]:
    """The per-job part of the SLURM request for one sweep point's composed config: ``hydra.launcher``'s
    nodes / tasks_per_node / gpus_per_node / cpus_per_task with ``auto`` resolved (GPUs only when the trainer
    uses them, ``data.num_workers + 1`` CPUs per task)."""
    from omegaconf import OmegaConf

    def get(key, default=None):
        return OmegaConf.select(cfg, key, default=default)

    req = {k: get(f"hydra.launcher.{k}") for k in _PER_JOB}
    tasks = req["tasks_per_node"]
    tasks = len(tasks) if isinstance(tasks, (list, tuple)) else tasks
    if isinstance(tasks, str) and tasks.strip().isdigit():
        tasks = int(tasks)
    if not isinstance(tasks, int) or isinstance(tasks, bool) or tasks < 1:
        raise ConfigError(f"hydra.launcher.tasks_per_node={tasks!r} (from trainer.devices={get('trainer.devices')!r}): "
                          "SLURM starts one task per process, so give the number of processes per node, "
                          "e.g. trainer.devices=4")
    req["tasks_per_node"] = tasks
    if req["gpus_per_node"] == "auto":
        uses_gpu = str(get("trainer.accelerator", "auto")).lower() in ("gpu", "cuda")
        req["gpus_per_node"] = tasks if uses_gpu and not get("hydra.launcher.gres") else None
    if req["cpus_per_task"] == "auto":
        req["cpus_per_task"] = int(get("data.num_workers", 0) or 0) + 1
    return req


def _overrides_for_slurm(cfg, overrides: list[str]) -> list[str]:
    """``trainer.strategy=ddp`` where the point's strategy spawns its processes (SLURM starts them instead)."""
    name = _strategy_name(cfg.trainer)
    if name not in _SPAWNING:
        return overrides
    log.info(f"trainer.strategy={name} runs as ddp under SLURM: SLURM starts one task per process")
    return [o for o in overrides if not o.lstrip("+~").startswith("trainer.strategy=")] + ["trainer.strategy=ddp"]


def _remove_refused(sweep_dir: Path) -> None:
    """A refused submission leaves nothing: its sweep folder goes when it holds only what this command wrote
    (Hydra's multirun.yaml, submitit's pickles and scripts; no job folders of an earlier sweep)."""
    sub = sweep_dir / ".submitit"
    if all(p.name in ("multirun.yaml", ".submitit") for p in sweep_dir.iterdir()) and \
            not (sub.is_dir() and any(p.is_dir() for p in sub.iterdir())):
        shutil.rmtree(sweep_dir, ignore_errors=True)


def _short_error(job) -> str:
    """The line that says why a job failed: its ``error: ...`` line, else the last line of its stderr."""
    try:
        lines = [line for line in (job.stderr() or "").splitlines() if line.strip()]
    except Exception:  # noqa: BLE001 - no log yet / unreadable: say where to look
        lines = []
    picked = [line for line in lines if line.startswith("error: ")] or lines[-1:]
    line = picked[-1].removeprefix("error: ") if picked else "no error output"
    return line.split("] ", 1)[-1] if line.startswith("[") else line  # "error: [<sweep point>] <message>"


class RequeueSubmititLauncher(_HydraSlurmLauncher):
    """Hydra's submitit SLURM launcher with flowlab's resource derivation, requeue wiring and progress lines.

    Extra parameters (everything else is hydra-submitit-launcher's ``SlurmQueueConf``):
        cluster: ``slurm`` (default), or ``local`` / ``debug`` to run the same jobs through submitit on this
            machine (subprocesses / in-process), e.g. to try a sweep before sending it to the cluster.
        requeue_signal: the signal SLURM sends ``signal_delay_s`` seconds before the time limit.
        poll_s: seconds between the submitter's looks at the jobs' states (one ``sacct`` for all jobs).
    """

    def __init__(self, cluster: str = "slurm", requeue_signal: str = "USR1", poll_s: float = 10, **params: Any) -> None:
        check_choice("hydra.launcher.cluster", cluster, ("slurm", "local", "debug"))
        name = str(requeue_signal).upper().removeprefix("SIG")
        if name != "USR1":
            raise ConfigError(f"hydra.launcher.requeue_signal={requeue_signal!r}: flowlab requeues on USR1; use USR1")
        super().__init__(**params)
        self.cluster = cluster
        self.requeue_signal = name
        self.poll_s = float(poll_s)

    # ---- the submitting side --------------------------------------------------------------------------
    def executor_parameters(self, request: Mapping[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
        """``(init parameters, update_parameters)`` of the submitit ``AutoExecutor``; ``request`` (see
        :func:`slurm_request`) replaces the per-job keys."""
        from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
        from omegaconf import OmegaConf

        params = {**self.params, **(request or {})}
        init = {"folder": params.pop("submitit_folder"), "slurm_max_num_timeout": int(params.pop("max_num_timeout", 0))}
        extra = dict(params.pop("additional_parameters", None) or {})
        delay = int(params.get("signal_delay_s", 120))
        # sbatch --signal: submitit would send its own preemption signal (USR2); flowlab listens to USR1
        extra.setdefault("signal", f"{self.requeue_signal}@{delay}")
        params["additional_parameters"] = extra
        if params.get("mem_gb") is not None:  # --mem and --mem-per-cpu exclude each other
            params.pop("mem_per_cpu", None)
        if params.get("gres"):
            params.pop("gpus_per_node", None)
        for key in ("gpus_per_node", "cpus_per_task"):
            if params.get(key) == "auto":  # no composed config (a caller without request): leave it to SLURM
                params[key] = None
        generic = set(OmegaConf.structured(BaseQueueConf).keys())
        update = {k if k in generic else f"slurm_{k}": v for k, v in params.items() if v is not None}
        return init, update

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int):
        import submitit
        from hydra.core.singleton import Singleton
        from hydra.core.utils import filter_overrides

        assert self.config is not None and self.hydra_context is not None
        sweep_dir = Path(str(self.config.hydra.sweep.dir))  # resolves ${run_name} (and caches ${now:...})
        sweep_dir.mkdir(parents=True, exist_ok=True)
        log.info(f"submitit '{self.cluster}' sweep output dir: {sweep_dir}")
        groups: dict[tuple, list[tuple]] = {}  # one array per distinct request
        common = set.intersection(*(set(o) for o in job_overrides))  # the label shows what differs between points
        labels, points = {}, {}
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            points[idx] = list(overrides)
            cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            request = slurm_request(cfg)
            labels[idx] = f"#{idx} {' '.join(o for o in filter_overrides(overrides) if o not in common)}".strip()
            overrides = _overrides_for_slurm(cfg, list(overrides))
            log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
            groups.setdefault(tuple(sorted(request.items())), []).append(
                (overrides, "hydra.sweep.dir", idx, f"job_id_for_{idx}", Singleton.get_state()))
        jobs: dict[int, Any] = {}
        for request, params in groups.items():
            init, update = self.executor_parameters(dict(request))
            executor = submitit.AutoExecutor(cluster=self.cluster, **init)
            executor.update_parameters(**update)
            said = io.StringIO()  # sbatch's stderr, which submitit echoes: said once below, in one line on refusal
            try:
                with contextlib.redirect_stderr(said):
                    submitted = executor.map_array(self, *zip(*params))
            except submitit.core.utils.FailedJobError as e:  # sbatch refused the request
                asked = ", ".join(f"{k}={v}" for k, v in update.items() if k in ("nodes", "tasks_per_node", "gpus_per_node",
                                  "cpus_per_task", "mem_gb", "slurm_mem_per_cpu", "slurm_partition", "slurm_gres"))
                if not jobs:
                    _remove_refused(sweep_dir)
                reason = str(e).strip().splitlines()[-1].split("error: ")[-1] if str(e).strip() else type(e).__name__
                raise UserError(f"hydra/launcher=slurm: the cluster refused the job ({reason}); it asked for {asked}. "
                                "Change the trainer (devices, accelerator) or the hydra.launcher.* key, e.g. "
                                "hydra.launcher.partition, cpus_per_task or mem_per_cpu") from None
            sys.stderr.write(said.getvalue())
            jobs.update({p[2]: job for p, job in zip(params, submitted)})
        return self._follow(jobs, labels, points)

    def _follow(self, jobs: dict[int, Any], labels: dict[int, str], points: dict[int, list]) -> list:
        """Wait for the jobs, printing each one's state when it changes and its end (state, ``test/bpd``);
        the JobReturns in sweep order (a failed job's carries the reason, raised by Hydra's sweeper)."""
        from hydra.core.utils import JobReturn, JobStatus
        from omegaconf import OmegaConf

        returns: dict[int, Any] = {}
        seen: dict[int, str] = {}
        next_look = 0.0

        def state(job, force=False) -> str:
            if self.cluster != "slurm":
                return job.state
            if force:  # one sacct for every job submitted
                job.watcher.update()
            return job.watcher.get_state(job.job_id, mode="cache")

        while len(returns) < len(jobs):
            if time.monotonic() >= next_look:
                next_look = time.monotonic() + self.poll_s
                state(next(iter(jobs.values())), force=True)
            for idx, job in jobs.items():
                if idx in returns:
                    continue
                current = state(job)
                if not job.done():
                    if current != seen.get(idx) and current not in ("UNKNOWN", ""):
                        print(f"[slurm] job {job.job_id} ({labels[idx]}): {current}", flush=True)
                        seen[idx] = current
                    continue
                try:
                    ret = job.results()[0]  # rank 0's
                    value = ret.return_value if ret.status == JobStatus.COMPLETED else None
                except Exception:  # noqa: BLE001 - the job died outside the task: SLURM's state and its log say why
                    ret, value = None, None
                if isinstance(value, (int, float)):  # flowlab-train returns the test bits/dim
                    print(f"[slurm] job {job.job_id} ({labels[idx]}): COMPLETED test/bpd={value:.6f} "
                          f"run directory: {OmegaConf.select(ret.hydra_cfg, 'hydra.runtime.output_dir')}", flush=True)
                else:  # the task failed (raised, or recorded its error on the node) or the job died
                    error = getattr(ret, "_return_value", None)
                    why = str(error) if isinstance(error, BaseException) else _short_error(job)
                    current = state(job, force=True)
                    current = current if (current.split() or [""])[0] in _ENDED_BADLY else "FAILED"
                    print(f"[slurm] job {job.job_id} ({labels[idx]}): {current} {why}", flush=True)
                    if not isinstance(error, BaseException):
                        error = UserError(f"job {job.job_id} ({labels[idx]}) ended {current}: {why} (log: {job.paths.stderr})")
                    ret = JobReturn(overrides=points[idx], status=JobStatus.FAILED, _return_value=error)
                returns[idx] = ret
            if len(returns) < len(jobs):
                time.sleep(1)
        return [returns[i] for i in sorted(returns)]

    # ---- the job side (on the node, once per task) ---------------------------------------------------------
    def __call__(self, sweep_overrides, job_dir_key, job_num, job_id, singleton_state):
        set_requeue_allowed(int(self.params.get("max_num_timeout", 0) or 0))
        # SIGUSR1 is only ever noted (never the default action, which kills the process): during training the
        # Preemption callback acts on it at a step boundary; before or after training it changes nothing. Once the
        # task has returned it is ignored: Python's shutdown would put back the default action.
        sig = getattr(signal, "SIG" + self.requeue_signal)
        signal.signal(sig, note_signal)
        try:
            return super().__call__(sweep_overrides, job_dir_key, job_num, job_id, singleton_state)
        finally:
            signal.signal(sig, signal.SIG_IGN)
