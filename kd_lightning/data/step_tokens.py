"""One token, one vote: every batch carries the number of counted tokens of its whole optimizer step.

An optimizer step sums the gradients of ``accumulate_grad_batches`` micro-batches on every rank. If
each micro-batch's loss were its own token mean, a token in a short batch would weigh more than one
in a long batch, and the gradient would depend on how the step's tokens were split (the problem
transformers and TRL solve with ``num_items_in_batch``). So the train loader reads one accumulation
window ahead, counts the window's labelled tokens, sums that count over the data-parallel ranks and
stamps it on each batch (``STEP_TOKENS_KEY``). The module then scales its token-mean loss by
``count / step_tokens * world_size * accumulate`` (see `token_share`): DDP averages gradients over
ranks and Lightning divides each micro-batch's loss by ``accumulate``, so the step's gradient is the
gradient of (sum of per-token losses of the step) / (counted tokens of the step).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from kd_lightning.infra.distributed import all_reduce_sums

STEP_TOKENS_KEY = "step_token_count"
"""Batch key of the optimizer step's counted tokens (all micro-batches, all ranks), a 0-d int64 tensor."""


def stamp_step_tokens(batches: Iterator[dict[str, Any]], accumulate: int, count: Callable[[dict[str, Any]], int],
                      already_done: int = 0) -> Iterator[dict[str, Any]]:
    """Yield ``batches`` with ``STEP_TOKENS_KEY`` set to their window's counted tokens over all ranks.

    Windows are those of Lightning's accumulation: ``accumulate`` consecutive batches from the start
    of the epoch, the last one shorter. ``already_done`` batches of this epoch were skipped (exact
    resume), so the first window holds the rest of the interrupted one. Every rank must yield the
    same number of batches (the per-rank sampler guarantees it): each window is one all-reduce."""
    if accumulate < 1:
        raise ValueError(f"trainer.accumulate_grad_batches must be >= 1, got {accumulate}")
    first = accumulate - already_done % accumulate
    iterator = iter(batches)
    size = first
    while True:
        window = []
        for batch in iterator:
            window.append(batch)
            if len(window) == size:
                break
        if not window:
            return
        total = torch.tensor(int(all_reduce_sums([sum(count(batch) for batch in window)])[0]), dtype=torch.int64)
        for batch in window:
            batch[STEP_TOKENS_KEY] = total
            yield batch
        size = accumulate


def token_share(count: Tensor, step_tokens: Tensor | None, world_size: int, accumulate: int) -> Tensor | float:
    """Factor turning a micro-batch's token-mean loss into its share of the step's token-sum loss:
    ``count / step_tokens * world_size * accumulate`` (1 when the batch is not stamped, e.g. outside
    the train loader). With one process, no accumulation and one batch per step it is exactly 1."""
    if step_tokens is None:
        return 1.0
    step = step_tokens.to(device=count.device, dtype=torch.float32).clamp_min(1)
    return count.to(torch.float32) / step * float(world_size * accumulate)


__all__ = ["STEP_TOKENS_KEY", "stamp_step_tokens", "token_share"]
