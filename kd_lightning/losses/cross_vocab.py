"""Losses that compare teacher and student distributions over *different* vocabularies.

Two tokenizations of one text (``kd_lightning.data.dual``) give two sequences of different lengths.
Both losses here keep the package's call shape and take the second tokenization as one keyword::

    fn(student_logits [B, Ls, Vs], teacher_logits [B, Lt, Vt], mask [B, Ls], *,
       targets=CrossTokenTargets(...), temperature=1.0, reduction="mean", ...) -> Tensor

with logits and targets already causally shifted (:func:`cross_token_targets` shifts the batch's
labels and offsets; shift both logits with ``[:, :-1]``). Without ``targets`` both fall back to one
shared tokenization (positions aligned by index), which is what the existing tests and the
same-tokenizer module use. The student's own cross-entropy is not included: the module adds it.

Neither loss runs on the chunked (fused lm_head) path: alignment needs, per sequence, the rows of
whole groups on both sides at once (and ``span_kl`` gathers columns of the shared vocabulary), while
``chunked_distill_loss`` streams flat rows that must pair up one to one; the plain ``uld`` without
``targets`` is the only cross-vocabulary form it supports.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor

from kd_lightning.losses.align import NextByteMap, VocabMap, VocabProjection, span_groups
from kd_lightning.losses.common import Reduction, log_probs, reduce_positions, token_divergence
from kd_lightning.losses.divergences import forward_kl

IGNORE_INDEX = -100


class CrossTokenTargets(NamedTuple):
    """The second tokenization of a batch, causally shifted like the labels (row t -> token t + 1).

    ``teacher_labels [B, Lt]`` (-100 = not counted), ``student_labels [B, Ls]`` (target ids, needed
    by ``span_kl``), character ``*_offsets [B, L, 2]`` of each target token (-1 = padding), and the
    tokenizer pair's :class:`~kd_lightning.losses.align.VocabMap` (``span_kl`` only).
    """

    teacher_labels: Tensor
    student_labels: Tensor | None = None
    student_offsets: Tensor | None = None
    teacher_offsets: Tensor | None = None
    vocab_map: VocabMap | None = None
    next_byte: NextByteMap | None = None  # byte_kl only: a byte-level student's view of the teacher's tokens
    projection: VocabProjection | None = None  # xtoken_kl only: student -> teacher tokens


def cross_token_targets(batch: Mapping[str, Tensor], vocab_map: VocabMap | None = None,
                        next_byte: NextByteMap | None = None,
                        projection: VocabProjection | None = None) -> CrossTokenTargets:
    """The shifted targets of a dual batch: ``labels``/``offsets`` and their ``teacher_`` twins, ``[:, 1:]``."""
    return CrossTokenTargets(
        teacher_labels=batch["teacher_labels"][:, 1:],
        student_labels=batch["labels"][:, 1:],
        student_offsets=batch["offsets"][:, 1:] if "offsets" in batch else None,
        teacher_offsets=batch["teacher_offsets"][:, 1:] if "teacher_offsets" in batch else None,
        vocab_map=vocab_map,
        next_byte=next_byte,
        projection=projection,
    )


def _uld_row(log_q: Tensor, log_p: Tensor) -> Tensor:
    """``Σ_v |sort↓(q)_v − sort↓(p)_v|`` per row, the smaller vocabulary zero-padded; ∈ [0, 2].

    Past the smaller vocabulary's width ``W`` the padded side is 0, so those terms sum to the larger
    side's mass outside its top ``W``: only the top ``W`` of each side is sorted (``topk``), which is
    several times cheaper than a full sort when the vocabularies differ much (bytes vs 32k BPE).
    """
    q, p = log_q.exp(), log_p.exp()
    width = min(q.shape[-1], p.shape[-1])
    value = torch.zeros(q.shape[:-1], dtype=q.dtype, device=q.device)
    tops = []
    for probs in (q, p):
        top = probs.topk(width, dim=-1)  # sorted, descending
        tops.append(top.values)
        if probs.shape[-1] > width:
            # The rest by masking (not 1 − Σ top): exact, never negative, gradient to the tail entries.
            value = value + probs.scatter(-1, top.indices, 0.0).sum(-1)
    return value + (tops[0] - tops[1]).abs().sum(-1)


uld_index_aligned = token_divergence(same_vocab=False)(_uld_row)
uld_index_aligned.__name__ = uld_index_aligned.__qualname__ = "uld_index_aligned"


def _answer_span(mask: Tensor, skip_last: bool) -> Tensor:
    """``mask [B, L]`` bool, without each row's last True when ``skip_last``."""
    if not skip_last:
        return mask
    return mask & (mask.cumsum(-1) < mask.sum(-1, keepdim=True))


