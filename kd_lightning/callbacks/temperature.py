"""Distillation-temperature schedules: callbacks that set `pl_module.kd_temperature` every step.

A constant temperature needs no callback (`temperature=constant`). The module logs
`train/temperature` inside its training step, so the logged value is always the one that step used:
schedules set the value in `on_train_batch_start`; DTS computes the next value from the finished
step's losses in `on_train_batch_end` (batch n uses the T produced after batch n-1, as in the
reference vision trainer).

Progress is measured in optimizer steps over `trainer.max_steps` (or the estimated number of steps
when only epochs are given), not in epochs: LM runs are often a single epoch.
"""

from __future__ import annotations

import math
from typing import Any

from lightning import Callback, LightningModule, Trainer
from typing_extensions import override

from kd_lightning.callbacks.common import progress, total_steps
from kd_lightning.interface import require_distillation_module


def _check_positive(owner: str, **values: float) -> None:
    for key, value in values.items():
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"{owner}: {key}={value!r} must be a positive number")


class _StepSchedule(Callback):
    """T as a pure function of training progress, set before every step."""

    def __init__(self, start: float, end: float) -> None:
        _check_positive(type(self).__name__, start=start, end=end)
        self.start, self.end = float(start), float(end)

    def temperature_at(self, fraction: float) -> float:
        raise NotImplementedError

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        require_distillation_module(pl_module, self)

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        pl_module.kd_temperature = self.temperature_at(progress(trainer.global_step, total_steps(trainer)))


class LinearTemperature(_StepSchedule):
    """Linear schedule `T(s) = start + (end − start)·s/(S − 1)`: exactly `start` at the first step
    and `end` at the last of S = `trainer.max_steps` steps."""

    @override
    def temperature_at(self, fraction: float) -> float:
        return (1.0 - fraction) * self.start + fraction * self.end  # exact at both ends


class CosineTemperature(_StepSchedule):
    """Cosine schedule `T(s) = end + (start − end)·½(1 + cos(π·s/(S − 1)))`: `start` at the first
    step, `end` at the last, flat at both ends."""

    @override
    def temperature_at(self, fraction: float) -> float:
        return self.end + (self.start - self.end) * 0.5 * (1.0 + math.cos(math.pi * fraction))


SCALE_RULES = ("smooth", "legacy", "none")


def dts_scale(gap: float, rule: str) -> float:
    """Loss-gap factor of DTS; `gap = CE_teacher − CE_student` (usually negative).

    - "smooth" (default, our design): `1 + g/(1 + g)` with `g = max(0, −gap)`, in [1, 2);
      increasing in how far the student trails the teacher.
    - "legacy": the reference code's rule, `a = gap/(gap + 1)`; used only when `a > 1`
      (gap < −1), and replaced by 1.35 when `a > 2` (−2 < gap < −1); gap = −1 exactly (a
      division by zero in the reference) counts as "no adjustment". Not monotone in the gap.
    - "none": no adjustment (pure cosine decay).
    """
    if rule == "smooth":
        behind = max(0.0, -gap)
        return 1.0 + behind / (1.0 + behind)
    if rule == "legacy":
        if gap == -1.0:
            return 1.0
        a = gap / (gap + 1.0)
        if a > 1.0:
            return 1.35 if a > 2.0 else a
        return 1.0
    return 1.0


class DynamicTemperature(Callback):
    """DTS, the Dynamic Temperature Scheduler ("Dynamic Temperature Scheduler for Knowledge
    Distillation", Islam et al. 2025). After every training batch:

        c        = ½·(1 + cos(κ·π·progress))                  progress over optimizer steps
        T_target = clamp(initial · c · scale(CE_teacher − CE_student), t_min, t_max)
        T        ← momentum·T + (1 − momentum)·T_target        (momentum 0.9 in the reference)

    The CEs are the batch means against the ground truth (`last_step["teacher_ce"]` averaged
    over teachers, `last_step["student_ce"]`), so the next batch uses the new T.

    `scale_rule` defaults to "smooth" (see `dts_scale`): the reference rule ("legacy", kept for
    parity) is not monotone in the gap (a student 1.5 nats behind gets ×1.35, 2 nats ×2, 3 nats
    ×1.5) and does nothing while the student is less than 1 nat behind, whereas DTS's stated idea
    is a higher temperature (softer targets) the larger the teacher–student gap. "smooth" keeps
    that idea, is continuous and increasing in the gap, and is bounded in [1, 2).

    Args:
        initial: T0, the starting temperature and the scale of the cosine decay.
        t_min, t_max: bounds of the target (T stays within [min(T0, t_min), max(T0, t_max)]).
        curve_shape: κ in the cosine (1: decays to 0 at the end of training).
        momentum: EMA factor of the update (0.9 in the reference).
        scale_rule: "smooth" (default), "legacy" (the reference code) or "none".

    The reference's defaults are initial 4, t_min 2, t_max 4 (initial 2, t_min 1, t_max 3 for
    small students). With t_max = initial the gap scale can only slow the decay; give t_max room
    above initial to let it raise T. Works for LMs and classifiers; needs at least one teacher.
    """

    def __init__(self, initial: float = 4.0, t_min: float = 2.0, t_max: float = 4.0, curve_shape: float = 1.0,
                 momentum: float = 0.9, scale_rule: str = "smooth") -> None:
        _check_positive("DynamicTemperature", initial=initial, t_min=t_min, t_max=t_max, curve_shape=curve_shape)
        if t_min > t_max:
            raise ValueError(f"DynamicTemperature: t_min={t_min} must not exceed t_max={t_max}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"DynamicTemperature: momentum={momentum!r} must be in [0, 1)")
        if scale_rule not in SCALE_RULES:
            raise ValueError(f"DynamicTemperature: scale_rule={scale_rule!r} must be one of {SCALE_RULES}")
        self.initial, self.t_min, self.t_max = float(initial), float(t_min), float(t_max)
        self.curve_shape, self.momentum, self.scale_rule = float(curve_shape), float(momentum), scale_rule
        self.temperature = self.initial
        self.last_target = self.initial

    def target(self, fraction: float, gap: float) -> float:
        """The clamped target temperature at training progress `fraction` for CE gap `gap`."""
        cosine = 0.5 * (1.0 + math.cos(self.curve_shape * math.pi * fraction))
        return min(self.t_max, max(self.t_min, self.initial * cosine * dts_scale(gap, self.scale_rule)))

    def update(self, fraction: float, gap: float) -> float:
        self.last_target = self.target(fraction, gap)
        self.temperature = self.momentum * self.temperature + (1.0 - self.momentum) * self.last_target
        return self.temperature

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        module = require_distillation_module(pl_module, self)
        if len(module.teachers) == 0:
            raise ValueError("DynamicTemperature needs a teacher: it adapts T to the teacher-student CE gap")

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        pl_module.kd_temperature = self.temperature  # also re-applies a restored T after resuming

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        stats = pl_module.last_step
        if not stats:  # a skipped batch (distill.nonfinite_teacher=skip): no CEs to compare
            return
        gap = float(stats["teacher_ce"].float().mean()) - float(stats["student_ce"])
        # trainer.global_step already counts this step: it is the index of the step that uses T.
        self.update(progress(trainer.global_step, total_steps(trainer)), gap)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "last_target": self.last_target}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.temperature = float(state_dict["temperature"])
        self.last_target = float(state_dict.get("last_target", self.temperature))
