"""The memory-lean training step for causal LMs (`loss.chunk_size` set): the KD term and the CE
term are computed from final hidden states and the LM head chunk by chunk, so full `[tokens, V]`
logits never exist for either model.

Assumes `logits = lm_head(last_hidden_state)` (Llama, Mistral, Mixtral, Qwen2/Qwen2-MoE, OLMoE, GPT-2
...); models that rescale or soft-cap logits after the head are refused.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


def hidden_and_head(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, nn.Module]:
    """Final hidden states [B, L, H] (before the head) and the output head of a causal LM."""
    config = getattr(model, "config", None)
    for key in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale"):
        if getattr(config, key, None) not in (None, 1, 1.0):
            raise ValueError(f"loss.chunk_size: {type(model).__name__} post-processes its logits ({key}); "
                             "use the plain path (loss.chunk_size=null)")
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise ValueError(f"loss.chunk_size needs a linear LM head, {type(model).__name__} has {type(head).__name__}")
    outputs = model.base_model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
    return outputs.last_hidden_state, head


def _chunk_ce(rows: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor) -> Tensor:
    return F.cross_entropy(F.linear(rows, weight, bias).float(), targets, reduction="none")


def chunked_token_ce(rows: Tensor, head: nn.Module, targets: Tensor, chunk_size: int) -> Tensor:
    """Per-token CE [M] of counted rows [M, H]; each chunk's logits are recomputed in backward
    (activation checkpointing) instead of being kept."""
    pieces = []
    for start in range(0, rows.shape[0], chunk_size):
        chunk = slice(start, start + chunk_size)
        if torch.is_grad_enabled() and rows.requires_grad:
            pieces.append(checkpoint(_chunk_ce, rows[chunk], head.weight, head.bias, targets[chunk], use_reentrant=False))
        else:
            pieces.append(_chunk_ce(rows[chunk], head.weight, head.bias, targets[chunk]))
    return torch.cat(pieces) if pieces else rows.new_zeros(0)
