"""Small models, batches and trainer stand-ins shared by the unit tests (fixtures live in conftest.py)."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from transformers import LlamaConfig

from kd_lightning.models import build_causal_lm
from kd_lightning.tasks import IGNORE_INDEX

V = 40  # vocabulary of the tiny LMs

SHORT = ("trainer.max_steps=4", "trainer.val_check_interval=4")  # end-to-end runs: 4 steps, 1 validation


def tiny_lm(seed: int, hidden: int = 32, vocab: int = V) -> torch.nn.Module:
    config = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    return build_causal_lm(config, vocab_size=vocab, seed=seed)


def lm_batch(seed: int = 0, B: int = 3, L: int = 9) -> dict[str, torch.Tensor]:
    """Random ids with a prompt (row 0) and padding (row 2) masked out of the labels."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (B, L), generator=g)
    labels = ids.clone()
    labels[0, :4] = IGNORE_INDEX  # a prompt
    labels[2, -3:] = IGNORE_INDEX  # padding
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


class FakeStrategy:
    def __init__(self) -> None:
        self.reduced: list[str] = []

    def reduce(self, tensor: torch.Tensor, reduce_op: str = "mean") -> torch.Tensor:
        self.reduced.append(reduce_op)
        return tensor


def fake_trainer(max_steps: int, rank: int = 0) -> SimpleNamespace:
    """What the callbacks read from a Trainer."""
    return SimpleNamespace(global_step=0, max_steps=max_steps, global_rank=rank, strategy=FakeStrategy(),
                           sanity_checking=False, callback_metrics={})
