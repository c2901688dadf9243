"""`DistillationModule`: one student, zero or more frozen teachers, one training step.

    loss = kd_weight * T^2 * D(student / T, teacher / T) + ce_weight * CE(student, labels)

With no teacher it is plain cross-entropy training (used for the teacher's own pre-training and for
the no-KD baseline). Everything that changes over time is a callback talking to the attributes
documented in `kd_lightning.interface`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from lightning import LightningModule
from torch import Tensor, nn
from torch.optim import Optimizer
from torchmetrics import MeanMetric

from kd_lightning.interface import TeacherWeightFn
from kd_lightning.lean import chunked_token_ce, hidden_and_head
from kd_lightning.losses.common import all_finite
from kd_lightning.losses.chunked import chunked_distill_loss
from kd_lightning.losses.sparse import sparse_kl

LossFn = Callable[..., Tensor]


class DistillationModule(LightningModule):
    """Distil `student` from frozen `teachers` with the divergence `loss_fn`.

    Args:
        student: trainable model; a `transformers` causal LM (batches with `input_ids`, `labels`) or
            any classifier `nn.Module` mapping `inputs` [B, F] to logits [B, C].
        teachers: a model, or a name -> model mapping for several teachers. Frozen here: no grad,
            eval mode, not in the optimizer, not in checkpoints (unless `save_teachers`). A teacher
            with `sparse_targets = True` (`teacher=cached`) is a table of offline sparse targets: it
            must be the only teacher, and the KD term is `sparse_kl` against `teacher.targets(batch)`
            (stored for the aligned positions), whatever `loss_fn` is.
        loss_fn: a pure divergence `fn(student_logits, teacher_logits, mask, *, temperature, ...)`
            from `kd_lightning.losses` (a `functools.partial` binds its parameters).
        optimizer: `Callable[..., Optimizer]` called with the trainable parameters.
        lr_scheduler: optional `Callable[..., LRScheduler]` called with the optimizer and
            `num_training_steps=`; stepped every optimizer step.
        kd_weight, ce_weight: weights of the KD and the ground-truth CE terms.
        kd_temperature: initial distillation temperature T (callbacks may change it).
        teacher_weights: static weights of several teachers (default equal).
        teacher_combine: "mixture" distils from the weighted mixture of the teachers' distributions
            (log-space); "losses" sums the per-teacher divergences with the weights.
        chunk_size: if set, the KD term runs through the memory-lean chunked path (causal LMs).
        save_teachers: keep frozen teacher weights in checkpoints (off: they are rebuilt from config).
        nonfinite_teacher: what to do when a teacher's logits hold NaN or +inf at a counted position
            ("error": stop naming the step; "skip": warn and skip the optimizer step). -inf logits
            (tokens the teacher rules out) are legitimate and handled by the losses.
    """

    def __init__(
        self,
        student: nn.Module,
        teachers: nn.Module | Mapping[str, nn.Module] | None = None,
        loss_fn: LossFn | None = None,
        *,
        optimizer: Callable[..., Optimizer] = partial(torch.optim.AdamW, lr=1e-3),
        lr_scheduler: Callable[..., Any] | None = None,
        kd_weight: float = 1.0,
        ce_weight: float = 0.0,
        kd_temperature: float = 1.0,
        teacher_weights: list[float] | None = None,
        teacher_combine: str = "mixture",
        chunk_size: int | None = None,
        save_teachers: bool = False,
        nonfinite_teacher: str = "error",
    ) -> None:
        super().__init__()
        if nonfinite_teacher not in ("error", "skip"):
            raise ValueError(f"nonfinite_teacher must be 'error' or 'skip', got {nonfinite_teacher!r}")
        self.nonfinite_teacher = nonfinite_teacher
        if teacher_combine not in ("mixture", "losses"):
            raise ValueError(f"teacher_combine must be 'mixture' or 'losses', got {teacher_combine!r}")
        if kd_temperature <= 0:
            raise ValueError(f"kd_temperature must be > 0, got {kd_temperature}")
        self.student = student
        if isinstance(teachers, nn.Module) and not isinstance(teachers, nn.ModuleDict):
            teachers = {"teacher": teachers}
        self.teachers = nn.ModuleDict(dict(teachers or {}))
        for teacher in self.teachers.values():
            teacher.requires_grad_(False)
            teacher.eval()
        sparse = [n for n, t in self.teachers.items() if getattr(t, "sparse_targets", False)]
        if sparse and len(self.teachers) > 1:
            raise ValueError(f"a teacher of offline sparse targets ({sparse[0]}) must be the only teacher")
        self.sparse_teacher_name = sparse[0] if sparse else None
        if self.teachers and loss_fn is None and self.sparse_teacher is None:
            raise ValueError("a loss_fn is required when teachers are given")
        if kd_weight > 0 and not self.teachers and ce_weight == 0:
            raise ValueError("nothing to train: no teacher and ce_weight=0")
        self.loss_fn = loss_fn
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        self.kd_weight = float(kd_weight) if self.teachers else 0.0
        self.ce_weight = float(ce_weight)
        self.kd_temperature = float(kd_temperature)
        self.teacher_combine = teacher_combine
        self.chunk_size = chunk_size
        self.save_teachers = save_teachers
        self.task = "classification" if not hasattr(student, "generate") else "causal_lm"
        k = max(len(self.teachers), 1)
        weights = torch.full((k,), 1.0 / k) if teacher_weights is None else torch.tensor(teacher_weights, dtype=torch.float32)
        if weights.numel() != k or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(f"teacher_weights must be {k} non-negative numbers, got {teacher_weights}")
        self.teacher_weights = weights / weights.sum()
        self.teacher_weight_fn: TeacherWeightFn | None = None
        self.loss_params: dict[str, Any] = {}
        self.last_step: dict[str, Tensor] = {}
        self.extra_trainable = nn.ModuleDict()  # e.g. feature projections owned by a loss
        self.save_hyperparameters(
            {"kd_weight": kd_weight, "ce_weight": ce_weight, "kd_temperature": kd_temperature,
             "teacher_names": list(self.teachers), "teacher_combine": teacher_combine, "chunk_size": chunk_size}
        )
        self.val_loss = MeanMetric()
        self.val_agreement = MeanMetric()
        self.val_teacher_loss = MeanMetric()

    @property
    def sparse_teacher(self) -> nn.Module | None:
        """The teacher of offline sparse targets, if that is the teacher (`teacher=cached`)."""
        return self.teachers[self.sparse_teacher_name] if self.sparse_teacher_name else None

    # ------------------------------------------------------------------ forward passes
    def train(self, mode: bool = True) -> "DistillationModule":
        super().train(mode)
        for teacher in self.teachers.values():
            teacher.eval()  # teachers never see dropout/noise unless a callback asks for it
        return self

    def student_logits(self, batch: dict[str, Tensor]) -> Tensor:
        return self._logits(self.student, batch)

    @torch.no_grad()
    def teacher_logits(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Logits of every teacher. A stochastic teacher with `num_samples = M > 1` (e.g. MoE
        knowledge augmentation) is run M times and contributes M entries `name/sample<r>`, each
        with 1/M of the teacher's weight."""
        out: dict[str, Tensor] = {}
        for name, teacher in self.teachers.items():
            draws = int(getattr(teacher, "num_samples", 1))
            for r in range(draws):
                out[name if draws == 1 else f"{name}/sample{r}"] = self._logits(teacher, batch)
        return out

    def expand_teacher_weights(self, weights: Tensor) -> Tensor:
        """Per-teacher weights [..., K] -> per-entry weights of `teacher_logits` (samples split a
        teacher's weight equally)."""
        draws = [int(getattr(t, "num_samples", 1)) for t in self.teachers.values()]
        if all(d == 1 for d in draws):
            return weights
        repeats = torch.tensor(draws, device=weights.device)
        return torch.repeat_interleave(weights / repeats.to(weights.dtype), repeats, dim=-1)

    def _logits(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        if self.task == "classification":
            return model(batch["inputs"])
        return model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits

    def align(self, logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Logits at position t predict token t+1 in a causal LM; classifiers are already aligned."""
        if self.task == "classification":
            return logits, labels
        return logits[:, :-1], labels[:, 1:]

    # ------------------------------------------------------------------ losses
    def _weights_for(self, teacher_logits: dict[str, Tensor], student: Tensor, labels: Tensor, mask: Tensor) -> Tensor:
        if self.teacher_weight_fn is None:
            weights = self.teacher_weights.to(student.device)
        else:
            weights = self.teacher_weight_fn(teacher_logits, student, labels, mask)
            weights = weights.to(device=student.device, dtype=torch.float32).detach()
        return weights if weights.shape[-1] == len(teacher_logits) else self.expand_teacher_weights(weights)

    def kd_term(self, student: Tensor, teachers: dict[str, Tensor], labels: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """The divergence between aligned student logits and the (weighted) teachers. Returns
        (kd loss without T^2, batch-mean teacher weights [K])."""
        assert self.loss_fn is not None
        T = self.kd_temperature
        weights = self._weights_for(teachers, student, labels, mask)  # [K] or [B, K]
        params = dict(self.loss_params)
        logits = list(teachers.values())
        if len(logits) == 1:
            return self.loss_fn(student, logits[0], mask, temperature=T, **params), weights.reshape(-1, 1).mean(-1)
        stacked = torch.stack([t.float() for t in logits], dim=-2)  # [..., K, V]
        per_position_w = weights.view(weights.shape[0], *([1] * (student.dim() - 2)), -1) if weights.dim() == 2 else weights
        per_position_w = per_position_w.expand(*student.shape[:-1], len(logits))  # [..., K]
        if self.teacher_combine == "mixture":
            # Mixture of teacher distributions at temperature T, handed to the loss as logits
            # T * log(p_mix) so that the loss's own division by T recovers log(p_mix).
            log_p = torch.log_softmax(stacked / T, dim=-1) + torch.log(per_position_w.clamp_min(1e-30)).unsqueeze(-1)
            mixture_logits = T * torch.logsumexp(log_p, dim=-2)
            kd = self.loss_fn(student, mixture_logits, mask, temperature=T, **params)
        else:
            kd = student.new_zeros(())
            count = mask.sum().clamp_min(1)
            for k, teacher in enumerate(logits):
                per_pos = self.loss_fn(student, teacher, mask, temperature=T, reduction="none", **params)
                kd = kd + (per_pos * per_position_w[..., k] * mask).sum() / count
        batch_w = weights if weights.dim() == 1 else weights.mean(0)
        return kd, batch_w

    def _chunked_terms(self, batch: dict[str, Tensor], labels: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The `loss.chunk_size` path: (student token CE, KD term, teacher token CE [1, M], weights)."""
        if len(self.teachers) != 1 or self.teacher_weight_fn is not None:
            raise ValueError("loss.chunk_size supports exactly one teacher without a weighting callback")
        hidden, head = hidden_and_head(self.student, batch)
        rows, targets = hidden[:, :-1][mask], labels[mask]
        token_ce = chunked_token_ce(rows, head, targets, self.chunk_size)
        teacher = next(iter(self.teachers.values()))
        with torch.no_grad():
            t_hidden, t_head = hidden_and_head(teacher, batch)
            t_rows = t_hidden[:, :-1][mask]
            teacher_token_ce = chunked_token_ce(t_rows, t_head, targets, self.chunk_size).unsqueeze(0)
        kd = chunked_distill_loss(rows, head.weight, t_rows, t_head.weight, None, self.loss_fn,
                                  chunk_size=self.chunk_size, temperature=self.kd_temperature,
                                  student_head_bias=head.bias, teacher_head_bias=t_head.bias, **self.loss_params)
        return token_ce, kd, teacher_token_ce, self.teacher_weights.to(kd.device)

    def _dense_terms(self, batch: dict[str, Tensor], student: Tensor, labels: Tensor,
                     mask: Tensor) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]] | None:
        """KD term from full teacher logits: (kd, batch-mean weights, teacher token CE [K, M],
        aligned teacher logits), or None when the batch is skipped for non-finite teacher logits."""
        teachers = {n: self.align(t, batch["labels"])[0] for n, t in self.teacher_logits(batch).items()}
        counted = {n: t[mask] for n, t in teachers.items()}
        # One reduction in the common case; -inf (a token the teacher rules out) is legitimate.
        bad = [n for n, t in counted.items() if not all_finite(t) and bool((torch.isnan(t) | torch.isposinf(t)).any())]
        if bad:
            message = f"step {self.global_step}: teacher(s) {bad} produced NaN/+inf logits"
            if self.nonfinite_teacher == "error":
                raise FloatingPointError(message + " (distill.nonfinite_teacher=skip skips such batches)")
            warnings.warn(message + "; skipping this batch")
            return None
        kd, batch_w = self.kd_term(student, teachers, labels, mask)
        targets = labels[mask]
        teacher_token_ce = torch.stack([F.cross_entropy(t.float(), targets, reduction="none") for t in counted.values()])
        return kd, batch_w, teacher_token_ce, teachers

    def _step(self, batch: dict[str, Tensor]) -> Tensor | None:
        labels = batch["labels"] if self.task == "classification" else batch["labels"][:, 1:]
        mask = labels != -100
        count = mask.sum()
        if count == 0:
            warnings.warn(f"step {self.global_step}: every label is masked (-100); loss is 0 for this batch")
        if self.chunk_size and self.task == "causal_lm" and self.teachers and self.sparse_teacher is None:
            token_ce, kd, teacher_token_ce, batch_w = self._chunked_terms(batch, labels, mask)
            teachers: dict[str, Tensor] = dict(self.teachers)  # names only, for logging
        else:
            student, _ = self.align(self.student_logits(batch), batch["labels"])
            token_ce = F.cross_entropy(student[mask].float(), labels[mask], reduction="none")
        ce = token_ce.sum() / count.clamp_min(1)
        stats: dict[str, Tensor] = {"student_ce": ce.detach(), "token_count": count.detach(),
                                    "student_token_ce": token_ce.detach()}
        loss = self.ce_weight * ce
        if self.teachers:
            if self.sparse_teacher is not None:  # offline targets, stored for the aligned positions
                kd = sparse_kl(student, self.sparse_teacher.targets(batch), mask, temperature=self.kd_temperature)
                batch_w, teacher_token_ce, teachers = self.teacher_weights.to(kd.device), None, dict(self.teachers)
            elif not self.chunk_size or self.task != "causal_lm":
                dense = self._dense_terms(batch, student, labels, mask)
                if dense is None:
                    return None
                kd, batch_w, teacher_token_ce, teachers = dense
            loss = loss + self.kd_weight * self.kd_temperature**2 * kd
            stats.update(kd_loss=kd.detach(), teacher_weights=batch_w.detach())
            if teacher_token_ce is not None:  # no teacher CE statistics from sparse targets
                stats.update(teacher_token_ce=teacher_token_ce,
                             teacher_ce=teacher_token_ce.mean(-1) if count > 0 else teacher_token_ce.sum(-1))
            self.log("train/kd_loss", kd, prog_bar=True)
            for name, w in zip(teachers, batch_w):
                if len(teachers) > 1:
                    self.log(f"train/teacher_weight/{name}", w)
        self.last_step = stats
        self.log("train/ce_loss", ce, prog_bar=not self.teachers)
        self.log("train/temperature", self.kd_temperature)
        self.log("train/loss", loss)
        return loss

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor | None:
        return self._step(batch)

    # ------------------------------------------------------------------ evaluation
    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        student, labels = self.align(self.student_logits(batch), batch["labels"])
        mask = labels != -100
        count = mask.sum()
        if count == 0:
            return
        self.val_loss.update(F.cross_entropy(student[mask].float(), labels[mask]), weight=count)
        if self.teachers and self.sparse_teacher is None:  # cached targets cover the training split only
            teacher, _ = self.align(next(iter(self.teacher_logits(batch).values())), batch["labels"])
            agree = (student[mask].argmax(-1) == teacher[mask].argmax(-1)).float().mean()
            self.val_agreement.update(agree, weight=count)
            self.val_teacher_loss.update(F.cross_entropy(teacher[mask].float(), labels[mask]), weight=count)

    def on_validation_epoch_end(self) -> None:
        if self.val_loss.update_count == 0:
            return
        loss = self.val_loss.compute()
        self.log("val/student_loss", loss, prog_bar=True, sync_dist=False)
        self.log("val/student_ppl", torch.exp(loss.clamp(max=50)))
        self.val_loss.reset()
        if self.teachers and self.val_agreement.update_count:
            self.log("val/teacher_agreement", self.val_agreement.compute())
            self.log("val/teacher_loss", self.val_teacher_loss.compute())
        self.val_agreement.reset()
        self.val_teacher_loss.reset()

    # ------------------------------------------------------------------ optimisation & checkpoints
    def trainable_parameters(self) -> list[nn.Parameter]:
        params = list(self.student.parameters()) + list(self.extra_trainable.parameters())
        return [p for p in params if p.requires_grad]

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.trainable_parameters())
        if self.scheduler_factory is None:
            return optimizer
        total = self.trainer.estimated_stepping_batches
        scheduler = self.scheduler_factory(optimizer, num_training_steps=int(total) if math.isfinite(total) else 10**9)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.save_teachers:
            return
        trainable = {f"teachers.{n}" for n, p in self.teachers.named_parameters() if p.requires_grad}
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith("teachers.") and k not in trainable]:
            del state[key]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Frozen teacher weights are rebuilt from config, not stored: fill them in so that strict
        # loading still catches a student whose weights do not match.
        state = checkpoint["state_dict"]
        for key, value in self.state_dict().items():
            if key.startswith("teachers.") and key not in state:
                state[key] = value
