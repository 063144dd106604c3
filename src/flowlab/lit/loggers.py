"""A CSV logger that never deletes earlier metrics, and the W&B table that ends a sweep.

Lightning's CSVLogger removes an existing ``metrics.csv`` when it starts, so resuming a run in
its own directory would erase the metrics of the steps before the interruption. This one appends
to the file, keeping its columns (new columns rewrite the header with the old rows kept).
"""

from __future__ import annotations

import csv
import os

from lightning_fabric.loggers.logger import rank_zero_experiment
from pytorch_lightning.loggers import CSVLogger as _LightningCSVLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter

__all__ = ["CSVLogger", "WandbSweepTable"]

#: training images/s, by the first of these a run logged: Lightning's ThroughputMonitor over all processes (DDP),
#: per process (one process: the same), and the name runs logged before flowlab used ThroughputMonitor
TRAIN_SPEED_KEYS = ("train/samples_per_sec", "train/device/samples_per_sec", "train/images_per_s")


class _AppendingExperimentWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as f:
                header = next(csv.reader(f), [])
            self.metrics_keys = [k for k in header if k]

    def save(self) -> None:
        # The file is the truth about its columns: another copy of this logger may have written it since this
        # one read the header (ddp_spawn runs fit and test in fresh processes holding copies of the parent's).
        if self.metrics:
            self._check_log_dir_exists()
        super().save()


class CSVLogger(_LightningCSVLogger):
    """``pytorch_lightning.loggers.CSVLogger`` that appends to an existing ``metrics.csv``."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is not None:
            return self._experiment
        self._fs.makedirs(self.root_dir, exist_ok=True)
        self._experiment = _AppendingExperimentWriter(log_dir=self.log_dir)
        return self._experiment


# ---- the end of a sweep: one W&B Table with a row per job ---------------------------------------------
def _sweep_rows(sweep_dir) -> list[dict]:
    """One dict per job directory of a multirun (those with results.json or .hydra/config.yaml)."""
    import json
    import statistics
    from pathlib import Path

    import yaml

    rows = []
    for cfg_file in sorted(Path(sweep_dir).rglob(".hydra/config.yaml")):
        if "previous" in cfg_file.parts:
            continue
        job = cfg_file.parent.parent
        cfg = yaml.safe_load(cfg_file.read_text()) or {}
        res = json.loads((job / "results.json").read_text()) if (job / "results.json").is_file() else {}
        model = cfg.get("model") or {}
        target = str(model.get("_target_", "")).rsplit(".", 1)[-1]
        train_ips, sample_ips = [], None
        if (job / "metrics.csv").is_file():
            with open(job / "metrics.csv", newline="") as f:
                for r in csv.DictReader(f):
                    speed = next((r[k] for k in TRAIN_SPEED_KEYS if r.get(k)), None)
                    if speed:
                        train_ips.append(float(speed))
                    if r.get("sample/images_per_s"):
                        sample_ips = float(r["sample/images_per_s"])
        wandb_runs = sorted((job / "wandb").glob("*run-*")) if (job / "wandb").is_dir() else []
        samples = sorted((job / "samples").glob("*_T0.70.png")) or sorted((job / "samples").glob("*.png"))
        rows.append({
            "job": job.name, "model": target,
            "permutation": "realnvp" if target == "RealNVP" else (
                "nxn_lu" if model.get("permutation") == "nxn" and model.get("nxn_conv1x1") == "lu"
                else model.get("permutation")),
            "data": str((cfg.get("data") or {}).get("_target_", "")).rsplit(".", 1)[-1].replace("DataModule", ""),
            "seed": cfg.get("seed"), "test/bpd": res.get("test/bpd"), "params": res.get("params"),
            "steps": res.get("global_step"),
            "train/images_per_s": statistics.median(train_ips) if train_ips else None,
            "sample/images_per_s": sample_ips,
            "wandb_run_id": wandb_runs[-1].name.rsplit("-", 1)[-1] if wandb_runs else None,
            "samples_png": str(samples[-1]) if samples else None,
        })
    return rows


try:
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:  # pragma: no cover - hydra is a dependency
    _HydraCallback = object


class WandbSweepTable(_HydraCallback):
    """Hydra callback: when a multirun that logs to W&B ends, one more W&B run ``<run_name>/summary``
    (job_type ``sweep-summary``, in the sweep's group) logs ``sweep/runs``, a Table with one row per
    job (model, permutation, data, seed, test/bpd, params, images/s, the job's W&B run id and its
    T=0.7 samples). Jobs are read from their directories, so it works the same for the basic and the
    submitit launcher. Does nothing when the config has no ``logger.wandb`` or W&B is disabled.
    """

    def __init__(self, key: str = "sweep/runs"):
        self.key = key

    def on_multirun_end(self, config, **kwargs) -> None:
        from pathlib import Path

        from omegaconf import OmegaConf

        if OmegaConf.select(config, "logger.wandb", default=None) is None:
            return
        mode = str(OmegaConf.select(config, "logger.wandb.mode", default="offline"))
        if mode == "disabled":
            return
        try:
            self._log_table(config, mode, Path(str(config.hydra.sweep.dir)))
        except Exception as e:  # noqa: BLE001 - the jobs' results are on disk already; a summary failure is not fatal
            print(f"warning: could not log the sweep's W&B table: {type(e).__name__}: {e}", flush=True)

    def _log_table(self, config, mode: str, sweep_dir) -> None:
        from omegaconf import OmegaConf

        rows = _sweep_rows(sweep_dir)
        if not rows:
            return
        import wandb

        run_name = str(config.run_name)
        run = wandb.init(project=OmegaConf.select(config, "logger.wandb.project", default="flowlab"),
                         entity=OmegaConf.select(config, "logger.wandb.entity", default=None),
                         group=run_name, name=f"{run_name}/summary", job_type="sweep-summary", mode=mode,
                         dir=str(sweep_dir), tags=["sweep-summary"], reinit="create_new")
        try:
            columns = [k for k in rows[0] if k != "samples_png"] + ["samples"]
            table = wandb.Table(columns=columns)
            for r in rows:
                image = wandb.Image(r["samples_png"]) if r["samples_png"] else None
                table.add_data(*[r[k] for k in columns[:-1]], image)
            run.log({self.key: table})
            done = [r["test/bpd"] for r in rows if r["test/bpd"] is not None]
            run.summary["jobs"] = len(rows)
            run.summary["jobs_finished"] = len(done)
            if done:
                run.summary["best_test/bpd"] = min(done)
            folder = run.dir
        finally:
            run.finish()
        if mode == "offline":
            from pathlib import Path

            print(f"W&B offline sweep table: upload it (and each job's run: `wandb sync {sweep_dir}/*/wandb/offline-run-*`)"
                  f" with `wandb sync {Path(folder).parent}`", flush=True)
