"""`stage=cache_teacher`: the (single) teacher's offline sparse targets for the training split."""

from __future__ import annotations

import logging
import os
from typing import Any

from omegaconf import DictConfig

from kd_lightning.infra.signals import exit_on_sigterm
from kd_lightning.run.builders import obtain_teacher
from kd_lightning.run.settings import model_config, teacher_cache_options, teacher_configs
from kd_lightning.teachers.teacher_cache import cache_teacher_targets

log = logging.getLogger("kd_lightning")


def cache_teacher_stage(cfg: DictConfig, datamodule: Any, ckpt_path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Run the teacher over the training split into the store. `ckpt_path` is unused: the store's
    parts are written whole or not at all, and a rerun computes only the missing ones."""
    configs = teacher_configs(cfg)
    if len(configs) != 1:
        raise ValueError(f"stage=cache_teacher caches one teacher, got {[str(t.name) for t in configs]}")
    teacher_cfg = configs[0]
    teacher = obtain_teacher(cfg, teacher_cfg, datamodule)
    with exit_on_sigterm("stage=cache_teacher"):
        directory = cache_teacher_targets(teacher_cache_options(cfg), datamodule, str(teacher_cfg.name), teacher,
                                          model_config(teacher_cfg))
    log.info("Teacher targets at %s; train with: teacher=cached loss=sparse_kl teacher_cache.dir=%s", directory, directory)
    return {"teacher_targets": str(directory)}
