"""Fast KD terms at real vocabularies: closed-form gradients, token-chunked, one pass over ``[M, V]``.

At V = 32k-128k the divergence over ``[tokens, V]`` dominates the KD step, and every freshly
allocated full-vocabulary temporary costs its page faults. The functions here walk the counted rows
in cache-sized chunks (reused by the allocator): per chunk they compute both log-softmaxes in
float32, the divergence value and its gradient w.r.t. the student logits in closed form
(:mod:`~kd_lightning.losses.fast_rows`), the student/teacher token CE statistics from the same
log-probabilities, and write the gradient once into one ``[M, V]`` buffer that backward rescales in
place. The autograd graph holds no intermediate, and nothing is built for CE when ``ce=False``.

API (rows are the counted positions, already selected by the caller; sums, not means)::

    supports_fast(loss_fn) -> bool
    fast_kd_terms(loss_fn, student_logits [M, V], teacher_logits [M, V], targets [M] | None, *,
                  temperature, token_weight [M] | None = None, ce=False, chunk_tokens=None) -> KDTerms
    fast_sparse_kd_terms(student_logits [M, V], targets: SparseTargets [M, k], labels [M] | None, *,
                         temperature, token_weight=None, ce=False, value_form="kl",
                         chunk_tokens=None, tail="bucket") -> KDTerms
        (at T = 1 with ce=True and a gradient: the fused `_SparseCE`, which keeps q once and writes
        the CE + KD gradient in one pass in backward; otherwise the chunked kernel below)

``kd_sum = Σ_rows w·D_T(row)`` (no T², no mean), ``ce_sum = Σ_rows CE_{T=1}`` (unweighted; rows with
label < 0 count 0), token CEs detached float32 ``[M]``. At T = 1 the student CE comes from the very
log-probabilities the divergence uses; at T ≠ 1 one extra logsumexp of the raw logits per chunk.
Fast paths: forward_kl, reverse_kl, skew_kl, skew_reverse_kl, jensen_shannon, generalized_jsd
(β endpoints = forward / reverse KL), total_variation, adaptive_kl, taid (all parameters, incl.
value_form="ce" and strict) and sparse_kl (:func:`fast_sparse_kd_terms`). Without one:
``online_sparse_kl`` (draws random sparse targets inside the loss: build them with
``sample_targets``/``topk_targets`` and call :func:`fast_sparse_kd_terms`) and ``uld``
(cross-vocabulary, sorted probabilities: no per-row closed form over a shared vocabulary).
The same kernels, fed from hidden states and the LM head chunk by chunk, are
:func:`~kd_lightning.losses.chunked.chunked_kd_terms`. Each result supports one backward pass (gradients are computed in forward and handed over; backward
only rescales them, plus the CE softmax when ``ce``). Under ``torch.no_grad()`` no gradient work is
done. Half-precision inputs are computed in float32; gradients come back in the input dtype.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from kd_lightning.losses.common import log_probs
from kd_lightning.losses.fast_common import (
    KDTerms,
    ce_grad_chunk,
    check_rows,
    chunk_rows,
    dense_kernel,
    finish_terms,
    handover,
    resolve,
    rows_pass,
    sparse_kernel,
    sparse_tail_terms,
    stats_buffers,
    supports_fast,
    weighted_sum,
)
from kd_lightning.losses.sparse import SparseTargets, check_tail_mode

__all__ = ["KDTerms", "fast_kd_terms", "fast_sparse_kd_terms", "supports_fast"]


class _FastKD(torch.autograd.Function):
    """student [M, V] -> (kd_sum, ce_sum, teacher token CE, student token CE); grads made in forward."""

    @staticmethod
    def forward(ctx: Any, student: Tensor, teacher: Any, targets: Tensor | None, weight: Tensor | None,
                run: Callable[..., Any], temperature: float, ce: bool, chunk: int, want_grad: bool
                ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        grad = torch.empty_like(student) if want_grad else None
        stats = stats_buffers(student.shape[0], targets is not None, student.device)
        kd = rows_pass(student, teacher, targets, weight, run, temperature, chunk, grad, stats)
        ctx.state = (grad, student if ce and want_grad else None, stats[2], targets, chunk)
        return finish_terms(ctx, kd, stats, ce)

    @staticmethod
    def backward(ctx: Any, g_kd: Tensor, g_ce: Tensor, *_: Any) -> tuple[Tensor | None, ...]:
        grad, student, lse, targets, chunk = handover(ctx)
        if grad is None:
            return (None,) * 9
        grad.mul_(g_kd)  # ours alone: rescaled in place and handed over
        if student is not None:
            for start in range(0, student.shape[0], chunk):
                rows = slice(start, start + chunk)
                grad[rows] += ce_grad_chunk(student[rows], lse[rows], targets[rows]).mul_(g_ce).to(grad.dtype)
        return (grad,) + (None,) * 8


def _terms(student: Tensor, teacher: Any, targets: Tensor | None, run: Callable[..., Any], *, temperature: float,
           token_weight: Tensor | None, ce: bool, chunk_tokens: int | None) -> KDTerms:
    if student.dim() != 2:
        raise ValueError(f"student_logits must be rows [M, V], got {tuple(student.shape)}")
    check_rows(student.shape[0], temperature, ce, targets, token_weight)
    want_grad = torch.is_grad_enabled() and student.requires_grad
    weight = None if token_weight is None else token_weight.detach()
    kd, ce_sum, t_ce, s_ce = _FastKD.apply(student, teacher, targets, weight, run, temperature, ce,
                                           chunk_rows(student.shape[1], chunk_tokens), want_grad)
    has = targets is not None
    return KDTerms(kd, ce_sum if ce else None, t_ce if has else None, s_ce if has else None)


def _resolved(loss_fn: Callable[..., Tensor], temperature: float) -> Callable[..., Any]:
    resolved = resolve(loss_fn)
    if resolved is None:
        raise ValueError(f"no fast path for loss {loss_fn!r}; check supports_fast() and fall back to the reference loss")
    return dense_kernel(*resolved, temperature)


def fast_kd_terms(loss_fn: Callable[..., Tensor], student_logits: Tensor, teacher_logits: Tensor, targets: Tensor | None,
                  *, temperature: float, token_weight: Tensor | None = None, ce: bool = False,
                  chunk_tokens: int | None = None) -> KDTerms:
    """KD (and optionally CE) sums over counted rows ``[M, V]`` with closed-form gradients.

    ``loss_fn`` is a public divergence of :mod:`kd_lightning.losses` or a ``functools.partial``
    binding its parameters; ``kd_sum`` equals ``Σ w · loss_fn(row, reduction="none")`` of the reference
    to float32 rounding, value and gradient. ``chunk_tokens`` rows at a time (None: about 256 KiB of
    float32 per temporary). Raises ``ValueError`` without a fast path (see :func:`supports_fast`).
    """
    run = _resolved(loss_fn, temperature)
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"teacher rows {tuple(teacher_logits.shape)} do not match student rows {tuple(student_logits.shape)}")
    return _terms(student_logits, teacher_logits.detach(), targets, run, temperature=temperature,
                  token_weight=token_weight, ce=ce, chunk_tokens=chunk_tokens)


def fast_sparse_kd_terms(student_logits: Tensor, targets: SparseTargets, labels: Tensor | None, *, temperature: float,
                         token_weight: Tensor | None = None, ce: bool = False, value_form: str = "kl",
                         chunk_tokens: int | None = None, tail: str = "bucket") -> KDTerms:
    """:func:`~kd_lightning.losses.sparse_kl` summed (token-weighted) over rows ``[M, V]`` against sparse
    targets ``[M, k]`` in closed form: ``∂/∂s = q·Σp̂ − p̂`` (p̂ scattered to its ids). The temperature
    applies to the student only, as in the reference; ``teacher_token_ce`` is None (no dense teacher).
    Targets with a ``tail`` get ``sparse_kl``'s tail term (``tail``: bucket | uniform | drop)."""
    if value_form not in ("kl", "ce"):
        raise ValueError(f"value_form must be 'kl' or 'ce', got {value_form!r}")
    check_tail_mode(tail)
    if targets.indices.shape[:-1] != student_logits.shape[:-1] or targets.probs.shape != targets.indices.shape:
        raise ValueError(f"sparse targets {tuple(targets.indices.shape)} do not match rows {tuple(student_logits.shape)}")
    parts: tuple[Tensor, ...] = (targets.indices, targets.probs.detach())
    if targets.tail is not None and tail != "drop":
        if targets.tail.shape != student_logits.shape[:-1]:
            raise ValueError(f"sparse target tail {tuple(targets.tail.shape)} does not match rows {tuple(student_logits.shape)}")
        parts = (*parts, targets.tail.detach())
    fused = (ce and temperature == 1.0 and labels is not None and student_logits.dim() == 2 and torch.is_grad_enabled()
             and student_logits.requires_grad)
    if fused:  # the common case (T = 1, CE in the loss): one softmax, one gradient pass
        check_rows(student_logits.shape[0], temperature, ce, labels, token_weight)
        rows = chunk_tokens or max(1, SPARSE_CHUNK_ELEMENTS // max(student_logits.shape[1], 1))
        kd, ce_sum, s_ce = _SparseCE.apply(student_logits, targets.indices, targets.probs.detach(),
                                              parts[2] if len(parts) > 2 else None, labels,
                                              None if token_weight is None else token_weight.detach(), tail, value_form, rows)
        return KDTerms(kd, ce_sum, None, s_ce)
    terms = _terms(student_logits, parts, labels, sparse_kernel(value_form, tail),
                   temperature=temperature, token_weight=token_weight, ce=ce, chunk_tokens=chunk_tokens)
    return terms._replace(teacher_token_ce=None)


SPARSE_CHUNK_ELEMENTS = 1 << 20  # the fused sparse path's rows per chunk: few Python rounds at a small V


class _SparseCE(torch.autograd.Function):
    """`sparse_kl` + CE at T = 1, fused: forward keeps the student's probabilities q once (the listed
    ids zeroed) and backward writes ``g_ce·(q − y) + c·(q·W − p̂)`` (plus the tail's term) in one pass,
    instead of the KD gradient in forward and a recomputed softmax for CE in backward.

    Per row: ``W = Σp̂ + p_t``; off S the gradient is ``q_j·a`` with ``a = c·(W − p_t/q_t) + g_ce``
    (bucket), ``c·W + g_ce`` and ``− c·u`` (uniform) or ``c·W + g_ce`` (no tail); the listed ids are
    then written exactly, ``q_j (c·W + g_ce) − c·p̂_j`` (scatter, then scatter_add: repeated ids
    add their p̂), and ``−g_ce`` is added at the label. ``c = g_kd · w``."""

    @staticmethod
    def forward(ctx: Any, student: Tensor, indices: Tensor, probs: Tensor, tail: Tensor | None, labels: Tensor,
                weight: Tensor | None, mode: str, value_form: str, chunk: int) -> tuple[Tensor, Tensor, Tensor]:
        count, vocab = student.shape
        q = torch.empty(student.shape, dtype=torch.float32, device=student.device)
        s_ce = torch.empty(count, dtype=torch.float32, device=student.device)
        picked_q = torch.empty(indices.shape, dtype=torch.float32, device=student.device)
        row_tail = torch.zeros(count, dtype=torch.float32, device=student.device)  # p_t / q_t (bucket) or u
        keep_w = torch.empty(indices.shape, dtype=torch.float32, device=student.device)
        kd = torch.zeros((), dtype=torch.float32, device=student.device)
        has_tail = tail is not None and mode != "drop" and indices.shape[1] < vocab
        for start in range(0, count, chunk):
            rows = slice(start, start + chunk)
            lq = log_probs(student[rows])
            ids, p = indices[rows], probs[rows].float()
            lab = labels[rows]
            s_ce[rows] = lq.gather(1, lab.clamp_min(0).unsqueeze(1)).squeeze(1).neg().masked_fill_(lab < 0, 0.0)
            picked = lq.gather(1, ids)
            keep = (p > 0) & ~torch.isneginf(picked)
            w_kept = torch.where(keep, p, 0.0)
            diff = picked.neg() if value_form == "ce" else torch.where(keep, p.log(), 0.0) - picked
            values = (w_kept * torch.where(keep, diff, 0.0)).sum(-1)
            qc = torch.exp(lq, out=q[rows])
            picked_q[rows] = picked.exp()
            keep_w[rows] = w_kept
            if has_tail:
                p_t = tail[rows].float()
                on = p_t > 0
                p_t = torch.where(on, p_t, 0.0)
                q_outside = None if mode == "uniform" else qc.scatter_(1, ids, 0.0)
                tail_value, row_tail[rows] = sparse_tail_terms(mode, value_form, lq, picked, p_t, q_outside)
                values = values + torch.where(on, tail_value, 0.0)
            kd += weighted_sum(values, None if weight is None else weight[rows].float())
        w_row = keep_w.sum(-1)
        if has_tail:
            w_row += torch.where(tail.float() > 0, tail.float(), 0.0)
        ctx.state = (q, picked_q, keep_w, w_row, row_tail, indices, labels, weight, mode if has_tail else None,
                     student.dtype)
        ctx.mark_non_differentiable(s_ce)
        return kd, s_ce.sum(), s_ce

    @staticmethod
    def backward(ctx: Any, g_kd: Tensor, g_ce: Tensor, *_: Any) -> tuple[Tensor | None, ...]:
        q, picked_q, keep_w, w_row, row_tail, indices, labels, weight, mode, dtype = handover(ctx)
        c = g_kd.float().expand(q.shape[0]) if weight is None else g_kd.float() * weight.float()
        g_ce = g_ce.float() * (labels >= 0).float()  # per row: rows without a label have no CE
        on_s = (c * w_row + g_ce).unsqueeze(1)  # the row factor of q on the listed ids
        if mode == "bucket":
            factor = on_s - (c * row_tail).unsqueeze(1)
        else:
            factor = on_s
        grad = q.mul_(factor)
        if mode == "uniform":
            grad.sub_((c * row_tail).unsqueeze(1))
        grad.scatter_(1, indices, picked_q * on_s).scatter_add_(1, indices, keep_w * c.unsqueeze(1).neg())
        grad.scatter_add_(1, labels.clamp_min(0).unsqueeze(1), g_ce.neg().unsqueeze(1))
        return (grad.to(dtype),) + (None,) * 8
