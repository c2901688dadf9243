"""The TAID interpolation schedule: sets `loss_params["interpolation"]` (t) for `kd_lightning.losses.taid`."""

from __future__ import annotations

import math
from typing import Any

from lightning import Callback, LightningModule, Trainer
from typing_extensions import override

from kd_lightning.callbacks.common import progress, total_steps
from kd_lightning.interface import require_distillation_module


def sigmoid(x: float) -> float:
    """Logistic function without overflow for large |x|."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


class TAIDSchedule(Callback):
    """Adaptive interpolation t of TAID ("TAID: Temporally Adaptive Interpolated Distillation for
    Efficient Knowledge Transfer in Language Models", Shing et al., ICLR 2025).

    Before every training step `t` goes to `pl_module.loss_params["interpolation"]` and is logged
    as `train/taid_interpolation`. After the step, with ℓ the step's KD loss (mean over DDP ranks,
    so that every rank keeps the same t):

        first call: prev ← ℓ, t unchanged
        δ     = (prev − ℓ) / (prev + 1e-15)          relative improvement
        m     ← β·m + (1 − β)·δ
        Δ     = α · sigmoid(m) · (1 − t)
        t_lin = t_start + (t_end − t_start) · s/(S − 1)
        t     ← min(t_end, max(t_lin, t + Δ));  prev ← ℓ
        (disable_adaptive: t ← t_lin)

    `s` is the 0-based index of the step just finished and S = `trainer.max_steps`. The reference
    divides by S, so its floor never reaches t_end; dividing by S − 1 makes the update after the
    last step land exactly on t_end, while the first update (s = 0, floor = t_start) stays
    consistent with "the first call never changes t". The step after s trains at t ≥ t_lin(s).

    Args:
        t_start: initial t, in [0, 1) (0.4 in the reference CLI; 0.2 in two of its scripts).
        t_end: final t, in (0, 1], at least `t_start`.
        alpha: step size α of the adaptive increase, in [0, 1].
        beta: momentum β of the relative improvement, in [0, 1).
        disable_adaptive: follow the linear schedule only.
    """

    def __init__(self, t_start: float = 0.4, t_end: float = 1.0, alpha: float = 5e-4, beta: float = 0.99,
                 disable_adaptive: bool = False) -> None:
        if not 0.0 <= t_start < 1.0:
            raise ValueError(f"TAIDSchedule: t_start={t_start!r} must be in [0, 1)")
        if not 0.0 < t_end <= 1.0 or t_end < t_start:
            raise ValueError(f"TAIDSchedule: t_end={t_end!r} must be in (0, 1] and >= t_start={t_start!r}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"TAIDSchedule: alpha={alpha!r} must be in [0, 1]")
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"TAIDSchedule: beta={beta!r} must be in [0, 1)")
        self.t_start, self.t_end, self.alpha, self.beta = float(t_start), float(t_end), float(alpha), float(beta)
        self.disable_adaptive = bool(disable_adaptive)
        self.interpolation = self.t_start
        self.prev_loss = math.inf
        self.momentum = 0.0

    def linear(self, fraction: float) -> float:
        return (1.0 - fraction) * self.t_start + fraction * self.t_end  # exact at both ends

    def update(self, loss: float, fraction: float) -> float:
        """One step of the rule above; `fraction` = s/(S − 1), the progress of the finished step."""
        if self.disable_adaptive:
            self.interpolation = self.linear(fraction)
            return self.interpolation
        if math.isinf(self.prev_loss):
            self.prev_loss = loss
            return self.interpolation
        improvement = (self.prev_loss - loss) / (self.prev_loss + 1e-15)
        self.momentum = self.beta * self.momentum + (1.0 - self.beta) * improvement
        step = self.alpha * sigmoid(self.momentum) * (1.0 - self.interpolation)
        self.interpolation = min(self.t_end, max(self.linear(fraction), self.interpolation + step))
        self.prev_loss = loss
        return self.interpolation

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        module = require_distillation_module(pl_module, self)
        if len(module.teachers) == 0:
            raise ValueError("TAIDSchedule needs a teacher (and loss=taid): t interpolates towards the teacher")
        module.loss_params["interpolation"] = self.interpolation

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        pl_module.loss_params["interpolation"] = self.interpolation
        pl_module.log("train/taid_interpolation", self.interpolation, on_step=True, on_epoch=False)

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not pl_module.last_step:  # a skipped batch (distill.nonfinite_teacher=skip): no loss to follow
            return
        loss = pl_module.last_step["kd_loss"].detach().float().reshape(())
        loss = trainer.strategy.reduce(loss, reduce_op="mean")
        # global_step already counts this step; the finished step's index is one less.
        self.update(float(loss), progress(trainer.global_step - 1, total_steps(trainer)))
        pl_module.loss_params["interpolation"] = self.interpolation

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"interpolation": self.interpolation, "prev_loss": self.prev_loss, "momentum": self.momentum}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.interpolation = float(state_dict["interpolation"])
        self.prev_loss = float(state_dict["prev_loss"])
        self.momentum = float(state_dict["momentum"])

