"""Weights that may be sharded (FSDP2 `fully_shard`, parameters as `DTensor`): read them whole.

Everything that reads parameters directly (saving the student, comparing runs, the chunked loss's
heads) goes through these helpers, so the unsharded case stays a plain read.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


def is_sharded(module: nn.Module) -> bool:
    """True when any parameter of `module` is a `DTensor` (FSDP2 / tensor parallel)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


def full_tensor(tensor: Tensor | None) -> Tensor | None:
    """The whole tensor of a `DTensor` (a collective: every rank must call it), else the tensor."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def full_state_dict(module: nn.Module) -> dict[str, Any]:
    """A full, unsharded CPU state dict of `module` (a collective when sharded; then only rank 0 gets
    the tensors, the other ranks an empty dict)."""
    if not is_sharded(module):
        return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                 broadcast_from_rank0=False))
