"""Weights that may be sharded (FSDP2 `fully_shard`, parameters as `DTensor`): read them whole.

Everything that reads parameters directly (saving the student, comparing runs, the chunked loss's
heads) goes through these helpers, so the unsharded case stays a plain read.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from kd_lightning.infra.shard_init import materialise, mmap_large_allocations


def is_sharded(module: nn.Module) -> bool:
    """True when any parameter of `module` is a `DTensor` (FSDP2 / tensor parallel)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


def is_fsdp(module: nn.Module) -> bool:
    """True when `module` itself was wrapped by FSDP2's `fully_shard` (its forward gathers its weights)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def full_tensor(tensor: Tensor | None) -> Tensor | None:
    """The whole tensor of a `DTensor` (a collective: every rank must call it), else the tensor."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def full_state_dict(module: nn.Module, all_ranks: bool = False) -> dict[str, Any]:
    """A full, unsharded CPU state dict of `module`. Sharded, it is a collective: every rank must
    call it; only rank 0 gets the tensors (the others an empty dict) unless `all_ranks`."""
    if not is_sharded(module):
        return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=not all_ranks))
    return {k: v.detach().cpu() for k, v in state.items()}


def unsharded(model: nn.Module, build: Callable[[], nn.Module]) -> nn.Module:
    """`model` itself when it is not sharded, else a fresh `build()` holding its gathered weights on
    every rank (a collective): what saving, caching and the held-out summary read. When `build()`
    makes the model inside a wrapper (`teacher_outputs.reuse` wraps the teacher it stores), the
    wrapped model's weights are gathered."""
    if not is_sharded(model):
        return model
    fresh = build()
    inner = model._modules.get("model")
    # (fully_shard swaps a module's class for an FSDP subclass of it: compare with isinstance)
    source = inner if isinstance(inner, type(fresh)) and not isinstance(model, type(fresh)) else model
    fresh.load_state_dict(full_state_dict(source, all_ranks=True))
    return fresh


