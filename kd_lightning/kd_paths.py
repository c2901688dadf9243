"""The four ways a step gets its KD term, chosen once when the module is built.

- `DenseKD`: full teacher logits from a forward pass (one or several teachers, mixtures, weighting
  callbacks, stochastic teachers);
- `ChunkedKD`: the memory-lean path (`loss.chunk_size`): student and teacher heads applied chunk by
  chunk to the final hidden states (`kd_lightning.losses.chunked`), so `[tokens, V]` logits never exist;
- `SparseKD`: offline sparse targets (`teacher=cached`), read by sample index;
- `CrossTokenizerKD`: the teacher reads its own tokenization of the same text (dual batches,
  `kd_lightning.data.dual`) and a cross-vocabulary loss (`uld`, `span_kl`) compares the two.

A path is called with a `kd_lightning.step.StepInputs` (the batch and this step's settings, values
only) and returns the step's `StepTerms`; `DistillationModule._step` combines them into
``kd_weight · T² · kd + ce_weight · CE``. A path never decides weights or temperature itself. What
a path needs from the models and callbacks is checked once, in `check` (the module's `setup`).

Where the loss has one (`kd_lightning.losses.supports_fast`, `sparse_kl`), the paths use the fast
KD terms of `kd_lightning.losses.fast`: counted rows are selected once, the divergence's gradient is
written in closed form in one pass over `[tokens, V]`, the student CE comes from the same
log-probabilities (and builds no graph when `ce_weight = 0`), and the teacher CE statistics from what
the kernel already computed. Other losses (`uld`, `online_sparse_kl`, cross-tokenizer losses) take
the reference path: the loss function itself on the aligned logits.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Mapping
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.infra.sharding import is_fsdp, reshard_frozen
from kd_lightning.lean import check_linear_head, hidden_and_head
from kd_lightning.losses.align import NextByteMap, VocabMap, VocabProjection
from kd_lightning.losses.chunked import chunked_kd_terms
from kd_lightning.losses.common import all_finite
from kd_lightning.losses.cross_vocab import cross_token_targets
from kd_lightning.losses.fast import KDTerms, fast_kd_terms, fast_sparse_kd_terms, supports_fast
from kd_lightning.losses.sparse import SparseTargets
from kd_lightning.step import StepInputs, StepTerms, expand_teacher_weights


def student_terms(step: StepInputs) -> tuple[Tensor, Tensor | None, Tensor]:
    """Aligned student logits, the summed CE of the counted positions (graph only when it is in the
    loss) and their per-token CE (detached)."""
    student, _ = step.task.align(step.student_logits(), step.batch["labels"])
    labels, mask = step.labels, step.mask
    if not step.ce_in_loss:
        with torch.no_grad():
            return student, None, F.cross_entropy(student[mask].float(), labels[mask], reduction="none")
    token_ce = F.cross_entropy(student[mask].float(), labels[mask], reduction="none")
    return student, token_ce.sum(), token_ce.detach()


def fast_step_terms(terms: KDTerms, count: Tensor, weights: Tensor, names: list[str]) -> StepTerms:
    """`StepTerms` from the fast kernel's sums (token means over `count` counted positions)."""
    kd = terms.kd_sum / count.clamp_min(1)
    teacher_ce = None if terms.teacher_token_ce is None else terms.teacher_token_ce.unsqueeze(0)
    return StepTerms(terms.ce_sum, terms.student_token_ce, kd, teacher_ce, weights.detach(), names)


class KDPath:
    """A way to get the step's terms: `path(step) -> StepTerms | None` (None: the batch is skipped)."""

    def check(self, student: nn.Module, teachers: Mapping[str, nn.Module], weighted: bool) -> None:
        """Refuse, once before training, models or a weighting callback (`weighted`) the path cannot serve."""

    def __call__(self, step: StepInputs) -> StepTerms | None:
        raise NotImplementedError


class CEOnly(KDPath):
    """No teacher: plain cross-entropy training (teacher pre-training, the no-KD baseline)."""

    def __call__(self, step: StepInputs) -> StepTerms:
        _, ce_sum, token_ce = student_terms(step)
        return StepTerms(ce_sum, token_ce, None, None, None, [])


