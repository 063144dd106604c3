"""Callbacks the cluster tests add to the jobs they submit (``+callbacks.<name>._target_=tests.cluster.callbacks.<Class>``)."""

from __future__ import annotations

import time

import pytorch_lightning as pl


class SlowTest(pl.Callback):
    """Sleep after every test batch, so a test can signal a job while it evaluates."""

    def __init__(self, seconds: float = 1.0):
        self.seconds = float(seconds)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        time.sleep(self.seconds)


class SlowSteps(pl.Callback):
    """Sleep after every training step and write the step count to ``progress`` (rank 0), so a test can signal
    a job while it trains and see that a resumed job trains again."""

    def __init__(self, progress: str, seconds: float = 0.1):
        self.progress, self.seconds = progress, float(seconds)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.is_global_zero:
            with open(self.progress, "w") as f:
                f.write(str(trainer.global_step))
        time.sleep(self.seconds)
