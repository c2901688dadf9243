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

from kd_lightning.infra.sharding import is_fsdp


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
    if is_fsdp(model):
        return _hidden_through_root(model, batch), head
    outputs = model.base_model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
    return outputs.last_hidden_state, head


def _hidden_through_root(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """FSDP2 (`strategy=fsdp`): the final hidden states from the sharded model's own forward.

    Calling `model.base_model` directly would skip the root's FSDP hooks, so the root's parameters
    (embeddings, final norm, head) would stay sharded and their gradients would never be
    reduce-scattered. The root forward runs instead, with `logits_to_keep=1` (one position's logits,
    discarded), and a forward hook on the base model keeps its `last_hidden_state`. FSDP2 keeps the
    root's parameters gathered after its forward, so the head's `weight` read next is the whole,
    unsharded parameter; gradients into it are reduce-scattered with the root's at the end of backward.
    A frozen teacher's root is resharded by the module after its step (`reshard_frozen`)."""
    captured: list[Tensor] = []

    def keep(_module: nn.Module, _args: object, output: object) -> None:
        captured.append(output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0])  # type: ignore[index]

    handle = model.base_model.register_forward_hook(keep)
    try:
        model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), logits_to_keep=1)
    finally:
        handle.remove()
    return captured[-1]


def _chunk_ce(rows: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor) -> Tensor:
    return F.cross_entropy(F.linear(rows, weight, bias).float(), targets, reduction="none")


def chunked_token_ce(rows: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, chunk_size: int) -> Tensor:
    """Per-token CE [M] of counted rows [M, H] under the head `rows @ weight.T + bias`; each chunk's
    logits are recomputed in backward (activation checkpointing) instead of being kept."""
    pieces = []
    for start in range(0, rows.shape[0], chunk_size):
        chunk = slice(start, start + chunk_size)
        if torch.is_grad_enabled() and rows.requires_grad:
            pieces.append(checkpoint(_chunk_ce, rows[chunk], weight, bias, targets[chunk], use_reentrant=False))
        else:
            pieces.append(_chunk_ce(rows[chunk], weight, bias, targets[chunk]))
    return torch.cat(pieces) if pieces else rows.new_zeros(0)