class DenseKD(KDPath):
    """KD from full teacher logits; several teachers are mixed ("mixture") or their divergences
    weighted ("losses"). A NaN/+inf teacher logit at a counted position stops the run naming the
    step (`nonfinite="error"`) or skips the batch (`"skip"`): the call then returns None."""

    def __init__(self, combine: str, nonfinite: str) -> None:
        self.combine, self.nonfinite = combine, nonfinite

    def __call__(self, step: StepInputs) -> StepTerms | None:
        raw = step.teacher_logits()
        if self.fast(step, raw):
            return self.fast_terms(step, raw)
        labels, mask = step.labels, step.mask
        teacher_logits = {n: step.task.align(t, step.batch["labels"])[0] for n, t in raw.items()}
        student, ce_sum, token_ce = student_terms(step)
        counted = {n: t[mask] for n, t in teacher_logits.items()}
        if not self.finite(step, counted):
            return None
        weights = self.weights(step, teacher_logits, student)  # [K] or [B, K]
        kd = self.divergence(step, student, teacher_logits, weights)
        targets = labels[mask]
        teacher_token_ce = torch.stack([F.cross_entropy(t.float(), targets, reduction="none") for t in counted.values()])
        batch_weights = weights if weights.dim() == 1 else weights.mean(0)
        return StepTerms(ce_sum, token_ce, kd, teacher_token_ce, batch_weights.detach(), list(teacher_logits))

    def finite(self, step: StepInputs, counted: dict[str, Tensor]) -> bool:
        """False (after warning) when the batch is skipped for NaN/+inf teacher logits; raises under
        `nonfinite="error"`. One reduction in the common case; -inf (a token the teacher rules out)
        is legitimate."""
        bad = [n for n, t in counted.items() if not all_finite(t) and bool((torch.isnan(t) | torch.isposinf(t)).any())]
        if not bad:
            return True
        message = f"step {step.global_step}: teacher(s) {bad} produced NaN/+inf logits"
        if self.nonfinite == "error":
            raise FloatingPointError(message + " (distill.nonfinite_teacher=skip skips such batches)")
        warnings.warn(message + "; skipping this batch")
        return False

    @staticmethod
    def fast(step: StepInputs, teacher_logits: dict[str, Tensor]) -> bool:
        """The fast kernel serves one teacher entry with static weights and a loss that has one."""
        return (len(teacher_logits) == 1 and step.teacher_weight_fn is None and step.loss_fn is not None
                and supports_fast(step.loss_fn))

    def fast_terms(self, step: StepInputs, teacher_logits: dict[str, Tensor]) -> StepTerms | None:
        """Unaligned teacher logits in; counted rows of both models selected once, then one kernel."""
        (name, teacher), = teacher_logits.items()
        teacher_rows = step.task.rows(teacher, step.mask)
        del teacher  # the full [B, L, V] teacher logits are not needed past this point
        if not self.finite(step, {name: teacher_rows}):
            return None
        student_rows = step.task.rows(step.student_logits(), step.mask)
        assert step.loss_fn is not None
        terms = fast_kd_terms(step.loss_fn, student_rows, teacher_rows, step.labels[step.mask],
                              temperature=step.kd_temperature, ce=step.ce_in_loss)
        return fast_step_terms(terms, step.token_count, step.teacher_weights.to(student_rows.device), [name])

    @staticmethod
    def weights(step: StepInputs, teacher_logits: dict[str, Tensor], student: Tensor) -> Tensor:
        """Per-entry teacher weights: static, or from the weighting callback ([K] or per-example [B, K])."""
        if step.teacher_weight_fn is None:
            weights = step.teacher_weights.to(student.device)
        else:
            weights = step.teacher_weight_fn(teacher_logits, student, step.labels, step.mask)
            weights = weights.to(device=student.device, dtype=torch.float32).detach()
        return weights if weights.shape[-1] == len(teacher_logits) else expand_teacher_weights(step.teachers, weights)

    def divergence(self, step: StepInputs, student: Tensor, teacher_logits: dict[str, Tensor], weights: Tensor) -> Tensor:
        """Token-mean divergence (no T²) between the student and the weighted teachers."""
        loss_fn, T, mask = step.loss_fn, step.kd_temperature, step.mask
        assert loss_fn is not None
        logits = list(teacher_logits.values())
        if len(logits) == 1:
            return loss_fn(student, logits[0], mask, temperature=T)
        stacked = torch.stack([t.float() for t in logits], dim=-2)  # [..., K, V]
        per_position = weights.view(weights.shape[0], *([1] * (student.dim() - 2)), -1) if weights.dim() == 2 else weights
        per_position = per_position.expand(*student.shape[:-1], len(logits))  # [..., K]
        if self.combine == "mixture":
            # Mixture of teacher distributions at temperature T, handed to the loss as logits
            # T * log(p_mix) so that the loss's own division by T recovers log(p_mix).
            log_p = torch.log_softmax(stacked / T, dim=-1) + torch.log(per_position.clamp_min(1e-30)).unsqueeze(-1)
            return loss_fn(student, T * torch.logsumexp(log_p, dim=-2), mask, temperature=T)
        kd = student.new_zeros(())
        count = mask.sum().clamp_min(1)
        for k, teacher in enumerate(logits):
            per_pos = loss_fn(student, teacher, mask, temperature=T, reduction="none")
            kd = kd + (per_pos * per_position[..., k] * mask).sum() / count
        return kd


