"""The checks of the composed config's values (numbers, weights, temperatures, loss parameters,
callbacks, renamed keys) and of the run's shape (offline teachers, models against the data's
task, the strategy against this machine), and of the directories a run writes."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from kd_lightning.errors import ConfigError
from kd_lightning.run.checks.inert_keys import refuse_inert_keys
from kd_lightning.run.checks.lookup import number_at, value_at
from kd_lightning.run.checks.models import (check_from_teacher, check_local_pretrained, check_packaged_models,
                                            check_seq_len_fits, looks_local, pretrained_keys, target_task, teacher_keys)
from kd_lightning.run.resolvers import register_resolvers

register_resolvers()  # ${kd_packaged_gguf:...} (teacher=smollm2): this module resolves the config first

# Loss parameters that must lie in [0, 1] (conf/loss/*.yaml): skew_kl / skew_reverse_kl `alpha`,
# gjsd `beta`, akl `mu`. Today the loss checks them at its first call, inside the training step.
UNIT_INTERVAL_LOSS_PARAMS = ("alpha", "beta", "mu")
# Temperature-schedule values that must be > 0 (conf/temperature/*.yaml callbacks).
POSITIVE_TEMPERATURE_KEYS = ("start", "end", "initial", "t_min", "t_max")
# Old keys -> their names now: one concept, one name (`encoding` of a teacher's sparse or stored
# distribution, docs/methods.md). An old key in a config or on the command line is refused.
RENAMED_KEYS = {"teacher_cache.method": "teacher_cache.encoding", "teacher_outputs.method": "teacher_outputs.encoding",
                "loss.fn.method": "loss.fn.encoding"}


def check_config(cfg: DictConfig) -> None:
    """Every refusal of a composed config, before any compute (`pipeline.run` calls it once):
    `validate_config`, then the run's shape: offline teachers, models against the dataset's task,
    the strategy against this machine."""
    from kd_lightning.run.settings import teacher_configs  # not at the top: the CLI imports this module before --help

    validate_config(cfg)
    teachers = teacher_configs(cfg)
    check_from_teacher(cfg, teachers)
    cached = [str(t.name) for t in teachers if t.get("cached") or t.get("served")]  # sparse targets, no model here
    offline = [str(t.name) for t in teachers if t.get("cached")]
    if cached and (len(teachers) > 1 or offline and cfg.stage == "cache_teacher"):
        raise ValueError(f"teacher={cached[0]} (offline or served targets) is the only teacher of a stage=distill run "
                         f"(a served one also of stage=cache_teacher); got stage={cfg.stage}, {len(teachers)} teacher(s)")
    if cached and not offline and cfg.stage == "cache_teacher":
        check_served_store(cfg, teachers[0])
    if cached and (cfg.loss.get("cross_vocab") or cfg.loss.get("chunk_size")):
        raise ValueError(f"teacher={cached[0]} (offline or served targets) gives teacher log-probabilities, not hidden states or "
                         f"another vocabulary's tokens: loss={cfg.loss.name} with cross_vocab/chunk_size cannot read "
                         "them; use a same-vocabulary loss without loss.chunk_size (sparse_kl reads sparse targets "
                         "directly)")
    task = target_task(cfg.get("dataset"))
    served = [str(t.name) for t in teachers if t.get("served")]
    if served and (task == "classification" or cfg.dataset.get("teacher_tokenizer") not in (None, cfg.dataset.get("tokenizer"))):
        raise ConfigError(f"teacher={served[0]} (served by vLLM) scores the data's own token ids with a causal LM of the "
                          "same tokenizer: it needs a causal-LM dataset with one tokenization (no dataset.teacher_tokenizer)")
    for key, model_cfg in [("student", cfg.student.model)] + [(f"teacher {t.name}", t.model) for t in teachers]:
        made_for = target_task(model_cfg)
        if made_for is not None and task is not None and made_for != task:
            fix = ("teacher=mlp student=mlp (or experiment=digits)" if task == "classification"
                   else "a causal LM (teacher=moe|dense|hf, student=tiny|hf)")
            raise ValueError(f"{key} model {model_cfg._target_} builds {made_for} models but the dataset's task is "
                             f"{task}; use {fix}")
    check_loss_data(cfg)
    check_strategy(str(cfg.trainer.get("strategy")), str(cfg.trainer.get("accelerator")))


def check_served_store(cfg: DictConfig, teacher_cfg: DictConfig) -> None:
    """`stage=cache_teacher teacher=vllm` writes the served top-k log-probabilities as they came: the
    store's encoding must be `topk` with k <= the served `teacher.top_k` (a `sample` or `full` store
    would need the teacher's whole distribution, which the server does not send)."""
    cache = cfg.get("teacher_cache") or {}
    encoding, k, top_k = str(cache.get("encoding")), cache.get("k"), int(teacher_cfg.get("top_k") or 0)
    if encoding != "topk" or k is None or int(k) > top_k:
        raise ConfigError(f"stage=cache_teacher teacher={teacher_cfg.name} stores what the server sends, its top-{top_k} "
                          f"log-probabilities: set teacher_cache.encoding=topk and teacher_cache.k<={top_k} (got "
                          f"encoding={encoding}, k={k}), or raise teacher.top_k (at most the server's --max-logprobs)")