def uld(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    *,
    targets: CrossTokenTargets | None = None,
    temperature: float = 1.0,
    reduction: Reduction = "mean",
    skip_student_eos: bool = False,
    skip_teacher_eos: bool = False,
) -> Tensor:
    """Universal Logit Distillation: L1 distance between sorted probability vectors.

    Boizard et al. 2024, "Towards Cross-Tokenizer Distillation: the Universal Logit Distillation Loss
    for LLMs" (the paper's closed form of Wasserstein-1 under its uniform-cost assumption): per
    compared position ``Σ_v |sort↓(q)_v − sort↓(p)_v|``, the smaller vocabulary zero-padded; ∈ [0, 2],
    invariant to any permutation of either vocabulary.

    As published (with ``targets``): each sequence's answer span on each side is its counted
    positions in order (``mask`` for the student, ``targets.teacher_labels != -100`` for the
    teacher); the k-th counted student position is compared with the k-th counted teacher position,
    for k below the shorter span (the longer side's tail is dropped). ``skip_*_eos`` drop the last
    counted position of a side first (the reference code's options). ``reduction="seq_mean"`` is the
    reference's reduction (mean per sequence, then over sequences with a compared position); the
    default "mean" weighs every compared position equally. The paper's total is
    ``L_CE + λ·L_ULD``: the module adds the student's CE on its own labels. One ``temperature``
    divides both logits (the reference has one per side, both 1 by default).

    Without ``targets``, positions are aligned by index on one tokenization (leading dims must
    match), as :data:`uld_index_aligned`; this form also runs on the chunked path.
    """
    if targets is None and not (skip_student_eos or skip_teacher_eos):
        return uld_index_aligned(student_logits, teacher_logits, mask, temperature=temperature, reduction=reduction)
    positions = student_logits.shape[:-1]
    if len(positions) != 2:
        raise ValueError(f"uld with answer spans needs logits [B, L, V], got {tuple(student_logits.shape)}")
    device = student_logits.device
    student_mask = torch.ones(positions, dtype=torch.bool, device=device) if mask is None else mask.bool()
    teacher_mask = student_mask if targets is None else targets.teacher_labels != IGNORE_INDEX
    if teacher_mask.shape != teacher_logits.shape[:-1] or student_mask.shape != positions:
        raise ValueError(f"masks {tuple(student_mask.shape)}/{tuple(teacher_mask.shape)} do not match logits "
                         f"{tuple(student_logits.shape)}/{tuple(teacher_logits.shape)}")
    student_mask = _answer_span(student_mask, skip_student_eos)
    teacher_mask = _answer_span(teacher_mask.to(device), skip_teacher_eos)
    # Keep the first min(count_S, count_T) counted positions of each row on each side; the kept
    # positions, read in row-major order, then pair up k-th with k-th within every row.
    common = torch.minimum(student_mask.sum(-1), teacher_mask.sum(-1)).unsqueeze(-1)
    compared = student_mask & (student_mask.cumsum(-1) <= common)
    teacher_kept = teacher_mask & (teacher_mask.cumsum(-1) <= common)
    student_rows = student_logits[compared]
    teacher_rows = teacher_logits.detach()[teacher_kept.to(teacher_logits.device)]
    values = _uld_row(log_probs(student_rows, temperature), log_probs(teacher_rows, temperature).to(device))
    return reduce_positions(values, compared, positions, reduction)