class ChunkedKD(KDPath):
    """`loss.chunk_size`: one teacher, both heads applied chunk by chunk to the counted hidden states
    (`kd_lightning.losses.chunked.chunked_kd_terms`: KD, CE and statistics from one head matmul per
    chunk and model, gradients in closed form)."""

    def __init__(self, chunk_size: int) -> None:
        if chunk_size < 1:
            raise ValueError(f"loss.chunk_size must be >= 1, got {chunk_size}")
        self.chunk_size = chunk_size

    def check(self, student: nn.Module, teachers: Mapping[str, nn.Module], weighted: bool) -> None:
        if len(teachers) != 1 or weighted:
            raise ValueError("loss.chunk_size supports exactly one teacher without a weighting callback")
        for model in (student, *teachers.values()):
            check_linear_head(model)

    def __call__(self, step: StepInputs) -> StepTerms:
        hidden, head = hidden_and_head(step.student, step.batch)
        rows, targets = step.task.rows(hidden, step.mask), step.labels[step.mask]
        name, teacher = next(iter(step.teachers.items()))
        with torch.no_grad():
            t_hidden, t_head = hidden_and_head(teacher, step.batch)
            t_rows = step.task.rows(t_hidden, step.mask)
            t_weight, t_bias = t_head.weight, t_head.bias
            if is_fsdp(teacher):  # a copy of the gathered head, so the teacher's root can be resharded
                t_weight, t_bias = t_weight.detach().clone(), None if t_bias is None else t_bias.detach().clone()
        reshard_frozen(teacher)
        assert step.loss_fn is not None
        terms = chunked_kd_terms(step.loss_fn, rows, head.weight, head.bias, t_rows, t_weight, t_bias, targets,
                                 temperature=step.kd_temperature, ce=step.ce_in_loss, chunk_size=self.chunk_size)
        return fast_step_terms(terms, step.token_count, step.teacher_weights.to(rows.device), [name])


class SparseKD(KDPath):
    """Offline targets (`teacher=cached`, a teacher store): with loss=sparse_kl the KD term is
    `sparse_kl` against the stored sparse targets (topk: the tail as `teacher_cache.tail` says,
    spread uniformly by default, or one extra bin, or dropped); any other loss reads them decoded to dense
    log-probabilities (`kd_lightning.teachers.encodings.decode_dense`) on the dense path. Sparse targets
    give no teacher CE statistics."""

    def __init__(self, nonfinite: str) -> None:
        self.decoded = DenseKD("mixture", nonfinite)  # other losses: the stored targets decoded to dense

    def __call__(self, step: StepInputs) -> StepTerms | None:
        name, teacher = next(iter(step.teachers.items()))
        if not getattr(teacher, "sparse", True):  # another loss: the teacher returns the decoded log-probabilities
            return self.decoded(step)
        mask = step.mask
        student_rows = step.task.rows(step.student_logits(), mask)
        if hasattr(teacher, "stored"):  # unaligned [B, L, k] (+ the topk tail's mass [B, L]): one index_select each
            index = step.task.row_index(mask)  # the counted rows, selected like the student's
            targets = SparseTargets(*(None if x is None else x.reshape(-1, *x.shape[2:]).index_select(0, index)
                                      for x in teacher.stored(step.batch)))
        else:  # a table with only `targets(batch)`: aligned [B, L-1, k]
            aligned = teacher.targets(step.batch)
            targets = SparseTargets(aligned.indices[mask], aligned.probs[mask],
                                    None if aligned.tail is None else aligned.tail[mask])
        terms = fast_sparse_kd_terms(student_rows, targets, step.labels[mask], temperature=step.kd_temperature,
                                     ce=step.ce_in_loss, tail=getattr(teacher, "tail", "uniform"))
        return fast_step_terms(terms, step.token_count, step.teacher_weights.to(student_rows.device), [name])._replace(
            teacher_token_ce=None)  # stored targets are sparse: no teacher CE statistics


TEACHER_KEYS = ("input_ids", "attention_mask", "labels", "offsets")


