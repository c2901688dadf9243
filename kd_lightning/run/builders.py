"""Building blocks of a run: models from config, Trainers, and the CE-trained models kd-lightning
caches itself (teachers pre-trained on the data, no-KD baselines)."""

from __future__ import annotations

import logging
import os
from functools import partial
from pathlib import Path
from typing import Any

import hydra
import torch
from lightning import Trainer
from omegaconf import DictConfig, OmegaConf
from torch import nn
from transformers import get_cosine_schedule_with_warmup

from kd_lightning.callbacks.interrupt import CheckpointOnSigterm
from kd_lightning.run.checks import check_seq_len_fits
from kd_lightning.run import CONFIG_DIR
from kd_lightning.run.settings import served_teacher_options, teacher_cache_options
from kd_lightning.infra.model_cache import cache_root, check_entry_weights, config_key, is_complete, write_atomically
from kd_lightning.models import build_causal_lm, from_pretrained, load_model, save_model
from kd_lightning.module import DistillationModule
from kd_lightning.infra.rundir import CHECKPOINT_DIR, resume_requested
from kd_lightning.infra.safeload import checkpoint_problem
from kd_lightning.infra.shard_init import BuiltOnRank0, SafetensorsWeights, defer
from kd_lightning.infra.sharding import ShardedDataParallel, unsharded
from kd_lightning.infra.signals import exit_on_sigterm
from kd_lightning.tasks import task_named
from kd_lightning.teachers.served import ServedTeacher, check_servers
from kd_lightning.teachers.teacher_cache import load_cached_teacher

log = logging.getLogger("kd_lightning")


def model_kwargs(datamodule: Any, seed: int) -> dict[str, Any]:
    """What every model builder gets from the data: sizes and special tokens."""
    return task_named(datamodule.task).builder_kwargs(datamodule, seed)


def shards_models(cfg: DictConfig) -> bool:
    """strategy=fsdp: models are built on the meta device and each process fills its own shards."""
    strategy = cfg.trainer.get("strategy")
    target = strategy.get("_target_") if isinstance(strategy, DictConfig) else None
    return target == f"{ShardedDataParallel.__module__}.{ShardedDataParallel.__qualname__}"


def build_model(model_cfg: DictConfig, datamodule: Any, seed: int, *, deferred: bool = False) -> nn.Module:
    """The model of `model_cfg`. `deferred` (strategy=fsdp): a `from_pretrained` model stored as
    safetensors, or a `build_causal_lm` one, is built on the meta device and filled after sharding
    (`kd_lightning.infra.shard_init`: its own rows read from the files; initialised on rank 0 and
    scattered); any other model is built whole."""
    kwargs = model_kwargs(datamodule, seed)
    target = model_cfg.get("_target_")
    if deferred and target == _path_of(from_pretrained):
        model = pretrained_on_meta(Path(str(model_cfg.pretrained)), lambda: hydra.utils.instantiate(model_cfg, **kwargs))
        if model is not None:
            return model
    if deferred and target == _path_of(build_causal_lm):
        with torch.device("meta"):
            model = hydra.utils.instantiate(model_cfg, **kwargs)
        return defer(model, BuiltOnRank0(lambda: build_model(model_cfg, datamodule, seed)))
    return hydra.utils.instantiate(model_cfg, **kwargs)