def _group_terms(
    student_mask: Tensor, targets: CrossTokenTargets, student_vocab: int
) -> tuple[list[tuple[int, int, int]], list[tuple[int, int, int]], int]:
    """(exact terms, fallback terms, student positions covered by fallback groups); terms are (row, s, t)."""
    assert targets.student_labels is not None and targets.student_offsets is not None
    assert targets.teacher_offsets is not None and targets.vocab_map is not None
    lookup = targets.vocab_map.lookup(student_vocab).tolist()
    teacher_ids = targets.vocab_map.teacher_ids.tolist()
    s_counted = (student_mask & (targets.student_labels != IGNORE_INDEX)).cpu().tolist()
    t_counted = (targets.teacher_labels != IGNORE_INDEX).cpu().tolist()
    s_labels, t_labels = targets.student_labels.cpu().tolist(), targets.teacher_labels.cpu().tolist()
    exact, fallback, fallback_positions = [], [], 0
    for row, (s_off, t_off) in enumerate(zip(targets.student_offsets.cpu(), targets.teacher_offsets.cpu())):
        for group in span_groups(s_off, t_off):
            s0, s1, t0, t1 = group.student_start, group.student_end, group.teacher_start, group.teacher_end
            if s1 == s0 or t1 == t0 or not (all(s_counted[row][s0:s1]) and all(t_counted[row][t0:t1])):
                continue
            pairs = list(zip(range(s0, s1), range(t0, t1)))
            if s1 - s0 == t1 - t0 and all(
                0 <= s_labels[row][s] < student_vocab and lookup[s_labels[row][s]] >= 0
                and teacher_ids[lookup[s_labels[row][s]]] == t_labels[row][t] for s, t in pairs
            ):
                exact += [(row, s, t) for s, t in pairs]
            else:
                # The first token of a group is predicted, on both sides, from the same text (everything
                # before the group's shared start), so those two rows answer the same question.
                fallback.append((row, s0, t0))
                fallback_positions += s1 - s0
    return exact, fallback, fallback_positions


