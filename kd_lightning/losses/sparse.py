"""Sparse teacher targets (cacheable offline) and the student loss that consumes them.

Anshumann et al. 2025, "Sparse Logit Sampling: Accelerating Knowledge Distillation in LLMs":
caching the teacher's top-k probabilities biases the target toward the head, while Random-Sampling
KD (draw token ids from the teacher, keep the counts) is an unbiased estimate of the teacher
distribution, so the student gradient is right in expectation.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from kd_lightning.losses.common import (
    Reduction,
    ValueForm,
    check_mask,
    counted_rows,
    kl_sum,
    log_probs,
    reduce_positions,
    upcast,
    wants_cross_entropy,
)


TAIL_MODES = ("bucket", "uniform", "drop")


class SparseTargets(NamedTuple):
    """A sparse teacher distribution per position; padding entries have probability 0.

    ``tail`` (optional): the teacher's mass on the ids *not* listed (a stored top-k's tail), with
    ``Σ probs + tail = 1``. Without it (``None``) the listed probabilities are the whole target."""

    indices: Tensor  # LongTensor [..., k], vocabulary ids
    probs: Tensor  # FloatTensor [..., k], target probabilities (sum to 1 unless top-k unnormalised)
    tail: Tensor | None = None  # FloatTensor [...], teacher mass outside `indices`


def check_tail_mode(tail: str) -> str:
    if tail not in TAIL_MODES:
        raise ValueError(f"tail={tail!r}: must be one of {list(TAIL_MODES)}")
    return tail


def tail_terms(log_q: Tensor, indices: Tensor, tail: Tensor, mode: str, *, cross_entropy: bool = False) -> Tensor:
    """Per-row KL contribution of the teacher's tail mass ``p_t`` (rows ``[M, V]``, reference/autograd).

    ``bucket``: the tail is one extra bin, ``p_t (log p_t − log q_t)`` with ``q_t = Σ_{v∉S} q_v``
    (log q_t = logsumexp of log q over the ids outside S, the listed ids masked to −inf: no
    ``1 − Σ_S q`` cancellation when the student is confident). ``uniform``: the tail spread evenly
    over the V − k other ids, ``Σ_{v∉S} u (log u − log q_v)`` with ``u = p_t / (V − k)``. Rows with
    ``p_t = 0`` (or no id outside S, k = V) add 0."""
    vocab, k = log_q.shape[-1], indices.shape[-1]
    p_t = upcast(tail).to(log_q.dtype)
    if k >= vocab:
        return log_q.new_zeros(log_q.shape[:-1])
    has = p_t > 0
    safe_p = torch.where(has, p_t, 1.0)
    if mode == "bucket":
        outside = log_q.scatter(-1, indices, float("-inf"))
        log_q_t = torch.logsumexp(outside, dim=-1)
        diff = -log_q_t if cross_entropy else safe_p.log() - log_q_t
        return torch.where(has, p_t * torch.where(has, diff, 0.0), 0.0)
    others = vocab - k
    sum_outside = log_q.sum(-1) - log_q.gather(-1, indices).sum(-1)  # Σ_{v∉S} log q_v
    u = safe_p / others
    value = -u * sum_outside if cross_entropy else p_t * u.log() - u * sum_outside
    return torch.where(has, value, 0.0)


def topk_targets(
    teacher_logits: Tensor, k: int, *, temperature: float = 1.0, renormalize: bool = True
) -> SparseTargets:
    """The teacher's k most probable tokens per position (the biased Top-K caching baseline).

    ``renormalize=True`` rescales the kept probabilities to sum to 1 (the common variant); otherwise
    the tail mass is simply dropped.
    """
    if not 0 < k <= teacher_logits.shape[-1]:
        raise ValueError(f"k must lie in [1, vocab size {teacher_logits.shape[-1]}], got {k}")
    probs, indices = log_probs(teacher_logits.detach(), temperature).exp().topk(k, dim=-1)
    if renormalize:
        probs = probs / probs.sum(-1, keepdim=True)
    return SparseTargets(indices, probs)


def sample_targets(
    teacher_logits: Tensor,
    num_draws: int,
    *,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    width: int | None = None,
) -> SparseTargets:
    """Random-Sampling KD targets: ``num_draws`` i.i.d. draws from p, ``p̂_v = count_v / num_draws``.

    Proposal = teacher distribution itself (sampling temperature t_s = 1), so the importance weights
    are the counts and ``E[p̂] = p`` exactly. Unique ids are padded with probability-0 entries to a
    common width: the batch's largest number of unique ids by default, or ``width`` (an error if some
    position has more unique ids than that; ``width = num_draws`` always suffices).
    """
    if num_draws < 1:
        raise ValueError(f"num_draws must be >= 1, got {num_draws}")
    probs = log_probs(teacher_logits.detach(), temperature).exp()
    vocab = probs.shape[-1]
    rows = probs.reshape(-1, vocab)
    draws = torch.multinomial(rows, num_draws, replacement=True, generator=generator)
    counts = torch.zeros_like(rows).scatter_add_(1, draws, torch.ones_like(draws, dtype=rows.dtype))
    needed = int((counts > 0).sum(-1).max()) if rows.shape[0] else 1
    if width is None:
        width = needed
    elif width < needed:
        raise ValueError(f"width={width} is smaller than the {needed} unique ids drawn at some position")
    # The top-`width` counts are exactly the drawn ids, followed by zero-count (probability 0) padding.
    top_counts, indices = counts.topk(min(width, vocab), dim=-1)
    lead = probs.shape[:-1]
    return SparseTargets(indices.reshape(*lead, -1), (top_counts / num_draws).reshape(*lead, -1))


def sparse_kl(
    student_logits: Tensor,
    teacher_targets: SparseTargets,
    mask: Tensor | None = None,
    *,
    temperature: float = 1.0,
    reduction: Reduction = "mean",
    value_form: ValueForm = "kl",
    tail: str = "bucket",
) -> Tensor:
    """Forward KL against a sparse target: ``Σ_{v∈S} p̂_v log p̂_v − Σ_{v∈S} p̂_v log q_v`` (+ a tail term).

    ``log q = log_softmax(student_logits / T)`` over the **full** vocabulary (normalising only over S
    would bias the gradient), so ∂L/∂zS = (q − p̂)/T when Σ p̂ = 1, whose expectation under
    Random-Sampling KD is the dense forward-KL gradient. ``temperature`` applies to the student only:
    the targets carry the temperature they were built with. ``value_form="ce"`` drops the
    ``Σ p̂ log p̂`` (and ``p_t log p_t``) terms.

    When the targets carry a ``tail`` (a stored top-k: the teacher's mass outside S), ``tail`` says
    what the loss does with it: ``bucket`` (default) treats it as one extra bin, the forward KL
    between the two distributions coarsened to S ∪ {tail}: ``+ p_t log(p_t / q_t)``,
    ``q_t = Σ_{v∉S} q_v``. It is exact for what the store knows and leaves the student's shape
    *within* the tail to CE (no teacher signal there). ``uniform``: the teacher's tail spread evenly
    over the V − k other ids (what the dense decode of the store does; wrong for a flat teacher).
    ``drop``: the tail is ignored; the caller should have renormalised the head (the Top-K variant
    of `decode_targets(tail="drop")`, biased toward the head). Targets without a tail: no tail term.
    """
    ce = wants_cross_entropy(value_form)
    lead = student_logits.shape[:-1]
    if teacher_targets.indices.shape[:-1] != lead or teacher_targets.probs.shape != teacher_targets.indices.shape:
        raise ValueError(
            f"sparse targets {tuple(teacher_targets.indices.shape)} / {tuple(teacher_targets.probs.shape)} "
            f"do not match student positions {tuple(lead)}"
        )
    check_tail_mode(tail)
    if teacher_targets.tail is not None and teacher_targets.tail.shape != lead:
        raise ValueError(f"sparse target tail {tuple(teacher_targets.tail.shape)} does not match positions {tuple(lead)}")
    mask = check_mask(mask, lead)
    if mask is not None and bool(mask.all()):
        mask = None  # every position counts (packed windows): skip the row selection and its backward
    log_q = log_probs(counted_rows(student_logits, mask), temperature)
    indices = counted_rows(teacher_targets.indices, mask)
    target = upcast(counted_rows(teacher_targets.probs.detach(), mask))
    values = kl_sum(target.log(), log_q.gather(-1, indices), cross_entropy=ce)
    if teacher_targets.tail is not None and tail != "drop":
        p_t = teacher_targets.tail.detach().reshape(-1)
        p_t = p_t if mask is None else p_t[mask.reshape(-1)]
        values = values + tail_terms(log_q, indices, p_t, tail, cross_entropy=ce)
    return reduce_positions(values, mask, lead, reduction)


def online_sparse_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    *,
    temperature: float = 1.0,
    reduction: Reduction = "mean",
    encoding: str = "sample",
    num_draws: int = 50,
    k: int = 12,
    value_form: ValueForm = "kl",
    generator: torch.Generator | None = None,
) -> Tensor:
    """:func:`sparse_kl` with the sparse target built from dense teacher logits in the same step.

    ``encoding="sample"``: Random-Sampling KD targets from ``num_draws`` draws (unbiased);
    ``encoding="topk"``: the ``k`` most likely tokens, renormalised (biased): the sparse encodings of
    the teacher store (`kd_lightning.teachers.encodings`), built each step. This reproduces the
    *training signal* of sparse KD with the standard signature, so it runs with any online teacher;
    it does not save the teacher's forward pass, which only an offline cache of targets does.
    """
    if mask is not None:
        # Only counted positions are sparsified: masked rows may hold garbage the sampler rejects.
        mask = check_mask(mask, student_logits.shape[:-1])
        dense = torch.zeros_like(teacher_logits)
        dense[mask] = teacher_logits[mask]
        teacher_logits = dense
    if encoding == "sample":
        targets = sample_targets(teacher_logits, num_draws, temperature=temperature, generator=generator)
    elif encoding == "topk":
        targets = topk_targets(teacher_logits, k, temperature=temperature)
    else:
        raise ValueError(f"encoding must be 'sample' or 'topk', got {encoding!r}")
    return sparse_kl(student_logits, targets, mask, temperature=temperature, reduction=reduction, value_form=value_form)
