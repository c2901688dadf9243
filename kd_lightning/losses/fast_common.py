"""Shared machinery of the fast KD path: the result type, loss resolution, per-chunk statistics.

Used by :mod:`~kd_lightning.losses.fast` (plain rows and the fused lm_head path); the per-divergence
closed forms live in :mod:`~kd_lightning.losses.fast_rows`.
"""

from __future__ import annotations

import functools
import math
import inspect
from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor

import kd_lightning.losses.adaptive as adaptive
import kd_lightning.losses.divergences as divergences
from kd_lightning.losses.common import log_probs
from kd_lightning.losses.fast_rows import ROW_KERNELS

CHUNK_ELEMENTS = 1 << 16
"""Auto chunk: about 2^16 float32 entries (256 KiB) per chunk temporary, so a chunk's handful of
temporaries stay in L2 and are reused by the allocator (no page faults). Measured at V = 32k and
128k, 1 thread, forward KL fwd+bwd over 1024 rows: 1-2 rows per chunk were 15-30% faster than 8-32
rows (the Python overhead per chunk, ~0.1 ms, is noise next to a row of 32k-128k entries)."""


class KDTerms(NamedTuple):
    kd_sum: Tensor  # scalar Σ_rows w·D_T(student row, teacher row); differentiable w.r.t. the student
    ce_sum: Tensor | None  # scalar Σ_rows student CE at T=1 (differentiable); None when ce=False
    teacher_token_ce: Tensor | None  # [M] detached teacher CE at T=1; None without targets
    student_token_ce: Tensor | None  # [M] detached student CE at T=1; None without targets


_PUBLIC = {getattr(module, name): name for name in ROW_KERNELS for module in (divergences, adaptive)
           if hasattr(module, name)}


def resolve(loss_fn: Callable[..., Tensor]) -> tuple[Callable[..., Any], dict[str, Any]] | None:
    """(row kernel, bound params) for a public loss or a keyword-only partial of one; None otherwise."""
    params: dict[str, Any] = {}
    fn = loss_fn
    while isinstance(fn, functools.partial):
        if fn.args:
            return None
        params = {**fn.keywords, **params}
        fn = fn.func
    name = _PUBLIC.get(fn)
    if name is None:
        return None
    kernel = ROW_KERNELS[name]
    accepted = set(list(inspect.signature(kernel).parameters)[3:])
    params.pop("reduction", None)  # the fast path always sums; the caller normalises
    if set(params) - accepted:
        return None
    return kernel, params


def supports_fast(loss_fn: Callable[..., Tensor]) -> bool:
    """True when :func:`fast_kd_terms` handles ``loss_fn``: one of forward_kl, reverse_kl, skew_kl,
    skew_reverse_kl, jensen_shannon, generalized_jsd, total_variation, adaptive_kl, taid (or a
    ``functools.partial`` binding only their parameters). ``sparse_kl`` has its own entry point,
    :func:`fast_sparse_kd_terms`; ``online_sparse_kl`` (random draws inside the loss) and ``uld``
    (cross-vocabulary, sorted probabilities) keep the reference path."""
    return resolve(loss_fn) is not None