def check_loss_data(cfg: DictConfig) -> None:
    """A loss that compares the two tokenizations of a dual batch (`loss.needs: two_tokenizations`,
    e.g. `alm`) or a byte-level student with a sub-word teacher (`needs: byte_student`, `byte_kl`)
    refuses single-tokenized data before compute, instead of at its first step."""
    needs = value_at(cfg, "loss.needs")
    if needs is None:
        return
    if needs not in ("two_tokenizations", "byte_student"):
        raise ConfigError(f"loss.needs={needs!r}: must be two_tokenizations or byte_student")
    name = value_at(cfg, "loss.name")
    student, teacher = value_at(cfg, "dataset.tokenizer"), value_at(cfg, "dataset.teacher_tokenizer")
    if teacher in (None, "???") or teacher == student:
        raise ConfigError(f"loss={name} compares the student's and the teacher's tokenizations of the same text, but "
                          f"the data holds one (dataset.teacher_tokenizer={teacher!r}); set teacher.tokenizer=<the "
                          "teacher's tokenizer> (experiment=cross_tokenizer or cross_tokenizer_reverse), "
                          "see docs/cross_tokenizer.md")
    if needs == "byte_student" and student not in (None, "byte"):
        raise ConfigError(f"loss={name} gives a byte-level student the teacher's next-byte distribution, but "
                          f"dataset.tokenizer={student!r} is not bytes; use it with a byte student "
                          "(experiment=cross_tokenizer_reverse), or loss=alm for sub-word students")


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
    refuse_inert_keys(cfg)  # options that cannot act on this run (inert_keys.py)
    check_packaged_models(cfg)
    _check_weights(cfg)
    max_steps = number_at(cfg, "trainer.max_steps", integer=True)
    if max_steps is not None and (max_steps == 0 or max_steps < -1):
        raise ConfigError(f"trainer.max_steps={max_steps}: must be a positive number of optimiser steps "
                          "(or -1 to train for trainer.max_epochs)")
    threads = value_at(cfg, "cpu_threads")
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads <= 0):
        raise ConfigError(f"cpu_threads={threads!r}: must be a positive integer, or null for half the cores")
    seq_len = number_at(cfg, "dataset.seq_len", integer=True)
    if seq_len is not None and seq_len < 2:
        raise ConfigError(f"dataset.seq_len={seq_len}: must be at least 2 (an input token and the next one to predict)")
    _check_temperature(cfg)
    _check_loss_params(cfg)
    check_callback_configs(cfg)
    for key, value in pretrained_keys(cfg):
        check_local_pretrained(key, value)
    if seq_len is not None:
        # A local saved model's positions are known from its config.json before anything is loaded;
        # a hub id is checked once its config is fetched (kd_lightning.run.builders).
        for key, value in pretrained_keys(cfg):
            config_file = Path(os.path.expanduser(str(value))) / "config.json"
            if looks_local(str(value)) and config_file.is_file():
                check_seq_len_fits(key.rsplit(".", 1)[0], seq_len, json.loads(config_file.read_text()))
        for model_key in ("student.model", *(f"{k}.model" for k in teacher_keys(cfg))):
            model_config = value_at(cfg, f"{model_key}.config")
            if isinstance(model_config, DictConfig):
                check_seq_len_fits(f"{model_key}.config", seq_len, model_config)


