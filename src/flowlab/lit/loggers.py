"""A CSV logger that appends to an existing ``metrics.csv`` (Lightning's deletes it, so a resumed run would lose its
earlier metrics), and the W&B table that ends a sweep."""

from __future__ import annotations

import csv
import json
import os
import statistics
from pathlib import Path

import yaml
from hydra.experimental.callback import Callback as HydraCallback
from lightning_fabric.loggers.logger import rank_zero_experiment
from omegaconf import OmegaConf
from pytorch_lightning.loggers import CSVLogger as _LightningCSVLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter

from flowlab.lit.module import bpd_name_of

#: training images/s: ThroughputMonitor's over all processes, per process, and the name older runs logged
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
    """``pytorch_lightning.loggers.CSVLogger`` that appends to ``metrics.csv`` (new columns rewrite the header)."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingExperimentWriter(log_dir=self.log_dir)
        return self._experiment


def _sweep_rows(sweep_dir) -> list[dict]:
    """One dict per job directory of a multirun (those with .hydra/config.yaml)."""
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
        wandb_runs = sorted((job / "wandb").glob("*run-*"))
        samples = sorted((job / "samples").glob("*_T0.70.png")) or sorted((job / "samples").glob("*.png"))
        rows.append({
            "job": job.name, "model": target,
            "permutation": "realnvp" if target == "RealNVP" else (
                "nxn_lu" if model.get("permutation") == "nxn" and model.get("nxn_conv1x1") == "lu"
                else model.get("permutation")),
            "data": str((cfg.get("data") or {}).get("_target_", "")).rsplit(".", 1)[-1].replace("DataModule", ""),
            "seed": cfg.get("seed"), "test/bpd": res.get(f"test/{bpd_name_of(model)}"), "params": res.get("params"),
            "steps": res.get("global_step"),
            "train/images_per_s": statistics.median(train_ips) if train_ips else None,
            "sample/images_per_s": sample_ips,
            "wandb_run_id": wandb_runs[-1].name.rsplit("-", 1)[-1] if wandb_runs else None,
            "samples_png": str(samples[-1]) if samples else None,
        })
    return rows


class WandbSweepTable(HydraCallback):
    """Hydra callback: at the end of a multirun with W&B, a W&B run ``<run_name>/summary`` (job_type ``sweep-summary``)
    logs ``sweep/runs``, a Table with a row per job directory (model, permutation, data, seed, test bits/dim, params,
    images/s, W&B run id, T=0.7 samples)."""

    def on_multirun_end(self, config, **kwargs) -> None:
        mode = str(OmegaConf.select(config, "logger.wandb.mode", default="offline"))
        if OmegaConf.select(config, "logger.wandb", default=None) is None or mode == "disabled":
            return
        sweep_dir = Path(str(config.hydra.sweep.dir))
        try:
            rows = _sweep_rows(sweep_dir)
            if rows:
                self._log_table(rows, config, mode, sweep_dir)
        except Exception as e:  # noqa: BLE001 - the jobs' results are on disk already; a summary failure is not fatal
            print(f"warning: could not log the sweep's W&B table: {type(e).__name__}: {e}", flush=True)

    @staticmethod
    def _log_table(rows: list[dict], config, mode: str, sweep_dir: Path) -> None:
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
                table.add_data(*[r[k] for k in columns[:-1]], wandb.Image(r["samples_png"]) if r["samples_png"] else None)
            done = [r["test/bpd"] for r in rows if r["test/bpd"] is not None]
            run.log({"sweep/runs": table})
            run.summary.update({"jobs": len(rows), "jobs_finished": len(done)})
            if done:
                run.summary["best_test/bpd"] = min(done)
            folder = run.dir
        finally:
            run.finish()
        if mode == "offline":
            print(f"W&B offline sweep table: upload it (and each job's run: `wandb sync {sweep_dir}/*/wandb/offline-run-*`)"
                  f" with `wandb sync {Path(folder).parent}`", flush=True)
