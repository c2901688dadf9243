"""The small interface between `DistillationModule` and the callbacks that change it over time.

Callbacks (temperature schedules, TAID, multi-teacher weighting, SAR, data generation) talk to the
module only through these attributes and methods, check them in `setup` with
`require_distillation_module`, and never reach into each other. The module never imports a callback.

Attributes a callback may read and write:
- `kd_temperature: float` — the distillation temperature T used for the next step (both logits / T,
  the KD term multiplied by T^2).
- `loss_params: dict[str, Any]` — extra keyword arguments passed to the loss function on every
  step (e.g. TAID's `interpolation`).
- `teacher_weights: torch.Tensor` — static per-teacher weights, shape [K], summing to 1.
- `teacher_weight_fn: Callable | None` — when set, called every step as
  `fn(teacher_logits: dict[str, Tensor], student_logits: Tensor, labels: Tensor, mask: Tensor)`
  with aligned logits; returns weights [K] or per-example [B, K] (each row sums to 1). Replaces
  `teacher_weights` for that step. K may be the number of teachers or the number of entries of
  `teacher_logits` (they differ only for stochastic teachers, see below).

Stochastic teachers: a teacher module with an integer attribute `num_samples = M > 1` (MoE
knowledge augmentation) is run M times per step; `teacher_logits` then holds M entries
`name/sample<r>` sharing that teacher's weight equally. With `teacher_combine="losses"` the KD term
is the mean divergence over the draws; with "mixture" it is the divergence to their average.

Class attributes a callback declares when it changes what the teacher computes (read by
`kd_lightning.teachers.teacher_outputs`, which then runs the teacher every step instead of reusing stored
outputs, `teacher_outputs.reuse`): `modifies_teacher = True` (it trains part of a teacher, SAR) and
`generates_inputs = True` (it feeds the teacher sequences that are not in the dataset, on-policy
generation and DistiLLM replay). A teacher module whose every pass is a new draw declares
`stochastic = True` (MoE knowledge augmentation).

Attributes a callback may read:
- `student: nn.Module`, `teachers: nn.ModuleDict` (frozen; a callback that trains part of a teacher,
  like SAR's router, owns those parameters and their optimizer, and declares them with
  `train_teacher_parameters`).
- `last_step: dict[str, Tensor]` — detached statistics of the last training batch: `student_ce`
  (scalar), `teacher_ce` [K], `kd_loss` (scalar), `token_count` (scalar), `student_token_ce` [N] and
  `teacher_token_ce` [K, N] over the counted positions, `teacher_weights` [K] (batch mean). Empty
  when the batch was skipped (`distill.nonfinite_teacher=skip`): a callback then skips it too.
- `task: str` — "causal_lm" or "classification"; `adapter` — its `kd_lightning.tasks` adapter
  (logits, alignment, label mask, `IGNORE_INDEX`).

Methods:
- `student_logits(batch) -> Tensor` and `teacher_logits(batch) -> dict[str, Tensor]` (no grad),
  both unshifted model outputs.
- `align(logits, labels) -> (logits, labels)` — the causal shift for LMs, identity for classifiers.
- `train_teacher_parameters(teacher_name, parameters)` — a callback that trains part of a frozen
  teacher (SAR) declares those parameters: they get gradients and are kept in checkpoints.

Batches are dicts (LM: `input_ids`, `attention_mask`, `labels` with -100 (`IGNORE_INDEX`) = ignored, `prompt_lengths`,
and `index`, the training sample's position in the dataset, used by offline teacher targets); a
callback may replace entries in place in `on_train_batch_start` (on-policy generation swaps
`input_ids`/`labels`/`attention_mask`).
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, runtime_checkable

import torch
from torch import nn

TeacherWeightFn = Callable[[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@runtime_checkable
class DistillationHost(Protocol):
    kd_temperature: float
    loss_params: dict[str, Any]
    teacher_weights: torch.Tensor
    teacher_weight_fn: TeacherWeightFn | None
    student: nn.Module
    teachers: nn.ModuleDict
    last_step: dict[str, torch.Tensor]
    task: str

    def student_logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor: ...

    def teacher_logits(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...

    def align(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def train_teacher_parameters(self, teacher_name: str, parameters: Any) -> None: ...


def require_distillation_module(module: Any, callback: object) -> DistillationHost:
    """Fail clearly when a callback is attached to a module that does not offer the interface."""
    missing = [name for name in DistillationHost.__annotations__ if not hasattr(module, name)]
    missing += [m for m in ("student_logits", "teacher_logits", "align", "train_teacher_parameters") if not hasattr(module, m)]
    if missing:
        raise TypeError(
            f"{type(callback).__name__} needs a kd_lightning DistillationModule; "
            f"{type(module).__name__} lacks: {', '.join(missing)}"
        )
    return module
