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
    for classifiers) it trained on, summed over ranks; kept on device so no step waits for it.

    The counters travel in the checkpoint (`state_dict`), so a resumed run reports the whole
    training, not only the part after the resume (the time spent while the run was stopped is not
    counted)."""

    def __init__(self) -> None:
        self.start, self.seconds, self.tokens = 0.0, 0.0, torch.zeros((), dtype=torch.long)
        self.carried_seconds = 0.0  # fit time before the resume (from the checkpoint)

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start = time.perf_counter()

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if pl_module.last_step:  # empty: a skipped batch (distill.nonfinite_teacher=skip) trained nothing
            self.tokens = self.tokens.to(pl_module.device) + pl_module.last_step["token_count"]

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.seconds = self.carried_seconds + time.perf_counter() - self.start
        self.start = 0.0  # not running: a checkpoint written after this keeps `seconds`

    @override
    def state_dict(self) -> dict[str, Any]:
        if self.start:  # inside the fit
            seconds = self.carried_seconds + time.perf_counter() - self.start
        else:
            seconds = max(self.seconds, self.carried_seconds)
        return {"fit_seconds": seconds, "tokens": int(self.tokens)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.carried_seconds = float(state_dict.get("fit_seconds", 0.0))
        self.tokens = torch.tensor(int(state_dict.get("tokens", 0)), dtype=torch.long)

    def summary(self, world_size: int) -> dict[str, float]:
        tokens = int(self.tokens) * world_size
        seconds = max(self.seconds, self.carried_seconds)  # a resumed finished fit does not run the loop again
        return {"fit_seconds": seconds, "train_tokens": tokens, "tokens_per_second": tokens / max(seconds, 1e-9)}
