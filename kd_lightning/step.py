"""What a training step hands a KD path (`StepInputs`) and what the path hands back (`StepTerms`).

A path (`kd_lightning.kd_paths`) reads values, never the LightningModule: `DistillationModule`
builds a `StepInputs` every step from its current settings (what the callbacks set: temperature,
loss parameters, teacher weights or a weighting function), and a test can build one by hand.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from kd_lightning.infra.sharding import reshard_frozen
from kd_lightning.interface import TeacherWeightFn
from kd_lightning.tasks import Task

LossFn = Callable[..., Tensor]


class StepTerms(NamedTuple):
    """What a KD path computes for one batch (counted positions only)."""

    ce_sum: Tensor | None  # summed student token CE with graph; None when the CE is not in the loss (no CE graph)
    student_token_ce: Tensor  # [M] detached statistics
    kd: Tensor | None  # scalar token-mean divergence (no T²), with graph; None without teachers
    teacher_token_ce: Tensor | None  # [K, M] detached, None when the path has no teacher logits
    teacher_weights: Tensor | None  # [K] batch-mean weight of each teacher entry, detached
    teacher_names: list[str]  # names of the weighted entries, for logging
    logs: dict[str, float] | None = None  # extra per-step metrics of the path (`train/<key>`)


@dataclass(frozen=True)
class StepInputs:
    """One batch and the settings of this step, as a KD path reads them.

    `loss_fn` has this step's `loss_params` bound (e.g. TAID's interpolation); `ce_in_loss` is
    `ce_weight != 0` (else the student CE is a statistic only and builds no graph); `kd_temperature`
    divides both logits. Weights, temperature² and the token share are applied by the module."""

    batch: dict[str, Tensor]
    labels: Tensor  # aligned labels: [B, L-1] for a causal LM, [B] for a classifier
    mask: Tensor  # bool, like `labels`: the counted positions
    task: Task  # `kd_lightning.tasks` adapter: logits, alignment, counted rows
    student: nn.Module
    teachers: Mapping[str, nn.Module]  # frozen
    loss_fn: LossFn | None
    kd_temperature: float
    ce_in_loss: bool
    teacher_weights: Tensor  # [K] static weights, summing to 1
    teacher_weight_fn: TeacherWeightFn | None = None
    global_step: int = 0  # for messages only

    @property
    def token_count(self) -> Tensor:
        """The batch's counted tokens: the normaliser of its token means."""
        return self.mask.sum()

    def student_logits(self) -> Tensor:
        """The student's unaligned logits of the batch (with graph)."""
        return self.task.logits(self.student, self.batch)

    def teacher_logits(self, batch: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """Every teacher's unaligned logits of `batch` (default: this step's), no grad."""
        return teacher_logits(self.task, self.teachers, self.batch if batch is None else batch)


def step_statistics(terms: StepTerms, ce: Tensor, count: Tensor) -> dict[str, Tensor]:
    """The module's `last_step` (see `kd_lightning.interface`): detached statistics of the batch,
    `ce` its student token-mean CE and `count` its counted tokens."""
    stats: dict[str, Tensor] = {"student_ce": ce.detach(), "token_count": count.detach(),
                                "student_token_ce": terms.student_token_ce.detach()}
    if terms.kd is not None:
        stats.update(kd_loss=terms.kd.detach(), teacher_weights=terms.teacher_weights)
    if terms.teacher_token_ce is not None:
        stats.update(teacher_token_ce=terms.teacher_token_ce,
                     teacher_ce=terms.teacher_token_ce.mean(-1) if count > 0 else terms.teacher_token_ce.sum(-1))
    return stats


def bind_loss(loss_fn: LossFn | None, loss_params: Mapping[str, Any]) -> LossFn | None:
    """The loss with the parameters callbacks set this step (`loss_params`)."""
    return functools.partial(loss_fn, **loss_params) if loss_fn is not None and loss_params else loss_fn


@torch.no_grad()
def teacher_logits(task: Task, teachers: Mapping[str, nn.Module], batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """Logits of every teacher. A stochastic teacher with `num_samples = M > 1` (e.g. MoE knowledge
    augmentation) is run M times and contributes M entries `name/sample<r>`, each with 1/M of the
    teacher's weight (`expand_teacher_weights`). A sharded teacher is resharded after its passes."""
    out: dict[str, Tensor] = {}
    for name, teacher in teachers.items():
        draws = int(getattr(teacher, "num_samples", 1))
        for r in range(draws):
            out[name if draws == 1 else f"{name}/sample{r}"] = task.logits(teacher, batch)
        reshard_frozen(teacher)
    return out


def expand_teacher_weights(teachers: Mapping[str, nn.Module], weights: Tensor) -> Tensor:
    """Per-teacher weights [..., K] -> per-entry weights of `teacher_logits` (samples split a
    teacher's weight equally)."""
    draws = [int(getattr(t, "num_samples", 1)) for t in teachers.values()]
    if all(d == 1 for d in draws):
        return weights
    repeats = torch.tensor(draws, device=weights.device)
    return torch.repeat_interleave(weights / repeats.to(weights.dtype), repeats, dim=-1)