def teacher_side(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """The teacher's own tokenization of a dual batch, under the plain keys a model reads."""
    return {key: batch[f"teacher_{key}"] for key in TEACHER_KEYS if f"teacher_{key}" in batch}


def loss_keywords(loss_fn: Any) -> set[str]:
    """The keyword arguments a loss function (or a partial of one) accepts. A loss that takes
    `targets` (a `CrossTokenTargets`) compares two tokenizations: uld, span_kl."""
    return set(inspect.signature(getattr(loss_fn, "func", loss_fn)).parameters)


class CrossTokenizerKD(KDPath):
    """The teacher runs on its own tokens (`teacher_input_ids`, a different length in general) and
    the cross-vocabulary loss aligns the two sequences through `cross_token_targets` (span_kl also
    through the shared vocabulary `vocab_map`); the student's CE is on its own labels. span_kl's
    coverage is logged (`train/span_exact_fraction`, `train/span_fallback_fraction`). No per-token
    teacher CE (its tokens are not the student's), so weighting callbacks do not apply."""

    def __init__(self, vocab_map: VocabMap | None, next_byte_map: NextByteMap | None = None,
                 vocab_projection: VocabProjection | None = None) -> None:
        self.vocab_map, self.next_byte_map, self.vocab_projection = vocab_map, next_byte_map, vocab_projection

    def check(self, student: nn.Module, teachers: Mapping[str, nn.Module], weighted: bool) -> None:
        if weighted:
            raise ValueError("cross-tokenizer KD has one teacher: teacher-weighting callbacks do not apply")

    def __call__(self, step: StepInputs) -> StepTerms:
        batch = step.batch
        if "teacher_input_ids" not in batch:
            raise ValueError("cross-tokenizer KD needs dual batches (teacher_input_ids ...): the data module must "
                             "carry the teacher's tokenization (dataset.teacher_tokenizer)")
        student, ce_sum, token_ce = student_terms(step)
        name, teacher = next(iter(step.teacher_logits(teacher_side(batch)).items()))
        stats: dict[str, float] = {}
        loss_fn = step.loss_fn
        assert loss_fn is not None
        extra = {"out_stats": stats} if "out_stats" in loss_keywords(loss_fn) else {}
        targets = cross_token_targets(batch, self.vocab_map, self.next_byte_map, self.vocab_projection)
        kd = loss_fn(student, teacher[:, :-1], step.mask, targets=targets,
                     temperature=step.kd_temperature, **extra)
        logs = {f"span_{key}": float(stats[key]) for key in ("exact_fraction", "fallback_fraction") if key in stats}
        logs.update({f"alm_{key}": float(stats[key]) for key in ("student_tokens_per_chunk", "teacher_tokens_per_chunk")
                     if key in stats})
        if "compared_fraction" in stats:
            logs["byte_kl_compared_fraction"] = float(stats["compared_fraction"])
        logs.update({f"xtoken_{key}": float(stats[key]) for key in ("row_fraction", "projected_mass",
                                                                    "covered_teacher_mass") if key in stats})
        return StepTerms(ce_sum, token_ce, kd, None, step.teacher_weights.to(kd.device), [name], logs)


def choose_path(*, loss_fn: Callable[..., Tensor] | None, num_teachers: int, sparse: str | None,
                chunk_size: int | None, causal_lm: bool, combine: str, nonfinite: str,
                teacher_tokenization: str = "shared", vocab_map: VocabMap | None = None,
                next_byte_map: NextByteMap | None = None, vocab_projection: VocabProjection | None = None) -> KDPath:
    """The one place that decides how a step gets its KD term; refuses, naming the option, a
    choice no path serves. `sparse`: the name of a teacher of offline sparse targets, if any."""
    for name, value, allowed in (("teacher_tokenization", teacher_tokenization, ("shared", "own")),
                                 ("nonfinite_teacher", nonfinite, ("error", "skip")),
                                 ("teacher_combine", combine, ("mixture", "losses"))):
        if value not in allowed:
            raise ValueError(f"{name} must be {' or '.join(map(repr, allowed))}, got {value!r}")
    if not num_teachers:
        return CEOnly()
    if teacher_tokenization == "own":
        own_tokens_check(loss_fn, num_teachers, sparse, chunk_size)
        return CrossTokenizerKD(vocab_map, next_byte_map, vocab_projection)
    if sparse is not None:
        return SparseKD(nonfinite)
    if chunk_size and causal_lm:
        return ChunkedKD(int(chunk_size))
    return DenseKD(combine, nonfinite)


def own_tokens_check(loss_fn: Callable[..., Tensor] | None, num_teachers: int, sparse_teacher: str | None,
                     chunk_size: int | None) -> None:
    """`teacher_tokenization="own"` needs one teacher model, a loss that compares two tokenizations
    and the unchunked path; fail at construction naming what to change."""
    if num_teachers != 1 or sparse_teacher is not None:
        raise ValueError("a teacher with its own tokenization must be the only teacher, and a model (not teacher=cached)")
    if loss_fn is None or "targets" not in loss_keywords(loss_fn):
        raise ValueError("the teacher reads its own tokenization (dual batches): use a cross-tokenizer loss, "
                         "loss=uld or loss=span_kl (or loss=alm, loss=byte_kl, loss=xtoken_kl)")
    if chunk_size:
        raise ValueError(f"loss.chunk_size={chunk_size}: the chunked path cannot align two tokenizations; "
                         "set loss.chunk_size=null")
