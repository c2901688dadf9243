"""Shared machinery of the closed-form KD terms: the result type, loss resolution, the row pass and
per-chunk statistics.

Used by :mod:`~kd_lightning.losses.fast` (logit rows, sparse targets) and
:mod:`~kd_lightning.losses.chunked` (the chunked LM head); the per-divergence closed forms live in
:mod:`~kd_lightning.losses.fast_rows`.
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
    if temperature != 1.0:
        return logits_token_ce(z, targets)
    index = targets.clamp_min(0).unsqueeze(1)
    token_ce = lq.gather(1, index).squeeze(1).neg()
    lse = token_ce + z.gather(1, index).squeeze(1).float()
    return token_ce.masked_fill_(targets < 0, 0.0), lse


def logits_token_ce(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """(token CE at T=1, logsumexp) of chunk logits ``[c, V]`` in float32: ``lse − logits[target]``
    (rows with label < 0: CE 0)."""
    lse = torch.logsumexp(logits.float(), dim=-1)
    token_ce = lse - logits.gather(1, targets.clamp_min(0).unsqueeze(1)).squeeze(1).float()
    return token_ce.masked_fill_(targets < 0, 0.0), lse


def teacher_token_ce(t: Tensor, lp: Tensor, targets: Tensor, temperature: float) -> Tensor:
    """Teacher CE at T=1 of a chunk: ``−log p[target]`` from the kernel's log-probs when T=1."""
    if temperature != 1.0:
        return logits_token_ce(t, targets)[0]
    token_ce = lp.gather(1, targets.clamp_min(0).unsqueeze(1)).squeeze(1).neg()
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


def take_rows(teacher: Any, rows: slice) -> Any:
    """Rows of a teacher chunk: dense logits, or each part of a sparse target tuple."""
    return tuple(part[rows] for part in teacher) if isinstance(teacher, tuple) else teacher[rows]


def stats_buffers(count: int, has_targets: bool, device: torch.device) -> tuple[Tensor, Tensor, Tensor | None]:
    """Token-CE buffers (student, teacher) and the student logsumexp at T=1, empty without targets."""
    s_ce = torch.empty(count if has_targets else 0, dtype=torch.float32, device=device)
    return s_ce, torch.empty_like(s_ce), (torch.empty_like(s_ce) if has_targets else None)


def rows_pass(z: Tensor, teacher: Any, targets: Tensor | None, weight: Tensor | None, run: Callable[..., Any],
              temperature: float, chunk: int, grad: Tensor | None, stats: tuple[Tensor, Tensor, Tensor | None]) -> Tensor:
    """Σ w·D over rows ``z [n, V]`` in chunks of ``chunk`` rows; writes ``w·∂D/∂z`` into ``grad [n, V]``
    (when given) and the token statistics into ``stats = (student CE, teacher CE, student lse)``."""
    s_ce, t_ce, lse = stats
    kd = torch.zeros((), dtype=torch.float32, device=z.device)
    for start in range(0, z.shape[0], chunk):
        rows = slice(start, start + chunk)
        zc, tgt = z[rows], (None if targets is None else targets[rows])
        lq = log_probs(zc, temperature)
        if tgt is not None:
            s_ce[rows], lse[rows] = student_stats(zc, lq, tgt, temperature)
        values, grad_s, teacher_ce = run(lq, take_rows(teacher, rows), tgt, grad is not None)
        w = None if weight is None else weight[rows].float()
        kd += weighted_sum(values, w)
        if teacher_ce is not None:
            t_ce[rows] = teacher_ce
        if grad_s is not None:
            # One write into the gradient buffer: the scaling goes straight to its destination.
            torch.mul(grad_s, 1.0 / temperature if w is None else w.unsqueeze(1) / temperature, out=grad[rows])
    return kd


def finish_terms(ctx: Any, kd: Tensor, stats: tuple[Tensor, Tensor, Tensor | None], ce: bool) -> tuple[Tensor, ...]:
    """The Functions' outputs: (kd_sum, ce_sum, teacher token CE, student token CE); CE stats detached."""
    s_ce, t_ce, _ = stats
    ctx.mark_non_differentiable(t_ce, s_ce)
    return kd, (s_ce.sum() if ce else kd.new_zeros(())), t_ce, s_ce


def handover(ctx: Any) -> Any:
    """The gradients stored by forward, taken once: they are rescaled in place by backward."""
    state, ctx.state = ctx.state, None
    if state is None:
        raise RuntimeError("KD terms support one backward pass per forward (gradients are made in forward and handed "
                           "over); recompute them to backpropagate again")
    return state
