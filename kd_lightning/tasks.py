"""Task adapters: everything that differs between a causal LM and a classifier, in one place.

The module, evaluation, the teacher-output stores and the callbacks ask the adapter instead of
branching on the task themselves:

- `logits(model, batch)`: the model's raw output logits for a batch;
- `align(logits, labels)`: logits at position t predict token t+1 in a causal LM (the shift);
  classifier outputs are already aligned;
- `labels(batch)`: the aligned labels, with `IGNORE_INDEX` where a position does not count;
- `mask(labels)`: bool mask of counted positions;
- `rows(outputs, mask)`: the counted positions' rows of unaligned outputs, selected once;
- `builder_kwargs(datamodule, seed)`: what every model builder gets from the data.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

IGNORE_INDEX = -100
"""Label of a position that does not count (prompt, padding): the Hugging Face convention."""


class CausalLM:
    """`transformers` causal LMs: batches with `input_ids`, `attention_mask`, unshifted `labels`."""

    name = "causal_lm"

    @staticmethod
    def logits(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        return model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits

    @staticmethod
    def align(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        return logits[:, :-1], labels[:, 1:]

    @staticmethod
    def labels(batch: dict[str, Tensor]) -> Tensor:
        return batch["labels"][:, 1:]

    @staticmethod
    def rows(x: Tensor, mask: Tensor) -> Tensor:
        """Rows ``[M, ...]`` of the counted positions of an *unaligned* output ``x [B, L, ...]``
        (logits or hidden states), ``mask [B, L-1]`` from the aligned labels: one `index_select` of
        the flattened tensor, no copy of the shifted ``x[:, :-1]`` (its backward is one index_add)."""
        return x.reshape(-1, *x.shape[2:]).index_select(0, CausalLM.row_index(mask))

    @staticmethod
    def row_index(mask: Tensor) -> Tensor:
        """The flat indices into an unaligned ``[B, L, ...]`` output that `rows` selects."""
        return F.pad(mask, (0, 1)).reshape(-1).nonzero().squeeze(1)

    @staticmethod
    def builder_kwargs(datamodule: Any, seed: int) -> dict[str, Any]:
        return {"vocab_size": datamodule.vocab_size, "tokenizer": datamodule.tokenizer, "seed": seed}

    @staticmethod
    def mask(labels: Tensor) -> Tensor:
        return labels != IGNORE_INDEX


class Classification:
    """Any classifier `nn.Module` mapping `inputs` [B, F] to logits [B, C]; `labels` [B]."""

    name = "classification"

    @staticmethod
    def logits(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        return model(batch["inputs"])

    @staticmethod
    def align(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        return logits, labels

    @staticmethod
    def labels(batch: dict[str, Tensor]) -> Tensor:
        return batch["labels"]

    @staticmethod
    def rows(x: Tensor, mask: Tensor) -> Tensor:
        """Rows ``[M, ...]`` of the counted examples of ``x [B, ...]``."""
        return x.index_select(0, Classification.row_index(mask))

    @staticmethod
    def row_index(mask: Tensor) -> Tensor:
        return mask.nonzero().squeeze(1)

    @staticmethod
    def builder_kwargs(datamodule: Any, seed: int) -> dict[str, Any]:
        return {"num_features": datamodule.num_features, "num_classes": datamodule.num_classes, "seed": seed}

    @staticmethod
    def mask(labels: Tensor) -> Tensor:
        return labels != IGNORE_INDEX


Task = type[CausalLM] | type[Classification]
TASKS: dict[str, Task] = {CausalLM.name: CausalLM, Classification.name: Classification}


def task_named(name: str) -> Task:
    """The adapter of a datamodule's `task` string."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; one of {sorted(TASKS)}") from None


def task_of_model(model: nn.Module) -> Task:
    """A `transformers` generative model is a causal LM; anything else is a classifier."""
    return CausalLM if hasattr(model, "generate") else Classification


__all__ = ["IGNORE_INDEX", "CausalLM", "Classification", "Task", "task_named", "task_of_model"]
