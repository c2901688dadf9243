"""The checks of the models a config names: their task against the data's, local `pretrained=`
directories, `dataset.seq_len` against their positions, packaged models and `student=from_teacher`."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from kd_lightning.errors import ConfigError
from kd_lightning.run.checks.lookup import is_number, value_at


POSITION_LIMIT_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def target_task(node: DictConfig | None) -> str | None:
    """The `task` attribute of what a config node's `_target_` names: the task a model builder makes
    models for (`kd_lightning.models.builds`), or a data module class's task; None if unknown."""
    if node is None or node.get("_target_") is None:
        return None
    from hydra.utils import get_method

    try:
        return getattr(get_method(str(node._target_)), "task", None)
    except Exception:  # a wrong _target_ is reported by instantiate, with Hydra's own message
        return None


def check_from_teacher(cfg: DictConfig, teachers: list[DictConfig]) -> None:
    """`student=from_teacher` reads `${teacher.model}` and builds it again: that is the teacher only
    for a model used as is (`pretrain: null`), not one kd-lightning trains or stored targets."""
    student = cfg.student.model
    if not str(student.get("_target_", "")).endswith(".from_teacher"):
        return
    source = OmegaConf.to_container(student, resolve=False).get("teacher")
    if not (isinstance(source, str) and source.startswith("${teacher")):
        return  # a model directory or another node of the user's
    unusable = [str(t.name) for t in teachers if t.get("pretrain") is not None or t.get("cached") or t.get("members")]
    if unusable or len(teachers) != 1:
        raise ConfigError(f"student=from_teacher copies the layers of one pretrained teacher used as is (teacher=smollm2, "
                          f"teacher=hf); teacher={cfg.teacher.get('name')} is not one. Point it at a saved model "
                          "instead: student.model.teacher=<model directory>")


def check_packaged_models(cfg: DictConfig) -> None:
    """Models converted from a file in an installed Python package (`${kd_packaged_gguf:...}`, e.g.
    teacher=smollm2) are obtained here, when the config is first resolved: a missing package stops
    the run before any compute with one line naming the pip command."""
    from omegaconf.errors import InterpolationResolutionError

    keys = ["dataset.tokenizer", "dataset.teacher_tokenizer", "student.model.pretrained",
            *(f"{k}.model.pretrained" for k in teacher_keys(cfg)), *(f"{k}.tokenizer" for k in teacher_keys(cfg))]
    for key in keys:
        try:
            value_at(cfg, key)
        except InterpolationResolutionError as error:
            cause: BaseException | None = error  # interpolations of interpolations wrap it once per level
            while isinstance(cause, InterpolationResolutionError):
                cause = cause.__cause__ or cause.__context__
            if isinstance(cause, (ImportError, FileNotFoundError)):
                raise ConfigError(f"{key}: {cause}") from cause
            raise


def teacher_keys(cfg: DictConfig) -> list[str]:
    """Config keys of every teacher: `teacher`, or `teacher.members.<name>` for an ensemble."""
    members = value_at(cfg, "teacher.members")
    if isinstance(members, DictConfig):
        return [f"teacher.members.{name}" for name in members]
    return ["teacher"] if isinstance(value_at(cfg, "teacher"), DictConfig) else []


def pretrained_keys(cfg: DictConfig) -> Iterator[tuple[str, Any]]:
    for model_key in ("student.model", *(f"{k}.model" for k in teacher_keys(cfg))):
        model = value_at(cfg, model_key)
        if isinstance(model, DictConfig) and "pretrained" in model.keys():  # `in` skips `???`
            yield f"{model_key}.pretrained", value_at(cfg, f"{model_key}.pretrained")


def looks_local(value: str) -> bool:
    """A path rather than a hub id (`org/name`): absolute, `./`, `../`, `~`, or a first component that
    exists here as a directory."""
    if value.startswith(("/", "./", "../", "~", ".\\")) or value in (".", ".."):
        return True
    first = value.split("/", 1)[0]
    return "/" in value and Path(first).is_dir()


def check_local_pretrained(key: str, value: Any) -> None:
    """`<key>=<path>` of `from_pretrained`: a local-looking path must be a saved model directory."""
    if value in (None, "", "???"):
        raise ConfigError(f"{key} is not set: pass {key}=<local model directory or hub id>")
    value = str(value)
    if not looks_local(value):
        return
    path = Path(os.path.expanduser(value))
    if not path.exists():
        raise ConfigError(f"{key}={value!r}: no such directory ({path.resolve()}); give a saved model directory, "
                          "or a hub id such as org/name")
    if not path.is_dir():
        raise ConfigError(f"{key}={value!r}: is a file; give the directory save_pretrained wrote (with config.json)")
    if not any(path.iterdir()):
        raise ConfigError(f"{key}={value!r}: the directory is empty; give the directory save_pretrained wrote")
    if not (path / "config.json").is_file():
        raise ConfigError(f"{key}={value!r}: no config.json in that directory, so it is not a saved model; "
                          "give the directory save_pretrained wrote")


def check_seq_len_fits(key: str, seq_len: int, model_config: Any, seq_len_key: str = "dataset.seq_len") -> None:
    """`dataset.seq_len` must not exceed the positions the model at config key `key` supports
    (`max_position_embeddings`, or `n_positions` for GPT-2-style configs); `model_config` is a
    transformers `PretrainedConfig`, a mapping or a DictConfig. Unknown limits are not checked."""
    for field in POSITION_LIMIT_FIELDS:
        limit = model_config.get(field) if hasattr(model_config, "get") else getattr(model_config, field, None)
        if is_number(limit):
            if seq_len > limit:
                raise ConfigError(f"{seq_len_key}={seq_len} exceeds {key}.{field}={limit}: the model has no position "
                                  f"beyond {limit}; lower {seq_len_key} to at most {limit}")
            return
