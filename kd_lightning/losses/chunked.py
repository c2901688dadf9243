"""The chunked LM head: CE and every KD divergence from final hidden states, never ``[tokens, V]``.

With V = 32k–150k and thousands of tokens, the student and teacher logits, their float32
log-softmaxes and the tensors autograd keeps for backward dominate training memory. This module
walks the counted rows in chunks: per chunk it applies both heads once, computes the KD term's value
and its gradient w.r.t. the chunk's student logits, the token CE statistics and (with ``ce``) the CE
gradient ``softmax − onehot``, and applies the linear head's chain rule by hand, in place, into
gradients w.r.t. the rows, W and b; then everything chunk-sized is freed. Backward only rescales
the stored gradients by the incoming ones. Peak extra memory is O(chunk_size · V) plus the
head-sized gradients (a second set with ``ce``), instead of several O(N · V) tensors.

The KD term of a chunk comes from one of two per-chunk terms, chosen in one place
(:func:`chunk_term`):

- the closed-form kernel of :mod:`~kd_lightning.losses.fast_rows`, when the loss has one
  (:func:`~kd_lightning.losses.fast.supports_fast`) and both heads share the vocabulary;
- otherwise the loss function itself on the chunk's logits (``reduction="sum"``), differentiated by
  autograd w.r.t. those chunk logits only (e.g. ``uld`` across vocabularies, wrapped losses).

API (rows are the counted positions; sums, not means)::

    chunked_kd_terms(loss_fn, student_rows [M, H], head_weight [V, H], head_bias | None,
                     teacher_rows [M, H2], teacher_head_weight [V', H2], teacher_head_bias | None,
                     targets [M] | None, *, temperature, token_weight=None, ce=False,
                     chunk_size) -> KDTerms
    chunked_distill_loss(student_hidden [..., H], student_head_weight, teacher_hidden [..., H2],
                         teacher_head_weight, mask [...] | None, loss_fn, *, chunk_size, ...) -> token mean
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
from torch import Tensor

from kd_lightning.losses.fast_common import (
    KDTerms,
    ce_grad_chunk,
    check_rows,
    chunk_rows,
    dense_kernel,
    finish_terms,
    handover,
    logits_token_ce,
    resolve,
    rows_pass,
    stats_buffers,
    weighted_sum,
)

LossFn = Callable[..., Tensor]
Stats = tuple[Tensor, Tensor, "Tensor | None"]  # (student token CE, teacher token CE, student lse) of a chunk
ChunkTerm = Callable[[Tensor, Tensor, "Tensor | None", "Tensor | None", Stats, "Tensor | None"], Tensor]
"""``term(z [c, V], teacher_logits [c, V'], targets [c] | None, token_weight [c] | None, stats, grad [c, V] | None)
-> Σ w·D`` of the chunk; writes ``∂(Σ w·D)/∂z`` into ``grad`` (float32) when given, and the token
statistics into ``stats`` when there are targets."""


def head_logits(rows: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``rows @ weight.T + bias``: a linear LM head applied to rows ``[c, H]``."""
    return torch.addmm(bias, rows, weight.T) if bias is not None else rows @ weight.T


def closed_form_term(run: Callable[..., Any], temperature: float) -> ChunkTerm:
    """A chunk's KD term from a closed-form row kernel (``dense_kernel``), in cache-sized sub-chunks."""
    def term(z: Tensor, teacher: Tensor, targets: Tensor | None, weight: Tensor | None, stats: Stats,
             grad: Tensor | None) -> Tensor:
        return rows_pass(z, teacher, targets, weight, run, temperature, chunk_rows(z.shape[1], None), grad, stats)
    return term


def autograd_term(loss_fn: LossFn, temperature: float) -> ChunkTerm:
    """A chunk's KD term from the loss function itself, differentiated w.r.t. the chunk logits only
    (the head's chain rule is applied by the caller, so no per-chunk ``[V, H]`` gradient exists)."""
    def term(z: Tensor, teacher: Tensor, targets: Tensor | None, weight: Tensor | None, stats: Stats,
             grad: Tensor | None) -> Tensor:
        s_ce, t_ce, lse = stats
        if targets is not None:
            s_ce[:], lse[:] = logits_token_ce(z, targets)  # type: ignore[index]
            t_ce[:] = logits_token_ce(teacher, targets)[0]
        logits = z.detach().requires_grad_(grad is not None)
        with torch.enable_grad():
            if weight is None:
                loss = loss_fn(logits, teacher, None, reduction="sum", temperature=temperature)
            else:
                loss = weighted_sum(loss_fn(logits, teacher, None, reduction="none", temperature=temperature),
                                    weight.float())
            if grad is not None:
                grad.copy_(torch.autograd.grad(loss, logits)[0])
        return loss.detach()
    return term


def chunk_term(loss_fn: LossFn, temperature: float, same_vocab: bool) -> ChunkTerm:
    """The one dispatch between the closed-form kernel and the loss function's own autograd."""
    resolved = resolve(loss_fn) if same_vocab else None
    if resolved is None:
        return autograd_term(loss_fn, temperature)
    return closed_form_term(dense_kernel(*resolved, temperature), temperature)


def _chain(buffers: list[Tensor | None], grad_logits: Tensor, rows: Tensor, weight: Tensor, span: slice,
           acc: torch.dtype) -> None:
    """The linear head's chain rule, accumulated in place: rows ← G·W, W += Gᵀ·x, b += Σ G."""
    grad_rows, grad_weight, grad_bias = buffers
    if grad_rows is not None:
        grad_rows[span] = grad_logits.to(weight.dtype) @ weight
    if grad_weight is not None:
        grad_weight.addmm_(grad_logits.T.to(acc), rows.to(acc))
    if grad_bias is not None:
        grad_bias += grad_logits.sum(0, dtype=acc)


class _ChunkedHead(torch.autograd.Function):
    """(rows, W, b, teacher rows, W_T, b_T, ...) -> (kd_sum, ce_sum, teacher token CE, student token CE);
    logits exist only chunk by chunk, gradients are made in forward."""

    @staticmethod
    def forward(ctx: Any, rows: Tensor, weight: Tensor, bias: Tensor | None, teacher_rows: Tensor, teacher_weight: Tensor,
                teacher_bias: Tensor | None, targets: Tensor | None, token_weight: Tensor | None, term: ChunkTerm,
                ce: bool, chunk: int, needs: tuple[bool, bool, bool]) -> tuple[Tensor, ...]:
        count, acc = rows.shape[0], torch.promote_types(weight.dtype, torch.float32)
        want_grad = any(needs)

        def buffers() -> list[Tensor | None]:
            return [torch.empty_like(rows) if needs[0] else None,
                    torch.zeros(weight.shape, dtype=acc, device=weight.device) if needs[1] else None,
                    torch.zeros(bias.shape, dtype=acc, device=bias.device) if needs[2] and bias is not None else None]

        grads = {"kd": buffers(), "ce": buffers() if ce and want_grad else None}
        kd = torch.zeros((), dtype=acc, device=rows.device)
        s_ce, t_ce, lse = stats_buffers(count, targets is not None, rows.device)
        inner = chunk_rows(weight.shape[0], None)
        grad_logits = None
        for start in range(0, count, chunk):
            span = slice(start, start + chunk)
            x, tgt = rows[span], (None if targets is None else targets[span])
            z = head_logits(x, weight, bias)  # the only student head matmul of this chunk: KD and CE share it
            teacher = head_logits(teacher_rows[span], teacher_weight, teacher_bias)
            if want_grad and (grad_logits is None or grad_logits.shape[0] != z.shape[0]):
                grad_logits = torch.empty(z.shape, dtype=torch.float32, device=z.device)  # reused across chunks
            stats = (s_ce[span], t_ce[span], None if lse is None else lse[span])
            w = None if token_weight is None else token_weight[span]
            kd += term(z, teacher, tgt, w, stats, grad_logits if want_grad else None)
            del teacher
            if want_grad:
                _chain(grads["kd"], grad_logits, x, weight, span, acc)
            if grads["ce"] is not None:
                for sub in range(0, z.shape[0], inner):
                    part = slice(sub, sub + inner)
                    grad_logits[part] = ce_grad_chunk(z[part], stats[2][part], tgt[part])
                _chain(grads["ce"], grad_logits, x, weight, span, acc)
        ctx.state = (grads, (rows, weight, bias))
        return finish_terms(ctx, kd, (s_ce, t_ce, lse), ce)

    @staticmethod
    def backward(ctx: Any, g_kd: Tensor, g_ce: Tensor, *_: Any) -> tuple[Tensor | None, ...]:
        grads, likes = handover(ctx)
        out = []
        for i, like in enumerate(likes):
            kd = grads["kd"][i]
            if kd is None:
                out.append(None)
                continue
            kd.mul_(g_kd.to(kd.dtype))  # ours alone: rescaled in place and handed over
            if grads["ce"] is not None:
                kd.add_(grads["ce"][i].mul_(g_ce.to(kd.dtype)))
            out.append(kd.to(like.dtype))
        return (*out,) + (None,) * 9


def chunked_kd_terms(loss_fn: LossFn, student_rows: Tensor, head_weight: Tensor, head_bias: Tensor | None,
                     teacher_rows: Tensor, teacher_head_weight: Tensor, teacher_head_bias: Tensor | None,
                     targets: Tensor | None, *, temperature: float, token_weight: Tensor | None = None,
                     ce: bool = False, chunk_size: int) -> KDTerms:
    """KD (and optionally CE) sums of ``student_rows @ W.T + b`` vs ``teacher_rows @ W_T.T + b_T``.

    ``kd_sum = Σ w · loss_fn(row, reduction="none")`` of the reference, ``ce_sum`` the summed student
    CE at T = 1, token CEs detached (see :class:`~kd_lightning.losses.fast_common.KDTerms`), values
    and student gradients equal to the plain path's up to float32 rounding. ``loss_fn`` is a public
    divergence of :mod:`kd_lightning.losses` or a ``functools.partial`` binding its parameters; the
    teacher's vocabulary may differ (V' ≠ V) for cross-vocabulary losses. Never holds ``[M, V]``:
    ``chunk_size`` rows' logits of both heads at a time; gradients w.r.t. the rows, W and b are
    accumulated during forward (float32 for half-precision heads). The teacher gets no gradient;
    under ``torch.no_grad()`` no gradient work is done. One backward pass per call.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if student_rows.dim() != 2 or teacher_rows.shape[:1] != student_rows.shape[:1]:
        raise ValueError(f"rows must be [M, H] and [M, H2], got {tuple(student_rows.shape)} and {tuple(teacher_rows.shape)}")
    check_rows(student_rows.shape[0], temperature, ce, targets, token_weight)
    term = chunk_term(loss_fn, temperature, teacher_head_weight.shape[0] == head_weight.shape[0])
    grad_on = torch.is_grad_enabled()
    needs = (grad_on and student_rows.requires_grad, grad_on and head_weight.requires_grad,
             grad_on and head_bias is not None and head_bias.requires_grad)
    detach = (lambda x: None if x is None else x.detach())
    kd, ce_sum, t_ce, s_ce = _ChunkedHead.apply(
        student_rows, head_weight, head_bias, teacher_rows.detach(), teacher_head_weight.detach(),
        detach(teacher_head_bias), targets, detach(token_weight), term, ce, chunk_size, needs)
    has = targets is not None
    return KDTerms(kd, ce_sum if ce else None, t_ce if has else None, s_ce if has else None)


def chunked_distill_loss(
    student_hidden: Tensor,
    student_head_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_head_weight: Tensor,
    mask: Tensor | None,
    loss_fn: LossFn,
    *,
    chunk_size: int,
    temperature: float = 1.0,
    student_head_bias: Tensor | None = None,
    teacher_head_bias: Tensor | None = None,
    **loss_params: Any,
) -> Tensor:
    """Token-mean ``loss_fn(student_hidden @ W_S.T + b_S, teacher_hidden @ W_T.T + b_T, mask)``, chunked.

    Shapes: hidden states ``[..., H]`` / ``[..., H2]`` (e.g. ``[N, H]`` or ``[B, L, H]``), head
    weights ``[V, H]`` / ``[V', H2]`` (V' = V except for cross-vocabulary losses), ``mask [...]``
    bool (True = counts; None = all). ``loss_fn`` is any token-level divergence of this package,
    ``**loss_params`` its parameters. The same scalar and student gradients as the plain path through
    :func:`chunked_kd_terms`; masked tokens never reach a head (their gradient is exactly zero). With
    no counted token the result is 0 with a graph.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if student_hidden.shape[:-1] != teacher_hidden.shape[:-1]:
        raise ValueError(
            f"student hidden {tuple(student_hidden.shape)} and teacher hidden {tuple(teacher_hidden.shape)} "
            "must share leading (token) dims"
        )
    rows = student_hidden.reshape(-1, student_hidden.shape[-1])
    teacher_rows = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])
    if mask is not None:
        if mask.shape != student_hidden.shape[:-1]:
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match tokens {tuple(student_hidden.shape[:-1])}")
        flat = mask.reshape(-1).bool()
        rows, teacher_rows = rows[flat], teacher_rows[flat]
    bound = functools.partial(loss_fn, **loss_params) if loss_params else loss_fn
    terms = chunked_kd_terms(bound, rows, student_head_weight, student_head_bias, teacher_rows, teacher_head_weight,
                             teacher_head_bias, None, temperature=temperature, chunk_size=chunk_size)
    return terms.kd_sum / max(rows.shape[0], 1)
