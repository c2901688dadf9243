"""One entry point for every stage: checks, process settings, run directory, seed, data, then the chosen stage.

    python train.py stage=<name>    ->    kd_lightning.run.cli.main    ->    run(cfg)    ->    STAGES[name]

Each stage is one file of this package with one signature, `(cfg, datamodule, ckpt_path=None) ->
summary dict`; the data module is built once per run here. The stages import downwards only
(builders, settings, checks), never this module.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Callable
from typing import Any

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from kd_lightning.run.checks import check_config, check_writable
from kd_lightning.run.checks import (check_checkpoint_layout, check_pretrained_sources, check_store_dirs,
                                       check_teacher_weights)
from kd_lightning.infra.rundir import begin_run
from kd_lightning.infra.signals import EXIT_SIGINT, EXIT_SIGTERM, exit_on_sigterm
from kd_lightning.run.cache_teacher import cache_teacher_stage
from kd_lightning.run.distill import distill
from kd_lightning.run.takd import run_chain
from kd_lightning.run.teacher import teacher_stage

log = logging.getLogger("kd_lightning")

Stage = Callable[..., dict[str, Any]]  # (cfg, datamodule, ckpt_path=None) -> summary
STAGES: dict[str, Stage] = {
    "distill": distill,  # the default: teachers -> student (+ CE-only baseline) -> summary
    "teacher": teacher_stage,  # only pre-train and cache the teacher(s)
    "takd": run_chain,  # teacher -> assistants -> student, one distill per link
    "cache_teacher": cache_teacher_stage,  # the teacher's sparse targets for the training split
}


def quiet_lightning_console() -> None:
    """`import lightning` adds its own console handler that also propagates to the root logger;
    under Hydra (which configures the root logger) every Lightning message would print twice."""
    if logging.getLogger().handlers:
        lightning_logger = logging.getLogger("lightning")
        for handler in list(lightning_logger.handlers):
            if isinstance(handler, logging.StreamHandler):
                lightning_logger.removeHandler(handler)


def set_cpu_threads(requested: int | None) -> None:
    """Intra-op CPU threads. Default: half the cores (1 on a 2-core box). Measured here: with 2
    threads on 2 cores, any other busy process makes OpenMP spin-waits turn a 0.26 s step into
    3-6 s, while 1 thread loses only ~25% on an idle machine. OMP_NUM_THREADS, if set, wins."""
    if "OMP_NUM_THREADS" in os.environ and requested is None:
        return
    torch.set_num_threads(int(requested) if requested else max(1, (os.cpu_count() or 2) // 2))


def close_experiment_loggers() -> None:
    """After a failure: a W&B run left open would stay "running" (and the next job of a sweep would
    log into it); finish it as failed."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish(exit_code=1)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run the configured stage; returns its summary (empty on non-zero DDP ranks)."""
    if cfg.stage not in STAGES:
        raise ValueError(f"stage={cfg.stage!r} is not one of {list(STAGES)}")
    check_config(cfg)
    quiet_lightning_console()
    set_cpu_threads(cfg.get("cpu_threads"))
    # Teachers are in eval mode by design (frozen); Lightning warns about any eval-mode submodule.
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode", category=UserWarning)
    output_dir = check_writable(cfg.paths.output_dir, "hydra.run.dir")
    check_writable(cfg.paths.cache_dir, "paths.cache_dir")
    check_store_dirs(cfg)  # teacher_cache.dir / teacher_outputs.dir when this run writes them
    check_pretrained_sources(cfg)  # a pretrained= that is neither a directory here nor reachable on the hub
    check_teacher_weights(cfg)  # one weight per teacher, before any teacher is pre-trained
    # rank 0: the run directory's lock, no overwrite of a finished or checkpointed run, the config
    # recorded (a resume must keep its meaning) and the checkpoint to continue from
    lock, checkpoint = begin_run(output_dir, cfg.resume, OmegaConf.to_container(cfg, resolve=True),
                                 allow_changes=bool(cfg.get("resume_allow_changes", False)))
    try:
        check_checkpoint_layout(cfg, checkpoint)  # e.g. a DDP file resumed under strategy=fsdp
        # SIGTERM or Ctrl-C where no stage says more (reading data, building models): one line, 143/130
        with exit_on_sigterm(f"stage={cfg.stage}"):
            L.seed_everything(int(cfg.seed), workers=True, verbose=False)
            datamodule = hydra.utils.instantiate(cfg.dataset)
            stage = STAGES[str(cfg.stage)]
            # Only the distillation stage continues from <output_dir>/checkpoints; the CE-trained stages
            # find their own partial checkpoints (builders.obtain_ce_model), TAKD stages theirs (takd.run_stage).
            summary = stage(cfg, datamodule, ckpt_path=checkpoint)
    except BaseException as error:
        # SIGTERM (exit 143) or Ctrl-C (130) has already said what was saved, in one line
        if not isinstance(error, SystemExit) or error.code not in (0, None, EXIT_SIGTERM, EXIT_SIGINT):
            log.error("stage=%s stopped (%s); its output directory is %s", cfg.stage, type(error).__name__, output_dir)
        close_experiment_loggers()
        raise
    finally:
        if lock is not None:
            lock.release()
    return summary
