"""Shared numerics for the loss library: log-probabilities, safe KL sums, mixtures, reductions.

Every token-level divergence in this package is a *row function* (float32 log-probabilities of the
counted positions in, one value per position out) run through :func:`divergence`, which owns the
flattening, masking, temperature and reduction. Keeping that in one place is what makes all the
losses agree on the API contract (mask semantics, empty-mask behaviour, float32 accumulation).
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Callable, Literal

import torch
from torch import Tensor

Reduction = Literal["mean", "sum", "none", "seq_mean"]
ValueForm = Literal["kl", "ce"]
RowFn = Callable[[Tensor, Tensor], Tensor]
"""(student_log_probs [M, Vs], teacher_log_probs [M, Vt]) -> per-position values [M]."""


def check_unit_interval(name: str, value: float) -> None:
    """Raise a clear error naming the parameter when ``value`` is outside [0, 1]."""
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value}")


def wants_cross_entropy(value_form: str) -> bool:
    """Validate ``value_form`` ("kl" = true divergence, "ce" = reference-code CE form)."""
    if value_form not in ("kl", "ce"):
        raise ValueError(f"value_form must be 'kl' or 'ce', got {value_form!r}")
    return value_form == "ce"


def upcast(x: Tensor) -> Tensor:
    """Half precision to float32; float32/float64 unchanged (float64 keeps exact tests exact)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def log_probs(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """``log_softmax(logits / temperature)`` in (at least) float32 whatever the input dtype.

    bf16/fp16 log-softmax over 32k+ classes loses several digits; every reference (DistiLLM, TAID)
    upcasts first, so we do too.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logits = upcast(logits)
    return torch.log_softmax(logits if temperature == 1 else logits / temperature, dim=-1)


def all_finite(x: Tensor) -> bool:
    """True when no entry is ±inf or NaN, in one reduction: a sum is finite exactly when every
    entry is, except when finite entries overflow it (then False: callers take their careful path)."""
    return bool(torch.isfinite(x.detach().sum()))


def kl_sum(log_a: Tensor, log_b: Tensor, *, strict: bool = False, cross_entropy: bool = False) -> Tensor:
    """``Σ_v a_v (log a_v − log b_v)`` over the last dim, safe against zero probabilities.

    Terms with ``a_v = 0`` contribute 0 (the 0·log 0 = 0 convention), with no ``0 · −inf`` anywhere in
    the forward *or* backward graph (a plain ``where`` after the product would still back-propagate
    NaN). Terms with ``a_v > 0`` but ``b_v = 0`` make the true KL infinite: they are dropped, as in
    DistiLLM/TAID which zero every term at an infinite logit, unless ``strict`` is set, in which case
    the row's value is ``+inf``. With ``cross_entropy`` the ``log a`` term is omitted, giving
    ``−Σ a log b`` (the "CE form" some references return; same gradient w.r.t. ``b``).
    """
    diff = -log_b if cross_entropy else log_a - log_b
    if not strict and all_finite(log_a) and all_finite(log_b):
        # Fast path (the common case): no zero probability on either side, nothing to guard.
        return (log_a.exp() * diff).sum(-1)
    a = log_a.exp()
    b_zero = torch.isneginf(log_b)
    keep = (a > 0) & ~b_zero
    value = (a * torch.where(keep, diff, torch.zeros_like(diff))).sum(-1)
    if strict:
        # a_v > 0 and b_v == 0  =>  the divergence is +inf.
        infinite = ((a > 0) & b_zero).any(-1)
        value = torch.where(infinite, torch.full_like(value, math.inf), value)
    return value


def log_mixture(log_a: Tensor, log_b: Tensor, weight_a: float) -> Tensor:
    """``log(w·a + (1−w)·b)`` computed as a logsumexp of log-probabilities plus log-weights.

    ``log(w·exp(log_a) + ...)`` underflows to −inf when both probabilities are tiny; the logsumexp form
    does not (TRL computes its mixture this way). Entries where both inputs have zero mass get −inf
    with a zero (not NaN) gradient.
    """
    check_unit_interval("mixture weight", weight_a)
    x = log_a + (math.log(weight_a) if weight_a > 0 else -math.inf)
    y = log_b + (math.log1p(-weight_a) if weight_a < 1 else -math.inf)
    both_zero = torch.isneginf(x) & torch.isneginf(y)
    zero = torch.zeros_like(x)
    mixed = torch.logaddexp(torch.where(both_zero, zero, x), torch.where(both_zero, zero, y))
    return torch.where(both_zero, torch.full_like(mixed, -math.inf), mixed)


def masked_mean(values: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean of ``values`` over positions where ``mask`` is True; 0 (with a graph, no NaN) if none."""
    if mask is None:
        return values.mean()
    mask = mask.bool()
    total = torch.where(mask, values, torch.zeros_like(values)).sum()
    return total / mask.sum().clamp_min(1)


def check_mask(mask: Tensor | None, positions: torch.Size) -> Tensor | None:
    """Validate a position mask against the position shape and return it as bool."""
    if mask is None:
        return None
    if mask.shape != positions:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match positions {tuple(positions)}")
    return mask.bool()


def counted_rows(x: Tensor, mask: Tensor | None) -> Tensor:
    """``x [..., D]`` flattened to the rows of counted positions ``[M, D]`` (mask order)."""
    rows = x.reshape(-1, x.shape[-1])
    return rows if mask is None else rows[mask.reshape(-1)]


def reduce_positions(values: Tensor, mask: Tensor | None, shape: torch.Size, reduction: Reduction) -> Tensor:
    """Reduce per-position values of the *counted* positions only.

    ``values`` holds one entry per counted position (mask order); ``shape`` is the full position
    shape. "mean" = token-mean over counted positions (0 with a graph when none count), "sum",
    "none" = values scattered to ``shape`` with exact zeros at masked positions, "seq_mean" = mean
    over counted positions of each sequence (last position dim), then over sequences with at least
    one counted position (old TRL GKD loop, ULD).
    """
    if reduction == "sum":
        return values.sum()
    if reduction == "mean":
        # Sum of an empty tensor is 0 and still depends on the logits, so no NaN and the graph stays.
        return values.sum() / max(values.numel(), 1)
    if mask is None:
        full = values.reshape(shape)
    else:
        full = torch.zeros(shape, dtype=values.dtype, device=values.device).masked_scatter(mask, values)
    if reduction == "none":
        return full
    if reduction == "seq_mean":
        if len(shape) < 2:
            raise ValueError(f"reduction='seq_mean' needs positions shaped [..., L], got {tuple(shape)}")
        counted = torch.ones(shape, dtype=torch.bool, device=values.device) if mask is None else mask
        per_seq = full.sum(-1) / counted.sum(-1).clamp_min(1)
        has_tokens = counted.any(-1)
        return per_seq.sum() / has_tokens.sum().clamp_min(1)
    raise ValueError(f"reduction must be 'mean', 'sum', 'none' or 'seq_mean', got {reduction!r}")


def divergence(
    row_fn: RowFn,
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None,
    *,
    temperature: float,
    reduction: Reduction,
    same_vocab: bool = True,
) -> Tensor:
    """Run a per-position divergence over ``[..., V]`` logits with the package's API contract.

    Only counted positions are gathered before any math, so garbage at masked positions (padding
    rows of −inf, NaN) can change neither the value nor the gradient, and masked prompt tokens cost
    no compute. The price is one copy of the counted rows of both logits; where memory matters, use
    :func:`~kd_lightning.losses.chunked_distill_loss`. The teacher is detached.
    """
    lead = student_logits.shape[:-1]
    if teacher_logits.shape[:-1] != lead:
        raise ValueError(
            f"student and teacher logits must share leading dims, got {tuple(student_logits.shape)} "
            f"and {tuple(teacher_logits.shape)}"
        )
    if same_vocab and teacher_logits.shape[-1] != student_logits.shape[-1]:
        raise ValueError(
            f"vocab sizes differ (student {student_logits.shape[-1]}, teacher {teacher_logits.shape[-1]}); "
            "only cross-vocabulary losses such as `uld` accept that"
        )
    mask = check_mask(mask, lead)
    student = counted_rows(student_logits, mask)
    teacher = counted_rows(teacher_logits.detach(), mask)
    values = row_fn(log_probs(student, temperature), log_probs(teacher, temperature))
    return reduce_positions(values, mask, lead, reduction)


def token_divergence(row: Callable[..., Tensor] | None = None, *, same_vocab: bool = True) -> Callable:
    """Turn a row function into a public loss with the package's standard signature.

    ``row(student_log_probs [M, Vs], teacher_log_probs [M, Vt], *, **params) -> [M]`` receives the
    float32 log-probabilities (temperature applied) of the counted positions only; the decorated
    function is ``fn(student_logits, teacher_logits, mask=None, *, temperature=1.0,
    reduction="mean", **params)``. Writing each divergence as a row function keeps masking,
    temperature and reduction in one place (:func:`divergence`). ``same_vocab=False`` lets the two
    vocabularies differ (cross-tokenizer losses).
    """
    if row is None:
        return functools.partial(token_divergence, same_vocab=same_vocab)
    row_params = [param.replace(kind=inspect.Parameter.KEYWORD_ONLY)
                  for param in list(inspect.signature(row).parameters.values())[2:]]
    allowed = {param.name for param in row_params}

    def loss(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None, *,
             temperature: float = 1.0, reduction: Reduction = "mean", **params: object) -> Tensor:
        unknown = set(params) - allowed
        if unknown:
            raise TypeError(f"{row.__name__}() got unexpected parameter(s) {sorted(unknown)}; accepts {sorted(allowed)}")
        return divergence(
            functools.partial(row, **params), student_logits, teacher_logits, mask,
            temperature=temperature, reduction=reduction, same_vocab=same_vocab,
        )

    standard = list(inspect.signature(loss).parameters.values())[:-1]  # all but **params
    # The public signature is the standard one plus the row's parameters, not the row's own.
    functools.update_wrapper(loss, row, assigned=("__module__", "__name__", "__qualname__", "__doc__"))
    del loss.__wrapped__
    loss.__signature__ = inspect.Signature(standard + row_params, return_annotation="Tensor")
    return loss
