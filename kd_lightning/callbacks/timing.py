"""Wall time and throughput of a fit, for the end-of-run summary and sweep reports."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override


class FitTimer(Callback):
    """Wall time of `Trainer.fit`'s loop (validation included) and the supervised tokens (examples
    for classifiers) it trained on, summed over ranks; kept on device so no step waits for it."""

    def __init__(self) -> None:
        self.start, self.seconds, self.tokens = 0.0, 0.0, torch.zeros((), dtype=torch.long)

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start = time.perf_counter()

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if pl_module.last_step:  # empty: a skipped batch (distill.nonfinite_teacher=skip) trained nothing
            self.tokens = self.tokens.to(pl_module.device) + pl_module.last_step["token_count"]

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.seconds = time.perf_counter() - self.start

    def summary(self, world_size: int) -> dict[str, float]:
        tokens = int(self.tokens) * world_size
        return {"fit_seconds": self.seconds, "train_tokens": tokens, "tokens_per_second": tokens / max(self.seconds, 1e-9)}
