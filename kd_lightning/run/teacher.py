"""`stage=teacher`: pre-train and cache the teacher(s), then stop."""

from __future__ import annotations

import logging
import os
from typing import Any

from omegaconf import DictConfig

from kd_lightning.run.builders import obtain_teacher
from kd_lightning.run.settings import teacher_configs

log = logging.getLogger("kd_lightning")


def teacher_stage(cfg: DictConfig, datamodule: Any, ckpt_path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Pre-train and cache every teacher the config names. `ckpt_path` is unused: an interrupted
    pre-training continues from its own partial checkpoint (`builders.partial_resume`)."""
    teachers = [str(t.name) for t in teacher_configs(cfg) if obtain_teacher(cfg, t, datamodule) is not None]
    log.info("Teacher(s) ready: %s", ", ".join(teachers))
    return {"teachers": teachers}