def pretrained_on_meta(directory: Path, build: Any) -> nn.Module | None:
    """`build()` on the meta device, to be filled from the safetensors files of `directory`; None
    (build it whole) for a hub id, another format, or files that do not hold every tensor."""
    if not any((directory / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json")):
        return None
    source = SafetensorsWeights(directory)
    with torch.device("meta"):
        model = build()
    missing = source.missing(model)
    if missing:
        log.warning("strategy=fsdp: %s does not store %s under the model's names; loading it whole on every process",
                    directory, missing[:3])
        return None
    return defer(model, source)


def _path_of(function: Any) -> str:
    return f"{function.__module__}.{function.__name__}"


def check_model_positions(key: str, model: nn.Module, cfg: DictConfig) -> None:
    """`dataset.seq_len` against the positions of a built model: a `from_pretrained` model's limit is
    known only once its config is loaded (`checks.validate_config` covers models built from config)."""
    seq_len = cfg.dataset.get("seq_len")
    if seq_len is not None and getattr(model, "config", None) is not None:
        check_seq_len_fits(key, int(seq_len), model.config)


def augment_teacher(model: nn.Module, augment_cfg: Any) -> nn.Module:
    """Wrap a built teacher with its config's `augment` node, or return it unchanged when null.

    The node is a `_partial_` Hydra target called with `model=` (what the config group
    `teacher/augment=<option>` or the preset `teacher=moe_ka` puts there). A plain string such as
    `teacher.augment=ka` (a value override, which Hydra cannot turn into a group choice) names the
    option file `conf/teacher/augment/<string>.yaml`, loaded as that group would load it."""
    if augment_cfg is None:
        return model
    if isinstance(augment_cfg, str):
        folder = Path(CONFIG_DIR) / "teacher" / "augment"
        option = folder / f"{augment_cfg}.yaml"
        if not option.is_file():
            choices = sorted(p.stem for p in folder.glob("*.yaml"))
            raise ValueError(f"teacher.augment={augment_cfg!r}: no option {option}; choose one of {choices}")
        augment_cfg = OmegaConf.load(option)
    factory = hydra.utils.instantiate(augment_cfg)
    return factory(model=model)


def make_trainer(cfg: DictConfig, *, name: str, max_steps: int | None = None, callbacks: list[Any] | None = None,
                 loggers: list[Any] | bool = True, validate: bool = True, checkpoint: bool = False) -> Trainer:
    """A Trainer from `cfg.trainer` (strategy, precision, devices come from the strategy group)."""
    callbacks = list(callbacks or [])
    if cfg.trainer.get("enable_progress_bar", True) and cfg.get("progress_bar") is not None:
        callbacks.append(hydra.utils.instantiate(cfg.progress_bar))
    overrides: dict[str, Any] = {"callbacks": callbacks, "enable_checkpointing": checkpoint}
    if loggers is True:
        from lightning.pytorch.loggers import CSVLogger

        loggers = [CSVLogger(save_dir=cfg.paths.output_dir, name=name, version="")]
    overrides["logger"] = loggers
    if max_steps is not None:
        overrides["max_steps"] = max_steps
    if not validate:
        overrides.update(limit_val_batches=0, val_check_interval=None, check_val_every_n_epoch=1)
    return hydra.utils.instantiate(cfg.trainer, **overrides)


def _cache_payload(kind: str, model_cfg: DictConfig, training: dict[str, Any], datamodule: Any, seed: int) -> dict[str, Any]:
    return {
        "kind": kind,
        "model": OmegaConf.to_container(model_cfg, resolve=True),
        "training": training,
        "data": datamodule.fingerprint(),
        "seed": seed,
        "torch": torch.__version__.split("+")[0],
    }


def obtain_ce_model(
    cfg: DictConfig,
    *,
    kind: str,
    name: str,
    model_cfg: DictConfig,
    training: dict[str, Any],
    datamodule: Any,
    optimizer: Any,
    lr_scheduler: Any,
    max_steps: int,
    deferred: bool = False,
) -> tuple[nn.Module, Path, bool]:
    """Load a CE-trained model from the cache, or train it (CE only) and cache it.

    SIGTERM during the training saves a resumable checkpoint of it in the run's checkpoint directory,
    `<output_dir>/checkpoints/<kind>-<entry name>.ckpt` (so a fresh run there refuses to start over it),
    and exits 143; with `resume` set the training continues from it, and it is deleted once the model
    is cached. Returns (model, cache entry, whether it was trained now). `deferred`: a cached model
    is built on the meta device and filled after sharding (see `build_model`)."""

    payload = _cache_payload(kind, model_cfg, training, datamodule, int(cfg.seed))
    entry = cache_root(cfg.paths.cache_dir) / f"{kind}s" / f"{name}-{config_key(payload)}"
    if is_complete(entry):
        log.info("Using cached %s '%s' from %s", kind, name, entry)
        check_entry_weights(entry)  # a truncated file: DamagedFileError naming it and the fix
        meta = pretrained_on_meta(entry, lambda: from_pretrained(str(entry))) if deferred else None
        return meta if meta is not None else load_model(entry), entry, False
    log.info("No cached %s '%s' for this config: training it now with CE for %d steps (cached at %s)",
             kind, name, max_steps, entry)
    model = build_model(model_cfg, datamodule, int(cfg.seed))
    module = DistillationModule(model, None, ce_weight=1.0, kd_weight=0.0, optimizer=optimizer, lr_scheduler=lr_scheduler)
    partial_ckpt = Path(cfg.paths.output_dir) / CHECKPOINT_DIR / f"{kind}-{entry.name}.ckpt"
    on_sigterm = CheckpointOnSigterm(path=partial_ckpt)
    trainer = make_trainer(cfg, name=f"{kind}_{name}", max_steps=max_steps, validate=False, callbacks=[on_sigterm])
    with exit_on_sigterm(CE_STAGE_NAMES.get(kind, f"{kind} training"), saved=lambda: on_sigterm.saved):
        trainer.fit(module, datamodule=datamodule, ckpt_path=partial_resume(cfg, partial_ckpt, kind), weights_only=True)
        model = unsharded(model, lambda: build_model(model_cfg, datamodule, int(cfg.seed)))  # strategy=fsdp
        if trainer.is_global_zero:
            write_atomically(entry, lambda d: save_model(model, d, getattr(datamodule, "tokenizer", None)), payload)
    trainer.strategy.barrier()
    if trainer.is_global_zero:
        partial_ckpt.unlink(missing_ok=True)  # the cache entry holds the finished model now
    return model, entry, True


CE_STAGE_NAMES = {"teacher": "teacher pre-training", "baseline": "CE baseline"}


def partial_resume(cfg: DictConfig, partial_ckpt: Path, kind: str) -> Path | None:
    """The interrupted training's checkpoint to continue from (`resume` set and the file loads)."""
    if not resume_requested(cfg.get("resume")):
        return None
    problem = checkpoint_problem(partial_ckpt)
    if problem == "missing":
        return None
    if problem is not None:
        log.warning("resume: %s is %s; training the %s from the start", partial_ckpt, problem, kind)
        return None
    log.info("resume: continuing the %s from %s", CE_STAGE_NAMES.get(kind, kind), partial_ckpt)
    return partial_ckpt


def obtain_teacher(cfg: DictConfig, teacher_cfg: DictConfig, datamodule: Any, *, deferred: bool = False) -> nn.Module:
    """A teacher from its config: used as is when `pretrain` is null (e.g. `from_pretrained`),
    otherwise pre-trained by kd-lightning on the data and cached. A teacher config's `augment` node
    (e.g. MoE knowledge augmentation) wraps the built teacher. With dual data the teacher is built
    for, and pre-trained on, its own tokenization (`teacher_data()`). `deferred` (the distillation
    under strategy=fsdp): built on the meta device and filled shard by shard once sharded
    (`build_model`), unless a wrapper (`augment`) needs the model whole."""
    datamodule = datamodule.teacher_data() if hasattr(datamodule, "teacher_data") else datamodule
    if teacher_cfg.get("cached"):  # teacher=cached: stored sparse targets, no model
        return load_cached_teacher(teacher_cache_options(cfg, teacher_cfg.get("dir")), datamodule,
                                   sparse=str(cfg.loss.name) == "sparse_kl")
    if teacher_cfg.get("served"):  # teacher=vllm: top-k targets from vLLM servers, no model here
        return served_teacher(cfg, teacher_cfg, datamodule)
    pretrain = teacher_cfg.get("pretrain")
    if pretrain is None:
        deferred = deferred and teacher_cfg.get("augment") is None
        model = build_model(teacher_cfg.model, datamodule, int(cfg.seed), deferred=deferred)
        key = f"teacher.members.{teacher_cfg.name}.model" if cfg.teacher.get("members") else "teacher.model"
        check_model_positions(key, model, cfg)
        return augment_teacher(model, teacher_cfg.get("augment"))
    training = OmegaConf.to_container(pretrain, resolve=True)
    optimizer = partial(torch.optim.AdamW, lr=float(pretrain.lr), weight_decay=0.01)
    scheduler = _warmup_cosine(int(pretrain.get("warmup_steps", 0)))
    model, _, _ = obtain_ce_model(
        cfg, kind="teacher", name=str(teacher_cfg.name), model_cfg=teacher_cfg.model, training=training,
        datamodule=datamodule, optimizer=optimizer, lr_scheduler=scheduler, max_steps=int(pretrain.max_steps),
        deferred=deferred and teacher_cfg.get("augment") is None,
    )
    return augment_teacher(model, teacher_cfg.get("augment"))


def served_teacher(cfg: DictConfig, teacher_cfg: DictConfig, datamodule: Any) -> ServedTeacher:
    """`teacher=vllm`: the servers checked (reachable, the configured model, the data's tokenizer),
    then a client whose requests start at this rank's server."""
    options = served_teacher_options(cfg, teacher_cfg)
    check_servers(options, datamodule.tokenizer, int(cfg.dataset.seq_len))
    rank = int(os.environ.get("RANK", 0))
    return ServedTeacher(options, int(datamodule.vocab_size), sparse=str(cfg.loss.name) == "sparse_kl", rank=rank)


def obtain_baseline(cfg: DictConfig, datamodule: Any) -> tuple[nn.Module, bool]:
    """The no-KD baseline: the same student, optimiser and steps, CE only; cached by config."""
    training = {
        "optimizer": OmegaConf.to_container(cfg.optimizer, resolve=True),
        "lr_scheduler": OmegaConf.to_container(cfg.lr_scheduler, resolve=True) if cfg.lr_scheduler else None,
        "max_steps": int(cfg.trainer.max_steps),
        "precision": str(cfg.trainer.get("precision")),
        "gradient_clip_val": cfg.trainer.get("gradient_clip_val"),
    }
    model, _, trained = obtain_ce_model(
        cfg, kind="baseline", name=str(cfg.student.name), model_cfg=cfg.student.model, training=training,
        datamodule=datamodule, optimizer=hydra.utils.instantiate(cfg.optimizer),
        lr_scheduler=hydra.utils.instantiate(cfg.lr_scheduler) if cfg.lr_scheduler else None,
        max_steps=int(cfg.trainer.max_steps),
    )
    return model, trained


def _warmup_cosine(warmup_steps: int) -> Any:
    return partial(get_cosine_schedule_with_warmup, num_warmup_steps=warmup_steps)
