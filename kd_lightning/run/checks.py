"""The validation layer: a bad config, path or dataset stops the run before any compute.

Every error is a `ConfigError` (a `ValueError`) with one line naming the config key as the user
writes it (`distill.kd_weight`, not an internal argument), the bad value and what to do.

- `check_config(cfg)`: every refusal of the composed config, before any compute (`pipeline.run`
  calls it once): `validate_config(cfg)` (numbers and paths), offline teachers, models against the
  dataset's task, the strategy against this machine;
- `check_renamed_overrides(argv)`: a renamed key on the command line, before Hydra composes;
- `check_seq_len_fits(...)`: `dataset.seq_len` against a model's positions (after the model config
  is known);
- `check_writable(path, key)`: the output and cache directories (before any compute).

The data's own checks (empty records, one document dominating a split) are `kd_lightning.data.checks`.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from kd_lightning.errors import ConfigError
from kd_lightning.run.inert_keys import refuse_inert_keys
from kd_lightning.run.resolvers import register_resolvers

register_resolvers()  # ${kd_packaged_gguf:...} (teacher=smollm2): this module resolves the config first

# Loss parameters that must lie in [0, 1] (conf/loss/*.yaml): skew_kl / skew_reverse_kl `alpha`,
# gjsd `beta`, akl `mu`. Today the loss checks them at its first call, inside the training step.
UNIT_INTERVAL_LOSS_PARAMS = ("alpha", "beta", "mu")
# Temperature-schedule values that must be > 0 (conf/temperature/*.yaml callbacks).
POSITIVE_TEMPERATURE_KEYS = ("start", "end", "initial", "t_min", "t_max")
POSITION_LIMIT_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
# Old keys -> their names now: one concept, one name (`encoding` of a teacher's sparse or stored
# distribution, docs/methods.md). An old key in a config or on the command line is refused.
RENAMED_KEYS = {"teacher_cache.method": "teacher_cache.encoding", "teacher_outputs.method": "teacher_outputs.encoding",
                "loss.fn.method": "loss.fn.encoding"}


def _get(cfg: DictConfig, key: str) -> Any:
    """The resolved value at dotted `key`, or None when absent (a missing `???` value stays `???`)."""
    parent_key, _, leaf = key.rpartition(".")
    parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
    if not isinstance(parent, DictConfig) or leaf not in parent.keys():
        return None
    if OmegaConf.is_missing(parent, leaf):
        return "???"
    return parent[leaf]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _number(cfg: DictConfig, key: str, integer: bool = False) -> float | int | None:
    value = _get(cfg, key)
    if value is None:
        return None
    if not _is_number(value) or (integer and not isinstance(value, int)):
        kind = "an integer" if integer else "a number"
        raise ConfigError(f"{key}={value!r}: must be {kind}")
    return value


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


def check_config(cfg: DictConfig) -> None:
    """Every refusal of a composed config, before any compute (`pipeline.run` calls it once):
    `validate_config`, then the run's shape: offline teachers, models against the dataset's task,
    the strategy against this machine."""
    from kd_lightning.run.settings import teacher_configs  # not at the top: the CLI imports this module before --help

    validate_config(cfg)
    teachers = teacher_configs(cfg)
    check_from_teacher(cfg, teachers)
    cached = [str(t.name) for t in teachers if t.get("cached")]
    if cached and (cfg.stage == "cache_teacher" or len(teachers) > 1):
        raise ValueError(f"teacher={cached[0]} (offline targets) is the only teacher of a stage=distill run; "
                         f"got stage={cfg.stage}, {len(teachers)} teacher(s)")
    if cached and (cfg.loss.get("cross_vocab") or cfg.loss.get("chunk_size")):
        raise ValueError(f"teacher={cached[0]} (offline targets) gives teacher log-probabilities, not hidden states or "
                         f"another vocabulary's tokens: loss={cfg.loss.name} with cross_vocab/chunk_size cannot read "
                         "them; use a same-vocabulary loss without loss.chunk_size (sparse_kl reads sparse targets "
                         "directly)")
    task = target_task(cfg.get("dataset"))
    for key, model_cfg in [("student", cfg.student.model)] + [(f"teacher {t.name}", t.model) for t in teachers]:
        made_for = target_task(model_cfg)
        if made_for is not None and task is not None and made_for != task:
            fix = ("teacher=mlp student=mlp (or experiment=digits)" if task == "classification"
                   else "a causal LM (teacher=moe|dense|hf, student=tiny|hf)")
            raise ValueError(f"{key} model {model_cfg._target_} builds {made_for} models but the dataset's task is "
                             f"{task}; use {fix}")
    check_strategy(str(cfg.trainer.get("strategy")), str(cfg.trainer.get("accelerator")))


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
            *(f"{k}.model.pretrained" for k in _teacher_keys(cfg)), *(f"{k}.tokenizer" for k in _teacher_keys(cfg))]
    for key in keys:
        try:
            _get(cfg, key)
        except InterpolationResolutionError as error:
            cause: BaseException | None = error  # interpolations of interpolations wrap it once per level
            while isinstance(cause, InterpolationResolutionError):
                cause = cause.__cause__ or cause.__context__
            if isinstance(cause, (ImportError, FileNotFoundError)):
                raise ConfigError(f"{key}: {cause}") from cause
            raise


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


def validate_config(cfg: DictConfig) -> None:
    """Check the composed config before any data is read or model built; raise `ConfigError`."""
    check_renamed_keys(cfg)
    refuse_inert_keys(cfg)  # options that cannot act on this run (kd_lightning.run.inert_keys)
    check_packaged_models(cfg)
    _check_weights(cfg)
    max_steps = _number(cfg, "trainer.max_steps", integer=True)
    if max_steps is not None and (max_steps == 0 or max_steps < -1):
        raise ConfigError(f"trainer.max_steps={max_steps}: must be a positive number of optimiser steps "
                          "(or -1 to train for trainer.max_epochs)")
    threads = _get(cfg, "cpu_threads")
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads <= 0):
        raise ConfigError(f"cpu_threads={threads!r}: must be a positive integer, or null for half the cores")
    seq_len = _number(cfg, "dataset.seq_len", integer=True)
    if seq_len is not None and seq_len < 2:
        raise ConfigError(f"dataset.seq_len={seq_len}: must be at least 2 (an input token and the next one to predict)")
    _check_temperature(cfg)
    _check_loss_params(cfg)
    check_callback_configs(cfg)
    for key, value in _pretrained_keys(cfg):
        check_local_pretrained(key, value)
    if seq_len is not None:
        # A local saved model's positions are known from its config.json before anything is loaded;
        # a hub id is checked once its config is fetched (kd_lightning.run.builders).
        for key, value in _pretrained_keys(cfg):
            config_file = Path(os.path.expanduser(str(value))) / "config.json"
            if _looks_local(str(value)) and config_file.is_file():
                check_seq_len_fits(key.rsplit(".", 1)[0], seq_len, json.loads(config_file.read_text()))
        for model_key in ("student.model", *(f"{k}.model" for k in _teacher_keys(cfg))):
            model_config = _get(cfg, f"{model_key}.config")
            if isinstance(model_config, DictConfig):
                check_seq_len_fits(f"{model_key}.config", seq_len, model_config)


def _renamed(key: str, value: Any) -> ConfigError:
    new = RENAMED_KEYS[key]
    return ConfigError(f"{key}={value!r}: the key is now {new}; pass {new}={value} instead")


def check_renamed_keys(cfg: DictConfig) -> None:
    """Refuse a renamed key (`RENAMED_KEYS`) in the composed config (a user's file, `+key=`)."""
    for old in RENAMED_KEYS:
        value = _get(cfg, old)
        if value is not None:
            raise _renamed(old, value)


def check_renamed_overrides(overrides: list[str]) -> None:
    """Refuse a renamed key on the command line (`teacher_cache.method=topk`) before Hydra composes,
    which would only say that the key is not in the config."""
    for override in overrides:
        key, equals, value = override.partition("=")
        key = key.lstrip("+~")
        if equals and key in RENAMED_KEYS:
            raise _renamed(key, value)


def _check_weights(cfg: DictConfig) -> None:
    kd, ce = _number(cfg, "distill.kd_weight"), _number(cfg, "distill.ce_weight")
    for key, value in (("distill.kd_weight", kd), ("distill.ce_weight", ce)):
        if value is not None and value < 0:
            raise ConfigError(f"{key}={value}: must be >= 0 (it weighs a loss term; 0 turns the term off)")
    if kd == 0 and ce == 0 and _get(cfg, "stage") in (None, "distill", "takd"):
        raise ConfigError("distill.kd_weight=0 and distill.ce_weight=0: nothing to train; set at least one above 0 "
                          "(e.g. distill.kd_weight=1)")


def _check_temperature(cfg: DictConfig) -> None:
    initial = _number(cfg, "temperature.initial")
    if initial is not None and initial <= 0:
        raise ConfigError(f"temperature.initial={initial}: the distillation temperature must be > 0 (1 leaves the "
                          "distributions unchanged; classic KD uses 2-4)")
    callback = _get(cfg, "temperature.callback")
    if isinstance(callback, DictConfig):
        for name in POSITIVE_TEMPERATURE_KEYS:
            value = _number(cfg, f"temperature.callback.{name}")
            if value is not None and value <= 0:
                raise ConfigError(f"temperature.callback.{name}={value}: a distillation temperature must be > 0")


def _check_loss_params(cfg: DictConfig) -> None:
    for name in UNIT_INTERVAL_LOSS_PARAMS:
        value = _number(cfg, f"loss.fn.{name}")
        if value is not None and not 0 <= value <= 1:
            raise ConfigError(f"loss.fn.{name}={value}: must lie in [0, 1] (loss={_get(cfg, 'loss.name')})")
    value_form = _get(cfg, "loss.fn.value_form")
    if value_form is not None and value_form not in ("kl", "ce"):
        raise ConfigError(f"loss.fn.value_form={value_form!r}: must be 'kl' or 'ce'")
    encoding = _get(cfg, "loss.fn.encoding")
    if encoding is not None and encoding not in ("sample", "topk"):
        raise ConfigError(f"loss.fn.encoding={encoding!r}: must be 'sample' or 'topk'")
    for name in ("num_draws", "k"):
        count = _number(cfg, f"loss.fn.{name}", integer=True)
        if count is not None and count < 1:
            raise ConfigError(f"loss.fn.{name}={count}: must be >= 1")
    chunk_size = _get(cfg, "loss.chunk_size")
    if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1):
        raise ConfigError(f"loss.chunk_size={chunk_size!r}: must be null (unchunked) or a positive integer")