def span_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    *,
    targets: CrossTokenTargets | None = None,
    divergence: Callable[..., Tensor] = forward_kl,
    fallback_weight: float = 1.0,
    temperature: float = 1.0,
    reduction: Reduction = "mean",
    out_stats: dict[str, Any] | None = None,
) -> Tensor:
    """Span-aligned cross-tokenizer distillation: exact divergence where tokens match, ULD elsewhere.

    Per sequence the target tokens of both tokenizations are cut into groups that start and end at
    shared character boundaries (:func:`~kd_lightning.losses.align.span_groups`; the token alignment
    idea of "Dual-Space Knowledge Distillation for Large Language Models", Zhang et al. 2024, and of
    TRL's GOLD trainer). A group counts when all its tokens are counted on both sides. Where a group
    is one token on each side and that token is in the shared vocabulary (``targets.vocab_map``),
    or more generally k tokens on each side that pair up through the shared vocabulary (the bytes of
    one character split the same way), each pair of rows is restricted to the shared vocabulary and
    renormalised (the divergence sees the gathered logits) and compared with ``divergence``, called as
    ``divergence(student_rows, teacher_rows, None, temperature=..., reduction="none")`` (any token
    divergence of this package; ``forward_kl`` by default). Restriction is the approximation: mass on
    tokens only one side has is ignored. Elsewhere, the rows predicting the group's first token on each side, which
    see the same text, are compared with ULD (:func:`uld`), weighted by ``fallback_weight`` (0 turns
    the fallback off). One term per exact pair and per fallback group; "mean" averages the terms,
    "seq_mean" per sequence first.

    ``out_stats`` (a dict) receives ``exact_fraction`` / ``fallback_fraction`` (shares of the counted
    student positions compared exactly and covered by fallback groups; the rest, in groups with an
    uncounted token, is unaligned) and the term counts ``exact_terms`` / ``fallback_terms``, for the
    module to log. Alignment reads offsets and
    labels on the CPU (one sync per call). Without ``targets`` both sides share one tokenization:
    every position is an exact 1:1 group over the first ``min(Vs, Vt)`` ids, so the value equals
    ``divergence`` on those columns. Not supported on the chunked path (see the module docstring).
    """
    if targets is None:
        width = min(student_logits.shape[-1], teacher_logits.shape[-1])
        value = divergence(student_logits[..., :width], teacher_logits[..., :width], mask,
                           temperature=temperature, reduction=reduction)
        if out_stats is not None:
            count = int(student_logits.shape[:-1].numel() if mask is None else mask.sum())
            out_stats.update(exact_fraction=1.0 if count else 0.0, fallback_fraction=0.0,
                             exact_terms=count, fallback_terms=0)
        return value
    if targets.vocab_map is None or targets.student_labels is None or targets.student_offsets is None \
            or targets.teacher_offsets is None:
        raise ValueError("span_kl needs targets with student_labels, both offsets and a vocab_map "
                         "(kd_lightning.data.vocab_map.shared_vocab_map)")
    positions = student_logits.shape[:-1]
    student_mask = torch.ones(positions, dtype=torch.bool) if mask is None else mask.bool().cpu()
    exact, fallback, fallback_positions = _group_terms(student_mask, targets, student_logits.shape[-1])
    if not fallback_weight:
        fallback, fallback_positions = [], 0
    device, teacher = student_logits.device, teacher_logits.detach()

    def rows_of(terms: list[tuple[int, int, int]], student_cols: Tensor | None = None,
                teacher_cols: Tensor | None = None) -> tuple[Tensor, Tensor]:
        # Gathering rows and shared columns in one advanced index never materialises [M, Vt].
        index = torch.tensor(terms, dtype=torch.long).reshape(-1, 3, 1)
        rows, s_pos, t_pos = index[:, 0], index[:, 1], index[:, 2]
        student_part = (student_logits[rows.to(device), s_pos.to(device), student_cols.to(device)]
                        if student_cols is not None else student_logits[rows[:, 0].to(device), s_pos[:, 0].to(device)])
        t_device = teacher.device
        teacher_part = (teacher[rows.to(t_device), t_pos.to(t_device), teacher_cols.to(t_device)]
                        if teacher_cols is not None else teacher[rows[:, 0].to(t_device), t_pos[:, 0].to(t_device)])
        return student_part, teacher_part

    student_rows, teacher_rows = rows_of(exact, targets.vocab_map.student_ids, targets.vocab_map.teacher_ids)
    exact_values = divergence(student_rows, teacher_rows, None, temperature=temperature, reduction="none")
    student_rows, teacher_rows = rows_of(fallback)
    fallback_values = fallback_weight * _uld_row(log_probs(student_rows, temperature),
                                                 log_probs(teacher_rows, temperature).to(device))
    # reduce_positions wants the values in row-major order of the student positions they sit at.
    terms = exact + fallback
    order = sorted(range(len(terms)), key=lambda k: terms[k][:2])
    flat = torch.cat([exact_values, fallback_values])[torch.tensor(order, dtype=torch.long, device=device)]
    where = torch.tensor([term[:2] for term in terms], dtype=torch.long, device=device).reshape(-1, 2)
    compared = torch.zeros(positions, dtype=torch.bool, device=device)
    compared[where[:, 0], where[:, 1]] = True
    if out_stats is not None:
        counted = int((student_mask & (targets.student_labels.cpu() != IGNORE_INDEX)).sum())
        out_stats.update(exact_fraction=len(exact) / max(counted, 1),
                         fallback_fraction=fallback_positions / max(counted, 1),
                         exact_terms=len(exact), fallback_terms=len(fallback))
    return reduce_positions(flat, compared, positions, reduction)
