"""Divergences whose target or weighting adapts per position: AKL (adaptive FKL/RKL) and TAID.

Written as row functions of float32 log-probabilities like ``divergences.py``; the public callables
have the standard ``fn(student_logits, teacher_logits, mask=None, *, temperature=1.0,
reduction="mean", **params)`` signature.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from kd_lightning.losses.common import (
    ValueForm,
    check_unit_interval,
    kl_sum,
    token_divergence,
    wants_cross_entropy,
)


def _head_mask(p: Tensor, mu: float, faithful_head_mask: bool) -> Tensor:
    """Teacher "head": the highest-probability tokens whose ascending cumulative mass is ≥ μ."""
    sorted_p, order = p.sort(dim=-1)  # ascending, so the cumulative mass grows from the tail up
    head_sorted = sorted_p.cumsum(dim=-1) >= mu
    if faithful_head_mask:
        # TAID's port uses the sorted-order mask directly on vocab-order gaps (quirk (i) in METHODS).
        return head_sorted
    return torch.zeros_like(head_sorted).scatter(-1, order, head_sorted)


@token_divergence
def adaptive_kl(
    log_q: Tensor,
    log_p: Tensor,
    *,
    mu: float = 0.5,
    faithful_head_mask: bool = False,
    detach_weights: bool = True,
    value_form: ValueForm = "kl",
    strict: bool = False,
) -> Tensor:
    """Adaptive KL: a per-position mix of forward and reverse KL weighted by head/tail gaps.

    Wu et al. 2024, "Rethinking Kullback-Leibler Divergence in Knowledge Distillation for Large
    Language Models". Rule: sort the teacher probabilities ascending and accumulate; the tokens where
    the cumulative mass is ≥ μ form the head H (the highest-probability tokens). With
    ``g_head = Σ_{v∈H} |p_v − q_v|`` and ``g_tail = Σ_{v∉H} |p_v − q_v|``::

        AKL = g_head/(g_head+g_tail) · KL(p‖q) + g_tail/(g_head+g_tail) · KL(q‖p)

    Where q == p exactly both weights are taken as ½ (both KLs are 0 there).

    Options reproducing the quirks of the TAID port (``src/distil_losses/adaptive_kl.py``):
    ``faithful_head_mask=True`` applies the head mask built in sorted order to the gaps in vocab
    order (no scatter back, so H is effectively arbitrary tokens); ``detach_weights=False`` lets
    gradient flow through the weights; ``value_form="ce"`` uses the CE form for the FKL term. The
    defaults are the corrected rule: head mask in vocab order, weights detached (as in the paper's
    own code, which computes them from a detached student), KL form. ``strict`` as in ``reverse_kl``.
    """
    check_unit_interval("mu", mu)
    p, q = log_p.exp(), log_q.exp()
    gap = (p - q).abs()
    if detach_weights:
        gap = gap.detach()
    head = _head_mask(p, mu, faithful_head_mask)
    zero = torch.zeros_like(gap)
    g_head = torch.where(head, gap, zero).sum(-1)
    g_tail = torch.where(head, zero, gap).sum(-1)
    total = g_head + g_tail
    # q == p exactly gives 0/0; any weight is fine there (both KLs are 0), and the safe denominator
    # keeps NaN out of the backward pass when the weights are not detached.
    has_gap = total > 0
    safe_total = torch.where(has_gap, total, torch.ones_like(total))
    w_head = torch.where(has_gap, g_head / safe_total, torch.full_like(total, 0.5))
    fkl = kl_sum(log_p, log_q, cross_entropy=wants_cross_entropy(value_form))
    rkl = kl_sum(log_q, log_p, strict=strict)
    return w_head * fkl + (1.0 - w_head) * rkl


@token_divergence
def taid(
    log_q: Tensor, log_p: Tensor, *, interpolation: float | Tensor | None = None, value_form: ValueForm = "kl"
) -> Tensor:
    """TAID loss ``KL(p_t ‖ q)`` with the interpolated target ``p_t = softmax((1−t)·sg(zS) + t·zT)``.

    Shing et al. 2025, "TAID: Temporally Adaptive Interpolated Distillation for Efficient Knowledge
    Transfer in Language Models". The interpolation is in *logit* space and the target is detached
    entirely (including its student part), so ∂L/∂zS = (q − p_t)/T: zero at t = 0, the forward-KL
    gradient at t = 1. ``interpolation`` (t ∈ [0, 1], float or 0-dim tensor) changes every step and
    is supplied by the TAID schedule callback; there is deliberately no default. Teacher zeros
    (−inf logits) stay zeros of the target for every t > 0; at exactly t = 0 the target is the
    student itself. ``value_form="ce"`` returns ``−Σ p_t log q`` like the reference code.
    """
    if interpolation is None:
        raise ValueError(
            "taid needs `interpolation` (the TAID t in [0, 1]); it changes every step and must be set "
            "by the TAID schedule callback (kd_lightning.callbacks.taid), not by the loss config"
        )
    if not isinstance(interpolation, Tensor):
        check_unit_interval("interpolation", interpolation)
    t = torch.as_tensor(interpolation, dtype=log_p.dtype, device=log_p.device).detach()
    # t·(−inf) must stay −inf for t > 0 but 0 (not NaN) at t = 0, where the teacher plays no part.
    zero_mass_value = torch.where(t > 0, -math.inf, 0.0).to(log_p.dtype)
    teacher_part = torch.where(torch.isneginf(log_p), zero_mass_value, t * log_p)
    # Log-probabilities differ from logits by a per-row constant, which softmax ignores, so this is
    # softmax((1−t)·stopgrad(zS/T) + t·zT/T) exactly.
    log_target = torch.log_softmax((1.0 - t) * log_q.detach() + teacher_part, dim=-1)
    return kl_sum(log_target, log_q, cross_entropy=wants_cross_entropy(value_form))