def _renamed(key: str, value: Any) -> ConfigError:
    new = RENAMED_KEYS[key]
    return ConfigError(f"{key}={value!r}: the key is now {new}; pass {new}={value} instead")


def check_renamed_keys(cfg: DictConfig) -> None:
    """Refuse a renamed key (`RENAMED_KEYS`) in the composed config (a user's file, `+key=`)."""
    for old in RENAMED_KEYS:
        value = value_at(cfg, old)
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
    kd, ce = number_at(cfg, "distill.kd_weight"), number_at(cfg, "distill.ce_weight")
    for key, value in (("distill.kd_weight", kd), ("distill.ce_weight", ce)):
        if value is not None and value < 0:
            raise ConfigError(f"{key}={value}: must be >= 0 (it weighs a loss term; 0 turns the term off)")
    if kd == 0 and ce == 0 and value_at(cfg, "stage") in (None, "distill", "takd"):
        raise ConfigError("distill.kd_weight=0 and distill.ce_weight=0: nothing to train; set at least one above 0 "
                          "(e.g. distill.kd_weight=1)")


def _check_temperature(cfg: DictConfig) -> None:
    initial = number_at(cfg, "temperature.initial")
    if initial is not None and initial <= 0:
        raise ConfigError(f"temperature.initial={initial}: the distillation temperature must be > 0 (1 leaves the "
                          "distributions unchanged; classic KD uses 2-4)")
    callback = value_at(cfg, "temperature.callback")
    if isinstance(callback, DictConfig):
        for name in POSITIVE_TEMPERATURE_KEYS:
            value = number_at(cfg, f"temperature.callback.{name}")
            if value is not None and value <= 0:
                raise ConfigError(f"temperature.callback.{name}={value}: a distillation temperature must be > 0")


def _check_loss_params(cfg: DictConfig) -> None:
    for name in UNIT_INTERVAL_LOSS_PARAMS:
        value = number_at(cfg, f"loss.fn.{name}")
        if value is not None and not 0 <= value <= 1:
            raise ConfigError(f"loss.fn.{name}={value}: must lie in [0, 1] (loss={value_at(cfg, 'loss.name')})")
    value_form = value_at(cfg, "loss.fn.value_form")
    if value_form is not None and value_form not in ("kl", "ce"):
        raise ConfigError(f"loss.fn.value_form={value_form!r}: must be 'kl' or 'ce'")
    encoding = value_at(cfg, "loss.fn.encoding")
    if encoding is not None and encoding not in ("sample", "topk"):
        raise ConfigError(f"loss.fn.encoding={encoding!r}: must be 'sample' or 'topk'")
    for name in ("num_draws", "k"):
        count = number_at(cfg, f"loss.fn.{name}", integer=True)
        if count is not None and count < 1:
            raise ConfigError(f"loss.fn.{name}={count}: must be >= 1")
    chunk_size = value_at(cfg, "loss.chunk_size")
    if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1):
        raise ConfigError(f"loss.chunk_size={chunk_size!r}: must be null (unchunked) or a positive integer")


def _callback_keys(cfg: DictConfig) -> list[str]:
    named = value_at(cfg, "callbacks")
    keys = [f"callbacks.{name}" for name in named] if isinstance(named, DictConfig) else []
    return keys + [key for key in ("temperature.callback", "loss.callback") if isinstance(value_at(cfg, key), DictConfig)]


def check_callback_configs(cfg: DictConfig) -> None:
    """Build every method callback (`callbacks.*`, `temperature.callback`, `loss.callback`) once,
    now: their `__init__` validates their arguments (Lightning's convention), and today the run builds
    them only after the teacher's pre-training. A failure is re-raised naming the config node, e.g.
    `loss.callback: TAIDSchedule: t_start=1.5 must be in [0, 1)` (the argument is `loss.callback.t_start`)."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    for key in _callback_keys(cfg):
        node = value_at(cfg, key)
        if not isinstance(node, DictConfig) or "_target_" not in node:
            continue
        try:
            instantiate(node)
        except (InstantiationException, ValueError, TypeError) as error:
            cause = error.__cause__ if isinstance(error, InstantiationException) and error.__cause__ else error
            raise ConfigError(f"{key}: {str(cause).splitlines()[0]}") from error


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
