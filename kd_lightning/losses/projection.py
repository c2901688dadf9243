"""X-Token's projected forward KL across tokenizers (``loss=xtoken_kl``).

Turuvekere Sreenivas et al. 2026, "X-Token: Projection-Guided Cross-Tokenizer Knowledge
Distillation" (arXiv 2605.21699; its P-KL loss, read from the paper's abstract, NVIDIA NeMo-RL's
``x_token`` pull requests and TRL's open PR #6126 as descriptions; no code copied). A sparse
matrix ``W [Vs, Vt]`` (:class:`~kd_lightning.losses.align.VocabProjection`, built on the data side
by re-tokenising every student token with the teacher's tokenizer) carries the student's next-token
distribution into the teacher's vocabulary, ``q̃ = Wᵀ q``, and the student is trained with the
forward KL ``KL(p_t ‖ q̃)`` there: no partition into common and uncommon tokens, so no token is
pushed down merely because the other vocabulary lacks it (the paper's "uncommon-token failure" of
GOLD's hybrid loss).

Positions: the two rows compared are those predicting the first token of a group of
:func:`~kd_lightning.losses.align.counted_groups` (tokens between character offsets that are a
boundary in both tokenizations, all counted); both rows condition on exactly the same text.

Our addition, on by default (``fold_uncovered``): teacher tokens that no student token projects
onto (a 49k teacher's whole words an 8k student spells in pieces) would receive no projected mass,
so their teacher probability only adds a constant and teaches nothing. Folding counts each such
token's probability on its longest byte prefix that *is* covered (``VocabProjection.teacher_fold``),
which is the event the student can predict: "the next text starts with these bytes".
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from kd_lightning.losses.align import VocabProjection, counted_groups
from kd_lightning.losses.common import log_probs
from kd_lightning.losses.cross_vocab import IGNORE_INDEX, CrossTokenTargets


def projected_kl(student_rows: Tensor, teacher_rows: Tensor, projection: VocabProjection, *,
                 temperature: float = 1.0, fold_uncovered: bool = True, epsilon: float = 1e-10,
                 out_stats: dict[str, Any] | None = None) -> Tensor:
    """``[M]`` forward KL between teacher rows ``[M, Vt]`` and projected student rows ``[M, Vs]``.

    With ``q = softmax(s / T)``, ``p = softmax(t / T)``, ``C`` the teacher tokens some student token
    projects onto and ``q̃_c = Σ_n [teacher_ids[n] = c] · weights[n] · q[student_ids[n]]``::

        fold_uncovered:     p̃_c = Σ_{j: fold[j] = c} p_j        value = Σ_c p̃_c log(p̃_c / (q̃_c + ε))
        not fold_uncovered: value = Σ_{c∈C} p_c log(p_c / (q̃_c + ε)) + Σ_{j∉C} p_j log(p_j / ε)

    (``0 log 0 = 0``). Without folding the sum runs over the whole teacher vocabulary (the paper's
    form, ε keeping the uncovered terms finite; they are constants). Only the covered columns are
    ever materialised: ``[M, N]`` and ``[M, |C|]`` floats, never ``[M, Vt]`` twice.
    """
    device = student_rows.device
    student_ids, teacher_ids = projection.student_ids.to(device), projection.teacher_ids.to(device)
    student_vocab, teacher_vocab = student_rows.shape[-1], teacher_rows.shape[-1]
    if len(student_ids) and (int(student_ids.max()) >= student_vocab or int(teacher_ids.max()) >= teacher_vocab):
        raise ValueError(f"the projection names ids past the logits' widths ({student_vocab}, {teacher_vocab}): "
                         "it was built for other tokenizers")
    covered, column = torch.unique(teacher_ids, return_inverse=True)  # [C], [N]
    log_q = log_probs(student_rows, temperature)
    weights = projection.weights.to(device=device, dtype=log_q.dtype)
    projected = log_q.new_zeros(len(log_q), len(covered)).index_add(1, column, log_q.exp()[:, student_ids] * weights)
    log_p = log_probs(teacher_rows.detach(), temperature).to(device=device, dtype=log_q.dtype)
    p = log_p.exp()
    if fold_uncovered:
        table = torch.full((teacher_vocab,), -1, dtype=torch.long, device=device)
        table[covered] = torch.arange(len(covered), device=device)
        fold = torch.full((teacher_vocab,), -1, dtype=torch.long, device=device)
        known = min(teacher_vocab, len(projection.teacher_fold))
        fold[:known] = projection.teacher_fold[:known].to(device)
        target_column = torch.where(fold >= 0, table[fold.clamp_min(0)], -1)
        kept = target_column >= 0
        target = torch.zeros_like(projected).index_add(1, target_column[kept], p[:, kept])
        rest = log_q.new_zeros(len(log_q))
    else:
        target = p[:, covered]
        uncovered = torch.ones(teacher_vocab, dtype=torch.bool, device=device)
        uncovered[covered] = False
        p_rest = p[:, uncovered]
        rest = (torch.xlogy(p_rest, p_rest) - p_rest * torch.log(p.new_tensor(epsilon))).sum(-1)
    values = (torch.xlogy(target, target) - target * torch.log(projected + epsilon)).sum(-1) + rest
    if out_stats is not None and len(values):
        out_stats.update(projected_mass=float(projected.detach().sum(-1).mean()),
                         covered_teacher_mass=float(target.sum(-1).mean()))
    return values


def group_starts(targets: CrossTokenTargets, student_mask: Tensor) -> tuple[list[tuple[int, int, int]], int]:
    """``(row, student position, teacher position)`` of the first token of every counted group and
    the number of counted student positions (CPU, one sync)."""
    assert targets.student_labels is not None and targets.student_offsets is not None
    assert targets.teacher_offsets is not None
    s_counted = (student_mask.cpu() & (targets.student_labels.cpu() != IGNORE_INDEX)).tolist()
    t_counted = (targets.teacher_labels.cpu() != IGNORE_INDEX).tolist()
    starts = [(row, group.student_start, group.teacher_start)
              for row, (s_off, t_off) in enumerate(zip(targets.student_offsets.cpu(), targets.teacher_offsets.cpu()))
              for group in counted_groups(s_off, t_off, s_counted[row], t_counted[row])]
    return starts, sum(map(sum, s_counted))


def xtoken_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    *,
    targets: CrossTokenTargets | None = None,
    temperature: float = 1.0,
    fold_uncovered: bool = True,
    epsilon: float = 1e-10,
    reduction: Literal["mean", "sum"] = "mean",
    out_stats: dict[str, Any] | None = None,
) -> Tensor:
    """X-Token's P-KL (Turuvekere Sreenivas et al. 2026, "X-Token: Projection-Guided Cross-Tokenizer
    Knowledge Distillation"): forward KL between the teacher's next-token distribution and the
    student's projected into the teacher's vocabulary (:func:`projected_kl`), one term per counted
    group of shared boundaries, on the two rows that predict the group's first token.

    Logits and ``targets`` are causally shifted (:func:`~kd_lightning.losses.cross_vocab.cross_token_targets`);
    ``targets.projection`` is the pair's :class:`~kd_lightning.losses.align.VocabProjection`. "mean"
    averages the group terms, "sum" adds them; 0 with a graph when no group counts. With identical
    tokenizers and the identity projection every group is one token and the value is the forward KL.
    The student's own CE (the paper trains CE + P-KL) is the module's ``ce_weight`` term.
    ``out_stats`` receives ``row_fraction`` (share of the counted student rows compared: one per group),
    ``projected_mass`` (mean student probability that lands on teacher tokens) and
    ``covered_teacher_mass`` (mean teacher probability compared, after folding).
    """
    if targets is None or targets.projection is None or targets.student_labels is None \
            or targets.student_offsets is None or targets.teacher_offsets is None:
        raise ValueError("xtoken_kl needs targets with both labels, both offsets and a projection "
                         "(kd_lightning.data.vocab_projection.shared_vocab_projection)")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"xtoken_kl supports reduction 'mean' or 'sum', got {reduction!r}")
    student_mask = torch.ones(student_logits.shape[:-1], dtype=torch.bool) if mask is None else mask.bool()
    starts, counted = group_starts(targets, student_mask)
    if out_stats is not None:
        out_stats["row_fraction"] = len(starts) / max(counted, 1)
    if not starts:
        return student_logits.sum() * 0.0
    index = torch.tensor(starts, dtype=torch.long)
    rows, s_pos, t_pos = index[:, 0], index[:, 1], index[:, 2]
    device, t_device = student_logits.device, teacher_logits.device
    student_rows = student_logits[rows.to(device), s_pos.to(device)]
    teacher_rows = teacher_logits.detach()[rows.to(t_device), t_pos.to(t_device)]
    values = projected_kl(student_rows, teacher_rows, targets.projection, temperature=temperature,
                          fold_uncovered=fold_uncovered, epsilon=epsilon, out_stats=out_stats)
    return values.sum() if reduction == "sum" else values.mean()
