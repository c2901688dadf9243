"""Approximate likelihood matching (ALM) across tokenizers: chunk likelihoods, binarised divergence.

Minixhofer, Vulić and Ponti 2025, "Cross-Tokenizer Distillation via Approximate Likelihood
Matching" (reference code: tokenkit, ``training/losses.py::compute_alm_loss``, read as code, not
copied). The text of a sequence is cut into chunks at the character offsets where *both*
tokenizations have a token boundary (:func:`~kd_lightning.losses.align.span_groups`, the alignment
the dual data already carries). Within a chunk each model's log-likelihood of the text actually
there is the sum of the log-probabilities of its own tokens (both condition on the same text before
the chunk), so the two numbers answer the same question and can be compared whatever the
vocabularies. No vocabulary map is needed; the loss works in both directions.

Comparing ``log p_t`` and ``log p_s`` of a chunk directly would ignore that each is one outcome of
an enormous space, so ALM binarises: chunk c either happens (probability ``p``) or not (``1 − p``),
and an f-divergence between ``Bernoulli(p_t)`` and ``Bernoulli(p_s)`` is minimised. A likelihood
temperature τ divides the log-likelihoods first (``p = exp(L / τ)``), which moves small chunk
probabilities into the range where the binary divergence has gradient.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import Tensor

from kd_lightning.losses.align import counted_groups
from kd_lightning.losses.common import upcast
from kd_lightning.losses.cross_vocab import IGNORE_INDEX, CrossTokenTargets

BinaryDivergence = Literal["binary_kl", "reverse_binary_kl", "binary_js"]
ChunkWeight = Literal["chunks", "teacher_tokens", "student_tokens"]


def log1mexp(x: Tensor) -> Tensor:
    """``log(1 − exp(x))`` for ``x < 0``, stable on both sides of ``log ½`` (Mächler 2012)."""
    return torch.where(x < -math.log(2.0), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def binary_divergence(log_p: Tensor, log_q: Tensor, kind: BinaryDivergence = "binary_kl") -> Tensor:
    """Elementwise divergence between ``Bernoulli(p)`` (the teacher) and ``Bernoulli(q)`` (the
    student), from ``log p, log q < 0``:

    - ``binary_kl``:          ``p log(p/q) + (1−p) log((1−p)/(1−q))``  (KL(p‖q), the teacher first)
    - ``reverse_binary_kl``:  the same with p and q exchanged
    - ``binary_js``:          ``½ KL(p‖m) + ½ KL(q‖m)``, ``m = (p + q) / 2``
    """
    if kind == "reverse_binary_kl":
        return binary_divergence(log_q, log_p, "binary_kl")
    if kind == "binary_js":
        log_m = torch.logaddexp(log_p, log_q) - math.log(2.0)
        return 0.5 * (binary_divergence(log_p, log_m) + binary_divergence(log_q, log_m))
    if kind != "binary_kl":
        raise ValueError(f"divergence must be 'binary_kl', 'reverse_binary_kl' or 'binary_js', got {kind!r}")
    return torch.exp(log_p) * (log_p - log_q) + (-torch.expm1(log_p)) * (log1mexp(log_p) - log1mexp(log_q))


def target_log_probs(logits: Tensor, labels: Tensor, temperature: float) -> Tensor:
    """``[B, L]`` log-probability (at ``temperature``) of each label; 0 where the label is -100.
    Only ``logsumexp`` and one gathered column: no second ``[B, L, V]`` tensor is kept."""
    scaled = upcast(logits) / temperature
    picked = scaled.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return torch.where(labels != IGNORE_INDEX, picked - torch.logsumexp(scaled, dim=-1), torch.zeros_like(picked))


def chunk_index(targets: CrossTokenTargets, student_mask: Tensor) -> tuple[Tensor, Tensor, int]:
    """Chunk number of every target token on each side (``[B, Ls]``, ``[B, Lt]``, -1 = in no
    chunk) and the number of chunks; chunks are :func:`counted_groups` (CPU, one sync)."""
    assert targets.student_offsets is not None and targets.teacher_offsets is not None
    assert targets.student_labels is not None
    s_counted = (student_mask.cpu() & (targets.student_labels.cpu() != IGNORE_INDEX)).tolist()
    t_counted = (targets.teacher_labels.cpu() != IGNORE_INDEX).tolist()
    student_chunk = torch.full(targets.student_labels.shape, -1, dtype=torch.long)
    teacher_chunk = torch.full(targets.teacher_labels.shape, -1, dtype=torch.long)
    count = 0
    for row, (s_off, t_off) in enumerate(zip(targets.student_offsets.cpu(), targets.teacher_offsets.cpu())):
        for group in counted_groups(s_off, t_off, s_counted[row], t_counted[row]):
            student_chunk[row, group.student_start:group.student_end] = count
            teacher_chunk[row, group.teacher_start:group.teacher_end] = count
            count += 1
    return student_chunk, teacher_chunk, count


def chunk_sums(values: Tensor, chunk: Tensor, count: int) -> Tensor:
    """``[count]``: the sum of ``values [B, L]`` over each chunk of ``chunk [B, L]`` (-1 ignored)."""
    chunk = chunk.to(values.device).reshape(-1)
    keep = chunk >= 0
    return values.new_zeros(count).index_add(0, chunk[keep], values.reshape(-1)[keep])


def alm(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    *,
    targets: CrossTokenTargets | None = None,
    temperature: float = 1.0,
    likelihood_temperature: float = 1.0,
    divergence: BinaryDivergence = "binary_kl",
    chunk_weight: ChunkWeight = "chunks",
    epsilon: float = 1e-6,
    reduction: Literal["mean", "sum"] = "mean",
    out_stats: dict[str, Any] | None = None,
) -> Tensor:
    """Approximate likelihood matching (Minixhofer et al. 2025, "Cross-Tokenizer Distillation via
    Approximate Likelihood Matching").

    Logits and ``targets`` are causally shifted (``targets.student_labels``/``teacher_labels`` are
    the tokens each row predicts). For every chunk ``c`` (consecutive target tokens on each side
    between two shared boundaries, all counted: :func:`chunk_index`)::

        L_s(c) = Σ_{i∈c} log q(y_i)        L_t(c) = Σ_{j∈c} log p(y'_j)     (log-softmax at ``temperature``)
        a = min(L_t, 0) / τ − ε            b = min(L_s, 0) / τ − ε          (τ = ``likelihood_temperature``)
        D(c) = divergence(Bernoulli(e^a) ‖ Bernoulli(e^b))                  (:func:`binary_divergence`)

    and the value is ``Σ_c w_c D(c) / Σ_c w_c`` ("mean"; "sum": ``Σ_c w_c D(c)``), with ``w_c = 1``
    (``chunk_weight="chunks"``) or the chunk's teacher/student token count. ε keeps ``e^a < 1`` so
    ``log(1 − e^a)`` is finite when a chunk is certain. The next-token CE that the paper puts beside
    it is the module's ``ce_weight`` term. With identical tokenizations every chunk is one token and
    D is the per-token binary divergence. 0 (with a graph) when no chunk counts. ``out_stats``
    receives ``chunks`` and the mean tokens per chunk on each side.
    """
    if targets is None or targets.student_labels is None or targets.student_offsets is None \
            or targets.teacher_offsets is None:
        raise ValueError("alm needs targets with both labels and both offsets (cross_token_targets of a dual batch)")
    if likelihood_temperature <= 0:
        raise ValueError(f"likelihood_temperature must be > 0, got {likelihood_temperature}")
    if chunk_weight not in ("chunks", "teacher_tokens", "student_tokens"):
        raise ValueError(f"chunk_weight must be 'chunks', 'teacher_tokens' or 'student_tokens', got {chunk_weight!r}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"alm supports reduction 'mean' or 'sum', got {reduction!r}")
    device = student_logits.device
    student_mask = torch.ones(student_logits.shape[:-1], dtype=torch.bool) if mask is None else mask.bool()
    student_chunk, teacher_chunk, count = chunk_index(targets, student_mask)
    student_lp = target_log_probs(student_logits, targets.student_labels.to(device), temperature)
    with torch.no_grad():
        teacher = teacher_logits.detach()
        teacher_lp = target_log_probs(teacher, targets.teacher_labels.to(teacher.device), temperature).to(device)
    if out_stats is not None:
        out_stats.update(chunks=count, student_tokens_per_chunk=int((student_chunk >= 0).sum()) / max(count, 1),
                         teacher_tokens_per_chunk=int((teacher_chunk >= 0).sum()) / max(count, 1))
    if count == 0:
        return student_lp.sum() * 0.0
    log_p = chunk_sums(teacher_lp, teacher_chunk, count).clamp_max(0.0) / likelihood_temperature - epsilon
    log_q = chunk_sums(student_lp, student_chunk, count).clamp_max(0.0) / likelihood_temperature - epsilon
    values = binary_divergence(log_p, log_q, divergence)
    if chunk_weight == "chunks":
        weights = torch.ones_like(values)
    else:
        side = teacher_chunk if chunk_weight == "teacher_tokens" else student_chunk
        weights = chunk_sums(torch.ones(side.shape, dtype=values.dtype, device=device), side, count)
    total = (weights * values).sum()
    return total if reduction == "sum" else total / weights.sum()
