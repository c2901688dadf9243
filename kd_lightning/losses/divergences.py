"""Token-level divergences between teacher and student output distributions.

Each function here is written as a *row function* of float32 log-probabilities and made public by
:func:`~kd_lightning.losses.common.token_divergence`, so the callable you import has the package's
standard signature::

    fn(student_logits [..., V], teacher_logits [..., V], mask [...] | None = None, *,
       temperature=1.0, reduction="mean", **params) -> Tensor

``p = softmax(teacher_logits / T)`` (teacher), ``q = softmax(student_logits / T)`` (student). The
value is the true divergence (zero when the distributions agree); no T² factor is applied here (the
module applies it). Only the student receives gradient.
"""

from __future__ import annotations

from torch import Tensor

from kd_lightning.losses.common import (
    ValueForm,
    check_unit_interval,
    kl_sum,
    log_mixture,
    token_divergence,
    wants_cross_entropy,
)


@token_divergence
def forward_kl(log_q: Tensor, log_p: Tensor, *, value_form: ValueForm = "kl") -> Tensor:
    """Forward KL ``KL(p‖q) = Σ_v p_v (log p_v − log q_v)`` per position.

    Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network". ``value_form="ce"``
    returns ``−Σ p log q = KL + H(p)`` like DistiLLM's and TAID's ``forward_kl`` (same gradient).
    Teacher zeros (−inf logits) contribute nothing, as 0·log 0 = 0.
    """
    return kl_sum(log_p, log_q, cross_entropy=wants_cross_entropy(value_form))


@token_divergence
def reverse_kl(log_q: Tensor, log_p: Tensor, *, strict: bool = False) -> Tensor:
    """Reverse KL ``KL(q‖p) = Σ_v q_v (log q_v − log p_v)`` per position (mode seeking).

    The token-level term of Gu et al. 2024, "MiniLLM: Knowledge Distillation of Large Language
    Models". Where the teacher has probability exactly 0 (−inf logit) and the student has mass, the
    true value is +inf; by default those terms are dropped, as the DistiLLM/TAID code does (so the
    value is a lower bound there), and ``strict=True`` returns +inf for such positions instead.
    """
    return kl_sum(log_q, log_p, strict=strict)


@token_divergence
def skew_kl(log_q: Tensor, log_p: Tensor, *, alpha: float = 0.1, value_form: ValueForm = "kl") -> Tensor:
    """Skew forward KL ``SKL_α = KL(p ‖ α·p + (1−α)·q)``.

    Ko et al. 2024, "DistiLLM: Towards Streamlined Distillation for Large Language Models". α = 0 is
    forward KL, α = 1 gives 0; the mixture keeps ``log(p/m) ≤ log(1/α)``, bounding the gradient.
    Gradient flows through the student inside the mixture (nothing detached, as in the paper's code).
    ``value_form="ce"`` returns DistiLLM's ``−Σ p log m``.
    """
    check_unit_interval("alpha", alpha)
    return kl_sum(log_p, log_mixture(log_p, log_q, alpha), cross_entropy=wants_cross_entropy(value_form))


@token_divergence
def skew_reverse_kl(log_q: Tensor, log_p: Tensor, *, alpha: float = 0.1, strict: bool = False) -> Tensor:
    """Skew reverse KL ``SRKL_α = KL(q ‖ (1−α)·p + α·q)``.

    Ko et al. 2024, "DistiLLM: Towards Streamlined Distillation for Large Language Models". α = 0 is
    reverse KL (with its teacher-zero rule, see :func:`reverse_kl`); for α > 0 the mixture is positive
    wherever q is, so the value is always finite. Gradient flows through the mixture and through the
    expectation weights q.
    """
    check_unit_interval("alpha", alpha)
    return kl_sum(log_q, log_mixture(log_p, log_q, 1.0 - alpha), strict=strict)


def _mixture_jsd(log_q: Tensor, log_p: Tensor, beta: float) -> Tensor:
    """``β·KL(p‖m) + (1−β)·KL(q‖m)`` with ``m = β·p + (1−β)·q`` (student inside m keeps its grad)."""
    log_m = log_mixture(log_p, log_q, beta)
    return beta * kl_sum(log_p, log_m) + (1.0 - beta) * kl_sum(log_q, log_m)


@token_divergence
def jensen_shannon(log_q: Tensor, log_p: Tensor) -> Tensor:
    """Jensen–Shannon divergence ``½·KL(p‖m) + ½·KL(q‖m)``, ``m = ½(p + q)``; bounded by ln 2.

    Lin 1991, "Divergence Measures Based on the Shannon Entropy". Equals :func:`generalized_jsd`
    at β = ½.
    """
    return _mixture_jsd(log_q, log_p, 0.5)


@token_divergence
def generalized_jsd(log_q: Tensor, log_p: Tensor, *, beta: float = 0.5) -> Tensor:
    """Generalized JSD exactly as TRL's ``GKDTrainer.generalized_jsd_loss``.

    Agarwal et al. 2024, "On-Policy Distillation of Language Models: Learning from Self-Generated
    Mistakes" (GKD). For 0 < β < 1, with ``m_β = β·p + (1−β)·q`` (p = teacher, q = student):
    ``GJSD_β = β·KL(p‖m_β) + (1−β)·KL(q‖m_β)``. TRL special-cases the endpoints, and so do we so
    that numbers carry over: **β = 0 returns forward KL(p‖q), β = 1 returns reverse KL(q‖p)**. Those
    are the limits of ``GJSD_β/β`` and ``GJSD_β/(1−β)``, not of ``GJSD_β`` itself (which tends to 0),
    so the value is discontinuous at the endpoints. DistiLLM's ``js_distance(lam=0.9)`` and TAID's
    ``JS(teacher_weight=0.1)`` are this loss with β = 0.1.
    """
    check_unit_interval("beta", beta)
    if beta == 0.0:
        return kl_sum(log_p, log_q)
    if beta == 1.0:
        return kl_sum(log_q, log_p)
    return _mixture_jsd(log_q, log_p, beta)


@token_divergence
def total_variation(log_q: Tensor, log_p: Tensor) -> Tensor:
    """Total variation distance ``½·Σ_v |p_v − q_v|`` ∈ [0, 1].

    Used as a distillation objective by Wen et al. 2023, "f-Divergence Minimization for
    Sequence-Level Knowledge Distillation". The gradient is a subgradient (0 where p_v = q_v).
    """
    return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)
