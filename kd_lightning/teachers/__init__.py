"""How teacher outputs are produced beyond a plain frozen forward pass.

- `kd_lightning.teachers.moe`: router discovery for Mixture-of-Experts teachers and Knowledge
  Augmentation (stochastic expert routing, "Every Expert Matters").
- `augment_teacher(model, augment_cfg)`: the hook `kd_lightning.stages.obtain_teacher` applies to a
  teacher config's `augment:` node.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn


def distributed_rank() -> int:
    """Global rank under torch.distributed (or the launcher's RANK variable), 0 otherwise."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))


def rank_seeded_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch.Generator on `device` seeded with `seed` offset by the rank, so that DDP ranks draw
    different (but reproducible) random numbers; Python's `random` is never used in a step."""
    generator = torch.Generator(device=device)
    generator.manual_seed(int(seed) + 1_000_003 * distributed_rank())
    return generator


def augment_teacher(model: nn.Module, augment_cfg: Any) -> nn.Module:
    """Wrap a built teacher with its config's `augment` node, or return it unchanged when null.

    The node is a `_partial_` Hydra target called with `model=` (what the config group
    `teacher/augment=<option>` or the preset `teacher=moe_ka` puts there). A plain string such as
    `teacher.augment=ka` (a value override, which Hydra cannot turn into a group choice) names the
    option file `conf/teacher/augment/<string>.yaml`, loaded as that group would load it."""
    if augment_cfg is None:
        return model
    import hydra
    from omegaconf import OmegaConf

    if isinstance(augment_cfg, str):
        from kd_lightning.cli import CONFIG_DIR

        folder = Path(CONFIG_DIR) / "teacher" / "augment"
        option = folder / f"{augment_cfg}.yaml"
        if not option.is_file():
            choices = sorted(p.stem for p in folder.glob("*.yaml"))
            raise ValueError(f"teacher.augment={augment_cfg!r}: no option {option}; choose one of {choices}")
        augment_cfg = OmegaConf.load(option)
    factory = hydra.utils.instantiate(augment_cfg)
    return factory(model=model)


__all__ = ["augment_teacher", "distributed_rank", "rank_seeded_generator"]
