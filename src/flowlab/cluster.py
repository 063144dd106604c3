"""Multi-process and cluster runs: the submitit launcher with SLURM requeue, and which DDP strategy works where.

How the pieces fit (see also README, "Clusters"):

- ``flowlab-train -m hydra/launcher=slurm trainer=ddp ...`` submits **one SLURM job per sweep point**
  (a job array for a sweep) through Hydra's submitit launcher. The job has ``nodes = trainer.num_nodes``
  and ``tasks_per_node = gpus_per_node = trainer.devices``; SLURM starts every DDP process and Lightning's
  ``SLURMEnvironment`` wires them together, so nothing is relaunched with the sweep's arguments.
- **Requeue** is Lightning's (``SLURMEnvironment(auto_requeue=True)``): SLURM sends SIGUSR1
  ``signal_delay_s`` seconds before the time limit (``--signal=USR1@<s>``, set by :class:`RequeueSubmititLauncher`);
  Lightning saves ``hpc_ckpt_<n>.ckpt`` in the run directory and calls ``scontrol requeue``. The
  requeued job runs the same pickled job with the same config, hence the same run directory, and
  ``flowlab-train`` resumes from the newest checkpoint there. ``max_num_timeout`` bounds the number of
  requeues (``SLURM_RESTART_COUNT``); after that many the job is no longer requeued.
- **Locally**, ``trainer=ddp`` (Lightning starts the other processes by running the same command again;
  Lightning passes ``hydra.run.dir`` so they join the parent's run directory) works for single runs,
  and ``trainer=ddp_cpu`` / ``trainer.strategy=ddp_spawn`` for single runs and multiruns. A local
  multirun with a relaunching strategy would make every child run the whole sweep; it is refused.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher as _HydraSlurmLauncher

from flowlab.errors import ConfigError, check_choice

__all__ = ["RequeueSubmititLauncher", "cluster_plugins", "check_strategy_for_multirun", "set_requeue_allowed", "REQUEUE_ENV"]

#: set on the node by :class:`RequeueSubmititLauncher`: "1" while requeues are left, "0" once max_num_timeout is used up
REQUEUE_ENV = "FLOWLAB_SLURM_AUTO_REQUEUE"

# strategies whose launcher starts the other local processes by running the script again (sys.argv)
_RELAUNCHING = ("ddp", "ddp_find_unused_parameters_false", "ddp_find_unused_parameters_true", "fsdp", "deepspeed")


def cluster_plugins() -> list:
    """Trainer plugins for the cluster this process runs on: under SLURM, Lightning's SLURMEnvironment with
    auto-requeue on SIGUSR1 (switched off once the launcher's max_num_timeout requeues are used up)."""
    from lightning_fabric.plugins.environments import SLURMEnvironment

    if not SLURMEnvironment.detect():
        return []
    auto = os.environ.get(REQUEUE_ENV, "1") != "0"
    return [SLURMEnvironment(auto_requeue=auto, requeue_signal=signal.SIGUSR1)]


def set_requeue_allowed(max_requeues: int) -> bool:
    """On a SLURM node: allow Lightning's auto-requeue while this job has been requeued fewer than
    ``max_requeues`` times (``SLURM_RESTART_COUNT``); the decision goes to :func:`cluster_plugins` through
    the environment. Returns it."""
    restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    allowed = restarts < int(max_requeues)
    os.environ[REQUEUE_ENV] = "1" if allowed else "0"
    return allowed


def _external_launch() -> bool:
    """True when something outside Lightning started every process (SLURM, torchrun, a Lightning child)."""
    from lightning_fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    return SLURMEnvironment.detect() or TorchElasticEnvironment.detect() or "LOCAL_RANK" in os.environ


def check_strategy_for_multirun(trainer_cfg: Mapping, multirun: bool) -> None:
    """ConfigError for a local multirun with a strategy that relaunches ``sys.argv`` (each child would run
    the whole sweep again); ``ddp_spawn`` or the SLURM launcher is what works."""
    if not multirun or _external_launch():
        return
    strategy = trainer_cfg.get("strategy", "auto")
    name = strategy if isinstance(strategy, str) else str(getattr(strategy, "get", lambda *_: "")("_target_", ""))
    devices = trainer_cfg.get("devices", 1)
    nodes = int(trainer_cfg.get("num_nodes", 1) or 1)
    many = nodes > 1 or devices in (-1, "auto") or (isinstance(devices, int) and devices > 1) or \
        (isinstance(devices, (list, tuple)) and len(devices) > 1) or (isinstance(devices, str) and devices not in ("1",))
    if many and str(name).lower() in _RELAUNCHING:
        raise ConfigError(
            f"trainer.strategy={name} with {devices} devices cannot run inside a local multirun (-m): Lightning "
            "starts its other processes by running the command again, and each would run the whole sweep. "
            "Use trainer.strategy=ddp_spawn (e.g. trainer=ddp_cpu) for a local sweep, or "
            "hydra/launcher=slurm (one SLURM job per sweep point, SLURM starts the processes)")


class RequeueSubmititLauncher(_HydraSlurmLauncher):
    """Hydra's submitit SLURM launcher with flowlab's requeue wiring.

    Extra parameters (everything else is hydra-submitit-launcher's ``SlurmQueueConf``):
        cluster: ``slurm`` (default), or ``local`` / ``debug`` to run the same jobs through submitit on this
            machine (subprocesses / in-process), e.g. to try a sweep before sending it to the cluster.
        requeue_signal: the signal SLURM sends ``signal_delay_s`` seconds before the time limit; Lightning's
            SLURMEnvironment listens to SIGUSR1.
    """

    def __init__(self, cluster: str = "slurm", requeue_signal: str = "USR1", **params: Any) -> None:
        check_choice("hydra.launcher.cluster", cluster, ("slurm", "local", "debug"))
        name = str(requeue_signal).upper().removeprefix("SIG")
        if not hasattr(signal, "SIG" + name):
            raise ConfigError(f"hydra.launcher.requeue_signal={requeue_signal!r} is not a signal name (e.g. USR1)")
        super().__init__(**params)
        self.cluster = cluster
        self.requeue_signal = name

    # ---- the submitting side --------------------------------------------------------------------------
    def executor_parameters(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """``(init parameters, update_parameters)`` of the submitit ``AutoExecutor``."""
        from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
        from omegaconf import OmegaConf

        params = dict(self.params)
        init = {"folder": params.pop("submitit_folder"), "slurm_max_num_timeout": int(params.pop("max_num_timeout", 0))}
        extra = dict(params.pop("additional_parameters", None) or {})
        delay = int(params.get("signal_delay_s", 120))
        # sbatch --signal: submitit would send its own preemption signal (USR2); Lightning listens to USR1
        extra.setdefault("signal", f"{self.requeue_signal}@{delay}")
        params["additional_parameters"] = extra
        generic = set(OmegaConf.structured(BaseQueueConf).keys())
        update = {k if k in generic else f"slurm_{k}": v for k, v in params.items() if v is not None}
        return init, update

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int):
        import submitit
        from hydra.core.singleton import Singleton
        from hydra.core.utils import filter_overrides

        assert self.config is not None
        init, update = self.executor_parameters()
        executor = submitit.AutoExecutor(cluster=self.cluster, **init)
        executor.update_parameters(**update)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))  # resolves ${run_name} (and caches ${now:...})
        sweep_dir.mkdir(parents=True, exist_ok=True)
        import logging

        log = logging.getLogger(__name__)
        log.info(f"submitit '{self.cluster}' sweep output dir: {sweep_dir}")
        job_params = []
        for idx, overrides in enumerate(job_overrides):
            idx = initial_job_idx + idx
            log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
            job_params.append((list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}", Singleton.get_state()))
        jobs = executor.map_array(self, *zip(*job_params))
        return [j.results()[0] for j in jobs]

    # ---- the job side (on the node, once per task) ---------------------------------------------------------
    def __call__(self, sweep_overrides, job_dir_key, job_num, job_id, singleton_state):
        set_requeue_allowed(int(self.params.get("max_num_timeout", 0) or 0))
        # Lightning registers its requeue handler only where no other handler sits; submitit installs one
        # for its own preemption signal (USR2 unless SUBMITIT_PREEMPT_SIGNAL says otherwise).
        sig = getattr(signal, "SIG" + self.requeue_signal)
        if signal.getsignal(sig) not in (None, signal.SIG_DFL):
            signal.signal(sig, signal.SIG_DFL)
        return super().__call__(sweep_overrides, job_dir_key, job_num, job_id, singleton_state)
