"""A causal LM's final hidden states and linear output head, for the chunked LM head
(`loss.chunk_size`, `kd_lightning.losses.chunked`): full `[tokens, V]` logits are never built.

Assumes `logits = lm_head(last_hidden_state)` (Llama, Mistral, Mixtral, Qwen2/Qwen2-MoE, OLMoE, GPT-2
...); `check_linear_head` refuses models that rescale or soft-cap logits after the head.
"""

from __future__ import annotations

from torch import Tensor, nn

from kd_lightning.infra.sharding import is_fsdp


def check_linear_head(model: nn.Module) -> None:
    """Refuse, naming the model, a causal LM whose logits are not `lm_head(last_hidden_state)`."""
    config = getattr(model, "config", None)
    for key in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale"):
        if getattr(config, key, None) not in (None, 1, 1.0):
            raise ValueError(f"loss.chunk_size: {type(model).__name__} post-processes its logits ({key}); "
                             "use the plain path (loss.chunk_size=null)")
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise ValueError(f"loss.chunk_size needs a linear LM head, {type(model).__name__} has {type(head).__name__}")


def hidden_and_head(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, nn.Linear]:
    """Final hidden states [B, L, H] (before the head) and the output head of a causal LM (checked
    once by `check_linear_head`)."""
    head = model.get_output_embeddings()
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
