"""`DistillationModule`: one student, zero or more frozen teachers, one training step.

    loss = kd_weight * T^2 * D(student / T, teacher / T) + ce_weight * CE(student, labels)

With no teacher it is plain cross-entropy training (used for the teacher's own pre-training and for
the no-KD baseline). Everything that changes over time is a callback talking to the attributes
documented in `kd_lightning.interface`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from lightning import LightningModule
from torch import Tensor, nn
from torch.optim import Optimizer
from torchmetrics import MeanMetric
from typing_extensions import override

from kd_lightning.data.step_tokens import STEP_TOKENS_KEY, token_share
from kd_lightning.interface import TeacherWeightFn
from kd_lightning.kd_paths import choose_path, teacher_side
from kd_lightning.losses.align import NextByteMap, VocabMap, VocabProjection
from kd_lightning.infra.sharding import ShardedDataParallel, shard_distillation
from kd_lightning.step import StepInputs, StepTerms, bind_loss, step_statistics, teacher_logits
from kd_lightning.tasks import task_of_model

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
            (stored for the aligned positions; or `teacher.stored(batch)`, the same unaligned
            [B, L, k], when the teacher has it), whatever `loss_fn` is.
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
        teacher_tokenization: "shared" (the teacher reads the student's `input_ids`) or "own": the
            batches are dual (`kd_lightning.data.dual`) and the teacher reads `teacher_input_ids`
            in training, validation and evaluation; needs one teacher and a cross-vocabulary loss
            (one taking `targets`: `uld`, `span_kl`).
        vocab_map: the tokenizer pair's shared vocabulary (`data.vocab_map.shared_vocab_map`), used
            by `span_kl` with `teacher_tokenization="own"`.
        next_byte_map: a byte-level student's view of the teacher's tokens
            (`data.vocab_map.build_next_byte_map`), used by `byte_kl` with `teacher_tokenization="own"`.
        vocab_projection: the pair's student -> teacher projection
            (`data.vocab_projection.shared_vocab_projection`), used by `xtoken_kl`.
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
        teacher_tokenization: str = "shared",
        vocab_map: VocabMap | None = None,
        next_byte_map: NextByteMap | None = None,
        vocab_projection: VocabProjection | None = None,
    ) -> None:
        super().__init__()
        self.teacher_tokenization = teacher_tokenization
        self.nonfinite_teacher = nonfinite_teacher
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
        self.adapter = task_of_model(student)
        self.task = self.adapter.name
        # How a step gets its KD term: decided once, here.
        self.kd_path = choose_path(loss_fn=loss_fn, num_teachers=len(self.teachers), sparse=self.sparse_teacher_name,
                                   chunk_size=chunk_size, causal_lm=self.task == "causal_lm",
                                   combine=teacher_combine, nonfinite=nonfinite_teacher,
                                   teacher_tokenization=teacher_tokenization, vocab_map=vocab_map,
                                   next_byte_map=next_byte_map, vocab_projection=vocab_projection)
        # Teacher parameters a callback trains (SAR's routers): kept in checkpoints, see
        # `train_teacher_parameters`.
        self.trainable_teacher_keys: set[str] = set()
        k = max(len(self.teachers), 1)
        weights = torch.full((k,), 1.0 / k) if teacher_weights is None else torch.tensor(teacher_weights, dtype=torch.float32)
        if weights.numel() != k or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(f"teacher_weights must be {k} non-negative numbers, got {teacher_weights}")
        self.teacher_weights = weights / weights.sum()
        self.teacher_weight_fn: TeacherWeightFn | None = None
        self.loss_params: dict[str, Any] = {}
        self.last_step: dict[str, Tensor] = {}
        self.save_hyperparameters(
            {"kd_weight": kd_weight, "ce_weight": ce_weight, "kd_temperature": kd_temperature,
             "teacher_names": list(self.teachers), "teacher_combine": teacher_combine, "chunk_size": chunk_size,
             "teacher_tokenization": teacher_tokenization}
        )
        self.val_loss = MeanMetric()
        self.val_agreement = MeanMetric()
        self.val_teacher_loss = MeanMetric()

    @property
    def sparse_teacher(self) -> nn.Module | None:
        """The teacher of offline sparse targets, if that is the teacher (`teacher=cached`)."""
        return self.teachers[self.sparse_teacher_name] if self.sparse_teacher_name else None

    # ------------------------------------------------------------------ forward passes
    @override
    def train(self, mode: bool = True) -> "DistillationModule":
        super().train(mode)
        for teacher in self.teachers.values():
            teacher.eval()  # teachers never see dropout/noise unless a callback asks for it
        return self

    def student_logits(self, batch: dict[str, Tensor]) -> Tensor:
        return self.adapter.logits(self.student, batch)

    def teacher_logits(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Logits of every teacher, no grad (`kd_lightning.step.teacher_logits`: a stochastic teacher
        with `num_samples = M > 1` contributes M entries `name/sample<r>`)."""
        return teacher_logits(self.adapter, self.teachers, batch)

    def align(self, logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Logits at position t predict token t+1 in a causal LM; classifiers are already aligned."""
        return self.adapter.align(logits, labels)

    # ------------------------------------------------------------------ the step
    def _step(self, batch: dict[str, Tensor], step_tokens: Tensor | None = None) -> Tensor | None:
        """loss = kd_weight · T² · KD + ce_weight · CE over the batch's counted positions.

        Logged as the batch's token mean; returned as its share of the optimizer step's token sum
        when the batch carries the step's counted tokens (`kd_lightning.data.step_tokens`)."""
        labels = self.adapter.labels(batch)
        mask = self.adapter.mask(labels)
        count = mask.sum()
        if count == 0:
            warnings.warn(f"step {self.global_step}: every label is masked; loss is 0 for this batch")
        terms = self.kd_path(self.step_inputs(batch, labels, mask))
        if terms is None:  # skipped (non-finite teacher logits, distill.nonfinite_teacher=skip)
            self.last_step = {}  # no statistics: callbacks skip the batch too (never the previous batch's)
            return None
        ce = (terms.student_token_ce.sum() if terms.ce_sum is None else terms.ce_sum) / count.clamp_min(1)
        loss = self.ce_weight * ce
        if terms.kd is not None:
            loss = loss + self.kd_weight * self.kd_temperature**2 * terms.kd
        self.record(terms, ce, count)
        self.log("train/loss", loss)
        if step_tokens is None:
            return loss
        self.log("train/step_tokens", step_tokens.float(), reduce_fx="max")
        return loss * token_share(count, step_tokens, self.trainer.world_size, self.trainer.accumulate_grad_batches)

    def step_inputs(self, batch: dict[str, Tensor], labels: Tensor, mask: Tensor) -> StepInputs:
        """This step's batch and current settings (what the callbacks set), as the KD path reads them."""
        return StepInputs(batch, labels, mask, self.adapter, self.student, self.teachers,
                          bind_loss(self.loss_fn, self.loss_params), self.kd_temperature, self.ce_weight != 0,
                          self.teacher_weights, self.teacher_weight_fn, self.global_step)

    def record(self, terms: StepTerms, ce: Tensor, count: Tensor) -> None:
        """Detached statistics for the callbacks (`last_step`, see `kd_lightning.interface`) and logs."""
        self.last_step = step_statistics(terms, ce, count)
        if terms.kd is not None:
            self.log("train/kd_loss", terms.kd, prog_bar=True)
            if len(terms.teacher_names) > 1:
                for name, w in zip(terms.teacher_names, terms.teacher_weights):
                    self.log(f"train/teacher_weight/{name}", w)
        for key, value in (terms.logs or {}).items():
            self.log(f"train/{key}", value)
        self.log("train/ce_loss", ce, prog_bar=not self.teachers)
        self.log("train/temperature", self.kd_temperature)

    @override
    def setup(self, stage: str) -> None:
        # After the callbacks' setup, which attach a weighting function (`teacher_weight_fn`).
        self.kd_path.check(self.student, self.teachers, weighted=self.teacher_weight_fn is not None)

    @override
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor | None:
        return self._step(batch, batch.pop(STEP_TOKENS_KEY, None))

    # ------------------------------------------------------------------ evaluation
    @override
    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        student, labels = self.align(self.student_logits(batch), batch["labels"])
        mask = self.adapter.mask(labels)
        count = mask.sum()
        if count == 0:
            return
        self.val_loss.update(F.cross_entropy(student[mask].float(), labels[mask]), weight=count)
        if self.teachers and self.teacher_tokenization == "own":
            # The teacher reads its own tokens; its loss is per teacher token, no top-1 agreement.
            own = teacher_side(batch)
            teacher, teacher_labels = self.align(next(iter(self.teacher_logits(own).values())), own["labels"])
            teacher_mask = self.adapter.mask(teacher_labels)
            if teacher_mask.any():
                self.val_teacher_loss.update(F.cross_entropy(teacher[teacher_mask].float(), teacher_labels[teacher_mask]),
                                             weight=teacher_mask.sum())
        elif self.teachers and self.sparse_teacher is None:  # cached targets cover the training split only
            teacher, _ = self.align(next(iter(self.teacher_logits(batch).values())), batch["labels"])
            agree = (student[mask].argmax(-1) == teacher[mask].argmax(-1)).float().mean()
            self.val_agreement.update(agree, weight=count)
            self.val_teacher_loss.update(F.cross_entropy(teacher[mask].float(), labels[mask]), weight=count)

    @override
    def on_validation_epoch_end(self) -> None:
        if self.val_loss.update_count == 0:
            return
        loss = self.val_loss.compute()
        self.log("val/student_loss", loss, prog_bar=True, sync_dist=False)
        self.log("val/student_ppl", torch.exp(loss.clamp(max=50)))
        self.val_loss.reset()
        if self.teachers and self.val_agreement.update_count:
            self.log("val/teacher_agreement", self.val_agreement.compute())
        if self.teachers and self.val_teacher_loss.update_count:
            self.log("val/teacher_loss", self.val_teacher_loss.compute())
        self.val_agreement.reset()
        self.val_teacher_loss.reset()

    @override
    def configure_model(self) -> None:
        # strategy=fsdp: shard teachers and student per transformer block (no-op otherwise)
        strategy = self._trainer.strategy if self._trainer is not None else None
        if isinstance(strategy, ShardedDataParallel):
            shard_distillation(self, strategy.data_parallel_mesh, strategy.mp_policy,
                               student_reshard_after_forward=strategy.student_reshard_after_forward,
                               device=strategy.root_device,
                               student_activation_checkpointing=strategy.student_activation_checkpointing)

    # ------------------------------------------------------------------ optimisation & checkpoints
    def trainable_parameters(self) -> list[nn.Parameter]:
        """What the module's optimizer trains: the student (teacher parts a callback trains have
        their own optimizer in that callback)."""
        return [p for p in self.student.parameters() if p.requires_grad]

    def train_teacher_parameters(self, teacher_name: str, parameters: Iterable[nn.Parameter]) -> None:
        """A callback that trains part of a frozen teacher (SAR's routers) declares it here: those
        parameters get gradients and are kept in checkpoints (the rest of the teacher is not).

        They are the callback's to synchronise: DDP is told to leave them out of its gradient buckets
        (else the callback's own backward, outside DDP's forward, would leave the buckets they share
        with student parameters half-reduced: student gradients not averaged over processes), and
        FSDP keeps them whole and replicated (`kd_lightning.infra.sharding.shard_distillation`)."""
        teacher = self.teachers[teacher_name]
        wanted = {id(p) for p in parameters}
        for key, param in teacher.named_parameters():
            if id(param) in wanted:
                param.requires_grad_(True)
                self.trainable_teacher_keys.add(f"teachers.{teacher_name}.{key}")
        # read by torch's DistributedDataParallel when Lightning wraps this module (after callbacks' setup)
        self._ddp_params_and_buffers_to_ignore = sorted(self.trainable_teacher_keys)

    @override
    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.trainable_parameters())
        if self.scheduler_factory is None:
            return optimizer
        total = self.trainer.estimated_stepping_batches
        scheduler = self.scheduler_factory(optimizer, num_training_steps=int(total) if math.isfinite(total) else 10**9)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.save_teachers:
            return
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith("teachers.") and k not in self.trainable_teacher_keys]:
            del state[key]

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Frozen teacher weights are rebuilt from config, not stored: fill them in so that strict
        # loading still catches a student whose weights do not match.
        state = checkpoint.get("state_dict")
        if state is None:  # a sharded checkpoint (strategy=fsdp): the strategy loaded the weights itself
            return
        for key, value in self.state_dict().items():
            if key.startswith("teachers.") and key not in state:
                state[key] = value