def bf16_supported() -> bool:
    """bf16 parameters pay off where the accelerator computes in bf16 natively (CUDA with bf16)."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def mixed_precision_policy(mode: str) -> Any:
    """FSDP2 `MixedPrecisionPolicy`: "bf16" (bf16 parameters and compute, fp32 gradient reduction),
    "fp32" (none), "auto" (bf16 where `bf16_supported()`, else fp32: CPU runs stay exact)."""
    if mode not in ("auto", "bf16", "fp32"):
        raise ValueError(f"mixed_precision must be 'auto', 'bf16' or 'fp32', got {mode!r}")
    if mode == "fp32" or (mode == "auto" and not bf16_supported()):
        return None
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def block_classes(model: nn.Module) -> set[str]:
    """Class names of a model's transformer blocks: transformers' `_no_split_modules` (the layers
    it never splits across devices), e.g. {"LlamaDecoderLayer"}; empty for other models."""
    return set(getattr(model, "_no_split_modules", None) or [])


def shard_model(model: nn.Module, mesh: Any, mp_policy: Any = None, keep_whole: set[nn.Parameter] | None = None,
                reshard_after_forward: bool = True, device: torch.device | str = "cpu") -> nn.Module:
    """FSDP2: `fully_shard` each transformer block, then the model (its root: embeddings, head, norm).
    A model built on the meta device (`shard_init.defer`) is then materialised on `device`, each
    process filling only its own shards (`shard_init.materialise`).

    `keep_whole`: parameters left out of sharding (FSDP2's `ignored_params`), plain replicated tensors
    on every process, e.g. the teacher routers SAR trains; their owners compute in the parameters'
    dtype (inputs are cast to it when a mixed-precision policy casts the rest).
    `reshard_after_forward=False`: blocks stay gathered from their forward to their backward (no
    second all-gather in backward; more memory during the step, the same between steps). The root
    always keeps FSDP2's default (gathered after its forward; the chunked loss relies on it)."""
    from torch.distributed.fsdp import fully_shard

    kwargs: dict[str, Any] = {"mesh": mesh}
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    if keep_whole:
        kwargs["ignored_params"] = set(keep_whole)
        if mp_policy is not None:
            owners = {sub for sub in model.modules() if any(p in keep_whole for p in sub.parameters(recurse=False))}
            for owner in owners:
                owner.register_forward_pre_hook(_cast_inputs_to_own_dtype)
    blocks = block_classes(model)
    for sub in list(model.modules()):
        if sub is not model and type(sub).__name__ in blocks:
            fully_shard(sub, reshard_after_forward=reshard_after_forward, **kwargs)
    fully_shard(model, **kwargs)  # the root keeps FSDP2's default: gathered after forward (backward needs it first)
    materialise(model, device)
    return model


def _cast_inputs_to_own_dtype(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    dtype = next(module.parameters(recurse=False)).dtype
    return tuple(a.to(dtype) if isinstance(a, Tensor) and a.is_floating_point() else a for a in args)


def reshard_frozen(model: nn.Module) -> None:
    """After a frozen model's no-grad forward FSDP2 keeps its root parameters gathered (it expects
    a backward); free them so a teacher holds ~1/N of its weights per process between steps. A
    wrapper (KA routing, stored outputs) reshards the sharded model inside it."""
    root = next((sub for sub in model.modules() if is_fsdp(sub)), None)
    if root is not None:
        root.reshard()  # type: ignore[operator]


def checkpoint_activations(model: nn.Module) -> None:
    """Activation checkpointing of a transformers model's blocks (transformers' own
    `gradient_checkpointing_enable`, non-reentrant, which FSDP2 supports): a block's activations are
    recomputed in backward instead of kept from forward. Same gradients, less memory, a second
    forward of every block."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"student_activation_checkpointing: {type(model).__name__} does not support gradient "
                         "checkpointing (a transformers model with checkpointable blocks does)")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})  # type: ignore[operator]


def shard_distillation(module: Any, mesh: Any, mp_policy: Any = None, student_reshard_after_forward: bool = True,
                       device: torch.device | str = "cpu", student_activation_checkpointing: bool = False) -> None:
    """Shard a `DistillationModule` in place: every frozen teacher and the student, per block.

    The chunked loss reads the heads' weights after each model's root forward, when FSDP2 holds them
    gathered (`kd_lightning.lean`). A wrapped teacher (KA routing, `teacher_outputs.reuse`) has the
    model inside it sharded. Teacher parameters a callback trains (SAR's routers,
    `train_teacher_parameters`) are kept whole and replicated, as under DDP: the callback all-reduces
    their gradients and checkpoints them like a DDP run. A teacher of offline sparse targets holds no
    weights and stays as it is."""
    from transformers import PreTrainedModel

    if is_sharded(module.student):
        return  # configure_model runs again for a later fit/validate on the same module
    for name, teacher in module.teachers.items():
        if getattr(teacher, "sparse_targets", False):
            continue
        trained = {p for key, p in teacher.named_parameters() if f"teachers.{name}.{key}" in module.trainable_teacher_keys}
        inner = teacher._modules.get("model")  # a wrapper's model: KA routing, stored outputs (teacher_outputs)
        if not isinstance(teacher, PreTrainedModel) and isinstance(inner, PreTrainedModel):
            shard_model(inner, mesh, mp_policy, trained, device=device)  # the wrapper's hooks and store stay outside
            continue
        if not isinstance(teacher, PreTrainedModel) and module.task == "causal_lm":
            raise NotImplementedError(f"teacher '{name}' is a {type(teacher).__name__}, not a transformers model nor a "
                                      "wrapper of one (`.model`); strategy=fsdp cannot shard it")
        shard_model(teacher, mesh, mp_policy, trained, device=device)
    if student_activation_checkpointing:
        checkpoint_activations(module.student)
    shard_model(module.student, mesh, mp_policy, reshard_after_forward=student_reshard_after_forward, device=device)


def _model_parallel_strategy() -> type:
    from lightning.pytorch.strategies import ModelParallelStrategy

    return ModelParallelStrategy


class ShardedDataParallel(_model_parallel_strategy()):  # type: ignore[misc]
    """`strategy=fsdp`: Lightning's `ModelParallelStrategy` with every process data-parallel (no tensor
    parallelism) and FSDP2 sharding from `DistillationModule.configure_model`. gloo on CPU, NCCL on
    GPUs (Lightning picks the backend from the accelerator).

    Args:
        mixed_precision: see `mixed_precision_policy` ("auto": bf16 parameters with fp32 gradient
            reduction where the accelerator supports bf16, else fp32).
        student_reshard_after_forward: false keeps each student block gathered from its forward to
            its backward (one all-gather per block and step instead of two, ZeRO-2-like during the
            step; the student's memory between steps is still 1/N). Teachers, which have no
            backward, are always resharded after each block.
        student_activation_checkpointing: recompute each student block's activations in backward
            instead of keeping them from forward (`checkpoint_activations`): same gradients, less
            activation memory, one more forward of the student's blocks per step.
    """

    def __init__(self, mixed_precision: str = "auto", student_reshard_after_forward: bool = True,
                 student_activation_checkpointing: bool = False, **kwargs: Any) -> None:
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1, **kwargs)
        self.mixed_precision = mixed_precision
        self.student_reshard_after_forward = bool(student_reshard_after_forward)
        self.student_activation_checkpointing = bool(student_activation_checkpointing)
        mixed_precision_policy(mixed_precision)  # validate early

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()
        if self.root_device.type == "cpu":  # memory FSDP frees goes back to the system (see the function)
            mmap_large_allocations()

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """Lightning's sharded load expects every module key in the checkpoint; frozen teacher weights
        are left out of ours (rebuilt from config), so the model loads what is stored and keeps the rest."""
        from pathlib import Path

        path = Path(self.broadcast(checkpoint_path))
        if not path.is_dir():  # a single-file (full) checkpoint
            return super().load_checkpoint(path, weights_only=weights_only)
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict, set_optimizer_state_dict)

        state = {"state_dict": get_model_state_dict(self.model)}
        dcp.load(state, checkpoint_id=path, planner=dcp.DefaultLoadPlanner(allow_partial_load=True))
        self.model.load_state_dict(state["state_dict"])
        for index, optimizer in enumerate(self.optimizers):
            key = f"optimizer_{index}"
            optimizer_state = {key: get_optimizer_state_dict(self.model, optimizer)}
            dcp.load(optimizer_state, checkpoint_id=path)
            set_optimizer_state_dict(self.model, optimizer, optim_state_dict=optimizer_state[key],
                                     options=StateDictOptions(cpu_offload=True))
        return torch.load(path / "meta.pt", weights_only=weights_only)

    @property
    def mp_policy(self) -> Any:
        return mixed_precision_policy(self.mixed_precision)

    @property
    def data_parallel_mesh(self) -> Any:
        return self.device_mesh["data_parallel"]
