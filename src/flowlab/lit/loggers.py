"""A CSV logger that never deletes earlier metrics.

Lightning's CSVLogger removes an existing ``metrics.csv`` when it starts, so resuming a run in
its own directory would erase the metrics of the steps before the interruption. This one appends
to the file, keeping its columns (new columns rewrite the header with the old rows kept).
"""

from __future__ import annotations

import csv
import os

from pytorch_lightning.loggers import CSVLogger as _LightningCSVLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from lightning_fabric.loggers.logger import rank_zero_experiment

__all__ = ["CSVLogger"]


class _AppendingExperimentWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as f:
                header = next(csv.reader(f), [])
            self.metrics_keys = [k for k in header if k]


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