def chunk_rows(vocab: int, chunk_tokens: int | None) -> int:
    if chunk_tokens is None:
        return max(1, CHUNK_ELEMENTS // max(vocab, 1))
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    return chunk_tokens


def student_stats(z: Tensor, lq: Tensor, targets: Tensor | None, temperature: float
                  ) -> tuple[Tensor | None, Tensor | None]:
    """(student token CE at T=1, student logsumexp at T=1) of a chunk, from its log-probs at T when T=1."""
    if targets is None:
        return None, None
    index = targets.clamp_min(0).unsqueeze(1)
    target_logit = z.gather(1, index).squeeze(1).float()
    if temperature == 1.0:
        token_ce = lq.gather(1, index).squeeze(1).neg()
        lse = token_ce + target_logit
    else:
        lse = torch.logsumexp(z.float(), dim=-1)
        token_ce = lse - target_logit
    return token_ce.masked_fill_(targets < 0, 0.0), lse


def teacher_token_ce(t: Tensor, lp: Tensor, targets: Tensor, temperature: float) -> Tensor:
    """Teacher CE at T=1 of a chunk: ``−log p[target]`` from the kernel's log-probs when T=1."""
    index = targets.clamp_min(0).unsqueeze(1)
    if temperature == 1.0:
        token_ce = lp.gather(1, index).squeeze(1).neg()
    else:
        token_ce = torch.logsumexp(t.float(), dim=-1) - t.gather(1, index).squeeze(1).float()
    return token_ce.masked_fill_(targets < 0, 0.0)


def dense_kernel(kernel: Callable[..., Any], params: dict[str, Any], temperature: float) -> Callable[..., Any]:
    """Chunk function ``(lq, teacher_chunk, targets_chunk, want_grad) -> (values, grad_s, teacher CE)``."""
    def run(lq: Tensor, teacher: Tensor, targets: Tensor | None, want_grad: bool) -> tuple[Tensor, Any, Any]:
        lp = log_probs(teacher, temperature)
        t_ce = None if targets is None else teacher_token_ce(teacher, lp, targets, temperature)
        values, grad = kernel(lq, lp, want_grad, **params)
        return values, grad, t_ce
    return run


def sparse_tail_terms(mode: str, value_form: str, lq: Tensor, picked: Tensor, p_t: Tensor,
                      q_outside: Tensor | None) -> tuple[Tensor, Tensor]:
    """The tail term of `sparse_kl` per row, and the row's tail coefficient for the gradient.

    ``lq`` [M, V] student log-probabilities, ``picked`` [M, k] their values at the listed ids S,
    ``p_t`` [M] the teacher's tail mass (0 where there is none). ``uniform``: the tail spread as
    ``u = p_t / (V − k)`` per id, value ``p_t log u − u Σ_{v∉S} log q_v``, coefficient ``u`` (the
    gradient off S is ``q_j·W − u``). ``bucket``: ``q_outside`` [M, V] the student's probabilities
    with S zeroed, ``q_t`` their sum (never ``1 − Σ_S q``, which cancels for a confident student),
    value ``p_t (log p_t − log q_t)``, coefficient ``p_t / q_t`` (the gradient off S is
    ``q_j (W − p_t/q_t)``). ``value_form="ce"`` drops the ``p_t log p_t`` part. Shared by the
    chunked kernel below and the fused step in `kd_lightning.losses.fast`."""
    log_p_t = torch.where(p_t > 0, p_t, 1.0).log()
    if mode == "uniform":
        others = lq.shape[1] - picked.shape[1]
        u = p_t / others
        outside = lq.sum(-1) - picked.sum(-1)  # Σ_{v∉S} log q_v
        value = -u * outside if value_form == "ce" else p_t * (log_p_t - math.log(others)) - u * outside
        return value, u
    assert q_outside is not None
    q_t = q_outside.sum(-1).clamp_min(torch.finfo(torch.float32).tiny)
    value = p_t * (-q_t.log() if value_form == "ce" else log_p_t - q_t.log())
    return value, p_t / q_t


def sparse_kernel(value_form: str, tail: str = "bucket") -> Callable[..., Any]:
    """Forward KL against sparse targets: ``a = −p̂`` scattered to the target ids (kept terms only).

    A target ``(indices, probs, p_tail)`` adds the tail term of :func:`~kd_lightning.losses.sparse.sparse_kl`
    (``tail``: ``bucket`` | ``uniform``; ``drop`` ignores it). Bucket: ``q_t`` is the sum of the
    student's probabilities over the ids outside S (the listed entries zeroed in place, from the
    exponentials the gradient needs anyway; not ``1 − Σ_S q``, which cancels when the student is
    confident), ``∂/∂z_j = q_j (Σp̂ + p_t) − p̂_j`` on S and ``q_j (Σp̂ + p_t − p_t / q_t)`` elsewhere.
    With a tail the listed ids of a row must be distinct (a top-k's are)."""
    def run(lq: Tensor, target: tuple[Tensor, ...], labels: Tensor | None, want_grad: bool) -> tuple[Tensor, Any, None]:
        indices, probs = target[0], target[1].float()
        p_t = target[2].float() if len(target) > 2 and target[2] is not None and tail != "drop" else None
        if p_t is not None and indices.shape[1] >= lq.shape[1]:
            p_t = None  # no id outside S: the tail is rounding only
        picked = lq.gather(1, indices)
        keep = (probs > 0) & ~torch.isneginf(picked)
        weight = torch.where(keep, probs, 0.0)
        log_target = torch.where(keep, probs.log(), 0.0)
        diff = picked.neg() if value_form == "ce" else log_target - picked
        values = (weight * torch.where(keep, diff, 0.0)).sum(-1)
        if p_t is None:
            if not want_grad:
                return values, None, None
            grad = lq.exp_().mul_(weight.sum(-1, keepdim=True)).scatter_add_(1, indices, weight.neg())
            return values, grad, None
        has = p_t > 0
        p_t = torch.where(has, p_t, 0.0)
        total = weight.sum(-1) + p_t
        q = None if tail == "uniform" else lq.exp_().scatter_(1, indices, 0.0)  # the student's probabilities outside S
        tail_value, coefficient = sparse_tail_terms(tail, value_form, lq, picked, p_t, q)
        values = values + torch.where(has, tail_value, 0.0)
        if not want_grad:
            return values, None, None
        if tail == "uniform":
            grad = lq.exp_().mul_(total.unsqueeze(1)).sub_(coefficient.unsqueeze(1))
        else:
            grad = q.mul_((total - coefficient).unsqueeze(1))
        # the listed ids: q_j (Σp̂ + p_t) − p̂_j, written over what the row factor gave them
        return values, grad.scatter_(1, indices, picked.exp() * total.unsqueeze(1) - weight), None
    return run


def ce_grad_chunk(logits: Tensor, lse: Tensor, targets: Tensor) -> Tensor:
    """``softmax(logits) − onehot(targets)`` in float32 for a chunk (rows with label < 0: zero)."""
    valid = (targets >= 0).float().unsqueeze(1)
    grad = logits.float().sub_(lse.unsqueeze(1)).exp_().mul_(valid)
    return grad.scatter_add_(1, targets.clamp_min(0).unsqueeze(1), valid.neg())


def check_rows(count: int, temperature: float, ce: bool, targets: Tensor | None, token_weight: Tensor | None) -> None:
    """Validate the per-row arguments shared by every fast entry point."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if ce and targets is None:
        raise ValueError("ce=True needs targets")
    for name, x in (("targets", targets), ("token_weight", token_weight)):
        if x is not None and tuple(x.shape) != (count,):
            raise ValueError(f"{name} shape {tuple(x.shape)} does not match the {count} rows")


def weighted_sum(values: Tensor, weight: Tensor | None) -> Tensor:
    """``Σ w·values``; a zero-weight row adds nothing, even where its value is +inf (strict RKL)."""
    if weight is None:
        return values.sum()
    return torch.where(weight != 0, values * weight, 0.0).sum()
