"""Models built on the meta device and filled only after FSDP2 has sharded them (`strategy=fsdp`).

A model built under `torch.device("meta")` holds shapes, no storage. `fully_shard` turns each
parameter into a `DTensor` whose local shard is still meta; `materialise` then allocates the local
shards (`to_empty`) and fills them from the model's weight source, so no process ever holds the
whole model:

- `SafetensorsWeights` (a `from_pretrained` model): every process reads only the rows of its own
  shard of each tensor from the `save_pretrained` directory (`safe_open(...).get_slice`).
- `BuiltOnRank0` (a model built from config): initialised once, on rank 0, exactly as one process
  would initialise it (the builders seed the init), then scattered one tensor at a time, each
  process keeping its shard (`set_model_state_dict(..., broadcast_from_rank0=True)`). Rank 0 holds
  that model whole while it sends it; the other processes never do.

Buffers that are not in a state dict (rotary `inv_freq`) are computed again by transformers' own
`_init_weights` for the modules that own them. `mmap_large_allocations` makes the memory a sharded
run frees on CPU leave the resident set.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor, nn

WEIGHT_SOURCE = "kd_weight_source"  # the attribute of a deferred model naming where its weights come from


class WeightSource(Protocol):
    def fill(self, model: nn.Module) -> None:
        """Write the local shard of every parameter (and persistent buffer) of the sharded `model`."""


def defer(model: nn.Module, source: WeightSource) -> nn.Module:
    """Mark a meta-device `model` as filled from `source` once sharded (`materialise`)."""
    object.__setattr__(model, WEIGHT_SOURCE, source)  # a plain attribute, not a submodule or state
    return model


def is_meta(model: nn.Module) -> bool:
    """True when any parameter or buffer of `model` (or its local shard) has no storage yet."""
    tensors = [*model.parameters(), *model.buffers()]
    return any((t.to_local() if hasattr(t, "to_local") else t).is_meta for t in tensors)


def shard_bounds(size: int, parts: int, index: int) -> tuple[int, int]:
    """Rows [start, stop) of part `index` when `size` rows are split in `parts` as `torch.chunk`
    splits them (and FSDP2 shards dim 0): ceil(size / parts) rows a part, the last ones shorter or empty."""
    step = math.ceil(size / parts) if size else 0
    start = min(index * step, size)
    return start, min(start + step, size)


def local_index(tensor: Tensor) -> tuple[slice, ...]:
    """The slice of the whole tensor that this process's shard of the `DTensor` `tensor` holds
    (every slice full for a plain tensor or a replicated dimension)."""
    index = [slice(0, n) for n in tensor.shape]
    if not hasattr(tensor, "placements"):
        return tuple(index)
    mesh = tensor.device_mesh
    coordinate = mesh.get_coordinate()
    for mesh_dim, placement in enumerate(tensor.placements):
        if not placement.is_shard():
            continue
        dim = placement.dim  # type: ignore[attr-defined]
        if index[dim] != slice(0, tensor.shape[dim]):
            raise NotImplementedError(f"tensor dimension {dim} is sharded over two mesh dimensions")
        index[dim] = slice(*shard_bounds(tensor.shape[dim], mesh.size(mesh_dim), coordinate[mesh_dim]))
    return tuple(index)


@dataclass(frozen=True)
class SafetensorsWeights:
    """The weights of a `save_pretrained` directory: `model.safetensors`, or several files listed by
    `model.safetensors.index.json`. Each process reads only its own rows of each tensor."""

    directory: Path

    def files(self) -> dict[str, Path]:
        """Tensor name -> the file holding it (the header only is read)."""
        from safetensors import safe_open

        index = self.directory / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            return {name: self.directory / file for name, file in weight_map.items()}
        single = self.directory / "model.safetensors"
        with safe_open(str(single), framework="pt") as handle:
            return {name: single for name in handle.keys()}

    def missing(self, model: nn.Module) -> list[str]:
        """State-dict keys of `model` the files do not hold (tied weights are stored once)."""
        held = set(self.files())
        return [name for name in _stored_tensors(model) if name not in held]

    @torch.no_grad()
    def fill(self, model: nn.Module) -> None:
        from safetensors import safe_open

        files = self.files()
        for name, tensor in _stored_tensors(model).items():
            if name not in files:
                raise KeyError(f"{self.directory}: no tensor {name!r} in its safetensors files")
            local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
            if not local.numel():
                continue
            # opened (memory-mapped) per tensor: the file pages a read touches count in this
            # process's resident memory until the mapping closes, so at most one tensor's rows do
            with safe_open(str(files[name]), framework="pt") as handle:
                local.copy_(handle.get_slice(name)[local_index(tensor)])


@dataclass(frozen=True)
class BuiltOnRank0:
    """A model initialised whole on rank 0 by `build()` (the same values one process gets) and
    scattered tensor by tensor: each process keeps its shard, and only rank 0 ever holds it whole."""

    build: Callable[[], nn.Module]

    @torch.no_grad()
    def fill(self, model: nn.Module) -> None:
        import torch.distributed as dist
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        whole = self.build().state_dict() if dist.get_rank() == 0 else {}
        set_model_state_dict(model, whole, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def materialise(model: nn.Module, device: torch.device | str) -> None:
    """Give a sharded meta-device `model` storage on `device` and fill it from its weight source
    (a collective for `BuiltOnRank0`: every process calls it). A model with storage is left alone."""
    if not is_meta(model):
        return
    source: WeightSource | None = getattr(model, WEIGHT_SOURCE, None)
    if source is None:
        raise ValueError(f"{type(model).__name__} was built on the meta device without a weight source (`defer`)")
    model.to_empty(device=device)
    source.fill(model)
    _init_unsaved_buffers(model)


def _stored_tensors(model: nn.Module) -> dict[str, Tensor]:
    """Parameters (a tied one under its first name) and persistent buffers, by state-dict key."""
    tensors = dict(model.named_parameters())
    persistent = set(model.state_dict(keep_vars=True))
    tensors.update({name: b for name, b in model.named_buffers() if name in persistent})
    return tensors


@torch.no_grad()
def _init_unsaved_buffers(model: nn.Module) -> None:
    """Buffers left out of the state dict (rotary `inv_freq`) are computed from the config, as at
    construction, by transformers' `_init_weights` of the modules owning them."""
    persistent = set(model.state_dict(keep_vars=True))
    owners = {name.rpartition(".")[0] for name, _ in model.named_buffers() if name not in persistent}
    if not owners:
        return
    init = getattr(model, "_init_weights", None)
    if init is None:
        raise ValueError(f"{type(model).__name__} has buffers outside its state dict ({sorted(owners)}) and no "
                         "`_init_weights` to compute them after materialisation")
    for name in owners:
        owner = model.get_submodule(name)
        if any(True for _ in owner.parameters(recurse=False)):
            raise ValueError(f"{name}: a module with both parameters and unsaved buffers cannot be re-initialised alone")
        init(owner)


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def mmap_large_allocations(threshold: int = 128 * 1024) -> bool:
    """glibc (Linux): serve every allocation above `threshold` bytes with its own mmap, returned to the
    system as soon as it is freed. By default glibc raises that threshold after the first large free
    (up to 32 MiB), so the blocks FSDP gathers and frees one after another, and a step's activations,
    stay in the heap once freed and count as resident memory: on 2 CPU processes with the 135M teacher
    the peak per process fell from 2.2 / 1.9 GB to 1.15 / 1.15 GB with it (docs/benchmarks.md). True when set."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # another C library (musl)
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold))
