"""Helpers shared by several callbacks (callbacks never import each other: what two need lives here)."""

from __future__ import annotations

import math

from lightning import Trainer


def total_steps(trainer: Trainer) -> int:
    """Optimizer steps the run will take: `max_steps`, else Lightning's estimate from epochs."""
    max_steps = int(getattr(trainer, "max_steps", -1) or -1)
    if max_steps > 0:
        return max_steps
    estimated = trainer.estimated_stepping_batches
    if not math.isfinite(estimated) or estimated <= 0:
        raise ValueError("a schedule needs a finite run length: set trainer.max_steps or trainer.max_epochs")
    return int(estimated)


def progress(step: int, total: int) -> float:
    """Fraction of training done at 0-based `step` of `total`: 0 at the first step, 1 at the last."""
    return min(1.0, max(0.0, step / max(total - 1, 1)))
