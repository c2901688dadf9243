"""Config-level helpers: where the configs live, which teachers a config names, and the checks that
run before any compute. A leaf of the package: it imports nothing from `kd_lightning`, so the CLI,
the stages and the builders can all use it without an import circle (and `--help` stays fast).

Library code below the stages never sees the Hydra config: it gets typed arguments built here or in
the stage functions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "conf")
"""The repository's `conf/` (next to this package in an editable install)."""


def teacher_configs(cfg: DictConfig) -> list[DictConfig]:
    """One teacher (`teacher=moe`) or several (`teacher.teachers: [...]`), names unique."""
    teachers = cfg.teacher.get("teachers")
    configs = list(teachers) if teachers else [cfg.teacher]
    names = [str(t.name) for t in configs]
    if len(set(names)) != len(names):
        raise ValueError(f"teacher names must be unique, got {names}")
    return configs


def builder_task(model_cfg: DictConfig | None) -> str | None:
    """The task a model config's builder makes models for (its `task` attribute), None if unknown."""
    if model_cfg is None or model_cfg.get("_target_") is None:
        return None
    from hydra.utils import get_method

    try:
        builder = get_method(str(model_cfg._target_))
    except Exception:  # a wrong _target_ is reported by instantiate, with Hydra's own message
        return None
    return getattr(builder, "task", None)


def check_config(cfg: DictConfig, task: str) -> None:
    """Fail before any compute, naming the offending key and value."""
    teachers = teacher_configs(cfg)
    cached = [str(t.name) for t in teachers if t.get("cached")]
    if cached and (cfg.stage == "cache_teacher" or len(teachers) > 1):
        raise ValueError(f"teacher={cached[0]} (offline targets) is the only teacher of a stage=distill run; "
                         f"got stage={cfg.stage}, {len(teachers)} teacher(s)")
    if cached and (cfg.loss.get("cross_vocab") or cfg.loss.get("chunk_size")):
        raise ValueError(f"teacher={cached[0]} (offline targets) gives teacher log-probabilities, not hidden states or "
                         f"another vocabulary's tokens: loss={cfg.loss.name} with cross_vocab/chunk_size cannot read "
                         "them; use a same-vocabulary loss without loss.chunk_size (sparse_kl reads sparse targets "
                         "directly)")
    for key, model_cfg in [("student", cfg.student.model)] + [(f"teacher {t.name}", t.model) for t in teachers]:
        made_for = builder_task(model_cfg)
        if made_for is not None and made_for != task:
            fix = ("teacher=mlp student=mlp (or experiment=digits)" if task == "classification"
                   else "a causal LM (teacher=moe|dense|hf, student=tiny|hf)")
            raise ValueError(f"{key} model {model_cfg._target_} builds {made_for} models but the dataset's task is "
                             f"{task}; use {fix}")
    check_strategy(str(cfg.trainer.get("strategy")), str(cfg.trainer.get("accelerator")))


def check_strategy(strategy: str, accelerator: str) -> None:
    """GPU-only strategies refuse to start without a GPU, with the options that do work here."""
    import torch

    if (strategy.startswith("fsdp") or strategy.startswith("deepspeed") or accelerator == "gpu") and not torch.cuda.is_available():
        raise RuntimeError(f"strategy={strategy} (accelerator={accelerator}) needs a CUDA GPU and none is visible; "
                           "use strategy=cpu, ddp, fsdp or bf16 on this machine")
    if strategy.startswith("deepspeed"):
        try:
            import deepspeed  # noqa: F401
        except ImportError as err:
            raise RuntimeError("strategy=deepspeed needs the extra: pip install -e '.[deepspeed]'") from err


def method_callbacks(cfg: DictConfig) -> list[Any]:
    """The method's callbacks: the `callbacks` group, then the temperature schedule and the loss's
    own schedule (TAID), each chosen by its group."""
    import hydra

    callbacks = [hydra.utils.instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    for node in (cfg.temperature.get("callback"), cfg.loss.get("callback")):
        if node is not None:
            callbacks.append(hydra.utils.instantiate(node))
    return callbacks


__all__ = ["CONFIG_DIR", "builder_task", "check_config", "check_strategy", "method_callbacks", "teacher_configs"]