def _callback_keys(cfg: DictConfig) -> list[str]:
    named = _get(cfg, "callbacks")
    keys = [f"callbacks.{name}" for name in named] if isinstance(named, DictConfig) else []
    return keys + [key for key in ("temperature.callback", "loss.callback") if isinstance(_get(cfg, key), DictConfig)]


def check_callback_configs(cfg: DictConfig) -> None:
    """Build every method callback (`callbacks.*`, `temperature.callback`, `loss.callback`) once,
    now: their `__init__` validates their arguments (Lightning's convention), and today the run builds
    them only after the teacher's pre-training. A failure is re-raised naming the config node, e.g.
    `loss.callback: TAIDSchedule: t_start=1.5 must be in [0, 1)` (the argument is `loss.callback.t_start`)."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    for key in _callback_keys(cfg):
        node = _get(cfg, key)
        if not isinstance(node, DictConfig) or "_target_" not in node:
            continue
        try:
            instantiate(node)
        except (InstantiationException, ValueError, TypeError) as error:
            cause = error.__cause__ if isinstance(error, InstantiationException) and error.__cause__ else error
            raise ConfigError(f"{key}: {str(cause).splitlines()[0]}") from error


def _teacher_keys(cfg: DictConfig) -> list[str]:
    """Config keys of every teacher: `teacher`, or `teacher.members.<name>` for an ensemble."""
    members = _get(cfg, "teacher.members")
    if isinstance(members, DictConfig):
        return [f"teacher.members.{name}" for name in members]
    return ["teacher"] if isinstance(_get(cfg, "teacher"), DictConfig) else []


def _pretrained_keys(cfg: DictConfig) -> Iterator[tuple[str, Any]]:
    for model_key in ("student.model", *(f"{k}.model" for k in _teacher_keys(cfg))):
        model = _get(cfg, model_key)
        if isinstance(model, DictConfig) and "pretrained" in model.keys():  # `in` skips `???`
            yield f"{model_key}.pretrained", _get(cfg, f"{model_key}.pretrained")


def _looks_local(value: str) -> bool:
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
    if not _looks_local(value):
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
        if _is_number(limit):
            if seq_len > limit:
                raise ConfigError(f"{seq_len_key}={seq_len} exceeds {key}.{field}={limit}: the model has no position "
                                  f"beyond {limit}; lower {seq_len_key} to at most {limit}")
            return


def check_writable(path: str | os.PathLike[str], key: str) -> Path:
    """Create `path` if needed and prove a file can be written in it; `ConfigError` naming `key`
    otherwise. Call for `paths.cache_dir` and the output directory before any compute (today an
    unwritable cache is found only after the teacher's pre-training)."""
    directory = Path(os.path.expanduser(str(path)))
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".kd_write_probe-", dir=directory)
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        raise ConfigError(f"{key}={str(path)!r}: cannot write there ({error.strerror or error}); "
                          f"set {key} to a writable directory") from error
    return directory
