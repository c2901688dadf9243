"""Memory-lean distillation loss that never materialises the full ``[N, V]`` logits.

With V = 32k–150k and thousands of tokens, the student and teacher logits, their float32
log-softmaxes and the tensors autograd keeps for backward dominate training memory. The fused path
here walks the counted tokens in chunks: for each chunk it computes both heads' logits, the chunk's
summed loss and, right away, that loss's gradients w.r.t. the chunk's student hidden states and the
student head (weight, bias); then everything chunk-sized is freed. Backward only rescales the stored
gradients by the incoming gradient. Peak extra memory is O(chunk_size · V) plus one gradient the
size of the student head, instead of several O(N · V) tensors.

The chunk losses use the same loss functions with ``reduction="sum"``, and the total is divided by
the number of counted tokens, so the value equals the plain token-mean path up to float
reassociation. Losses with a closed-form fast path (:func:`~kd_lightning.losses.fast.supports_fast`)
go through :func:`~kd_lightning.losses.fast.fast_chunked_kd_terms` instead, which needs no autograd
graph per chunk and computes each chunk's head matmul once.
"""

from __future__ import annotations

from typing import Any, Callable

import functools

import torch
from torch import Tensor

from kd_lightning.losses.fast import fast_chunked_kd_terms, supports_fast

LossFn = Callable[..., Tensor]


def _head(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    logits = hidden @ weight.T
    return logits if bias is None else logits + bias


class _ChunkedDistill(torch.autograd.Function):
    """Inputs are already restricted to counted tokens: student_rows [M, H], teacher_rows [M, H2]."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        student_rows: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        teacher_rows: Tensor,
        teacher_weight: Tensor,
        teacher_bias: Tensor | None,
        loss_fn: LossFn,
        chunk_size: int,
        loss_kwargs: dict[str, Any],
    ) -> Tensor:
        need_rows, need_weight, need_bias = ctx.needs_input_grad[:3]
        need_bias = need_bias and bias is not None
        count = student_rows.shape[0]
        # Head gradients accumulate in (at least) float32 even for half-precision heads.
        acc = torch.promote_types(weight.dtype, torch.float32)
        grad_rows = torch.empty_like(student_rows) if need_rows else None
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=acc, device=bias.device) if need_bias else None
        differentiate = need_rows or need_weight or need_bias
        total = torch.zeros((), dtype=acc, device=student_rows.device)
        for start in range(0, count, chunk_size):
            rows = student_rows[start:start + chunk_size]
            teacher_logits = _head(teacher_rows[start:start + chunk_size], teacher_weight, teacher_bias)
            # Differentiate the chunk loss w.r.t. the chunk logits only; the linear head's chain rule
            # is applied by hand below, in place, so no per-chunk [V, H] gradient is ever allocated.
            logits = _head(rows, weight, bias).requires_grad_(differentiate)
            with torch.enable_grad():
                loss = loss_fn(logits, teacher_logits, None, reduction="sum", **loss_kwargs)
                grad_logits = torch.autograd.grad(loss, logits)[0] if differentiate else None
            total += loss.detach().to(acc)
            del loss, teacher_logits, logits
            if grad_rows is not None:
                grad_rows[start:start + chunk_size] = grad_logits @ weight
            if grad_weight is not None:
                grad_weight.addmm_(grad_logits.T.to(acc), rows.to(acc))
            if grad_bias is not None:
                grad_bias += grad_logits.sum(0, dtype=acc)
        scale = 1.0 / max(count, 1)
        ctx.grads = [None if grad is None else grad.mul_(scale).to(like.dtype)
                     for grad, like in ((grad_rows, student_rows), (grad_weight, weight), (grad_bias, bias))]
        return total * scale

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        # The stored gradients are ours alone, so they are rescaled in place and handed over.
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            raise RuntimeError(
                "chunked_distill_loss supports one backward pass per forward (its gradients are computed "
                "in forward and handed over); recompute the loss to backpropagate again"
            )
        scaled = [None if grad is None else grad.mul_(grad_output.to(grad.dtype)) for grad in grads]
        return (*scaled, None, None, None, None, None, None)


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
    bool (True = counts; None = all). ``loss_fn`` is any token-level divergence of this package (it is
    called per chunk with ``reduction="sum"``, ``temperature`` and ``**loss_params``). Returns the
    same scalar and student gradients as the plain path, computing at most ``chunk_size`` tokens'
    logits at a time; the teacher gets no gradient. With no counted token the result is 0 with a graph.
    Under ``torch.no_grad()`` (validation) no gradients are computed at all.
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
        # Masked tokens never reach a head: their gradient is exactly zero and they cost nothing.
        flat = mask.reshape(-1).bool()
        rows, teacher_rows = rows[flat], teacher_rows[flat]
    weight, bias = student_head_weight, student_head_bias
    if not torch.is_grad_enabled():
        # Nothing will call backward: detached inputs make the forward skip all gradient work.
        rows, weight = rows.detach(), weight.detach()
        bias = None if bias is None else bias.detach()
    fast_fn = functools.partial(loss_fn, **loss_params)
    if supports_fast(fast_fn) and teacher_head_weight.shape[0] == student_head_weight.shape[0]:
        terms = fast_chunked_kd_terms(fast_fn, rows, weight, bias, teacher_rows, teacher_head_weight,
                                      teacher_head_bias, None, temperature=temperature, chunk_size=chunk_size)
        return terms.kd_sum / max(rows.shape[0], 1)
    kwargs = {"temperature": temperature, **loss_params}
    teacher_weight = teacher_head_weight.detach()
    teacher_bias = None if teacher_head_bias is None else teacher_head_bias.detach()
    return _ChunkedDistill.apply(
        rows, weight, bias, teacher_rows, teacher_weight, teacher_bias,
        loss_fn, chunk_size, kwargs,
    )
