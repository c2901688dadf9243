"""Directories a run will write, checked before any compute (issue #24).

- `check_run_dir_argument(argv)`: `hydra.run.dir=...` / `hydra.sweep.dir=...` given on the command line
  are checked before Hydra starts (Hydra creates the run directory before kd-lightning runs, and an
  unwritable one ended in a Hydra traceback). The nearest existing ancestor must be a directory this
  process may write; the message names the key and says what to do.
- `check_store_dirs(cfg)`: the teacher stores this run will write, `teacher_cache.dir`
  (`stage=cache_teacher`) and `teacher_outputs.dir` (`teacher_outputs.reuse=true`), with
  `checks.check_writable`; before, an unwritable `teacher_cache.dir` raised `PermissionError` after
  the teacher's pre-training.
- `check_pretrained_sources(cfg)`: a `pretrained=` value that is neither an existing directory nor a
  hub id the hub can serve (in the local hub cache, or the hub answers within 3 s).
"""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from kd_lightning.errors import ConfigError
from kd_lightning.run.checks.values import check_writable

RUN_DIR_KEYS = ("hydra.run.dir", "hydra.sweep.dir")


def directory_problem(path: str | os.PathLike[str]) -> str | None:
    """Why `path` cannot be created or written (without creating anything), or None."""
    directory = Path(os.path.expanduser(str(path))).absolute()
    probe = directory
    while not probe.exists():
        if probe.parent == probe:
            return "no existing parent"
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is a file, not a directory"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{probe} is not writable (Permission denied)"
    return None


def check_run_dir_argument(argv: list[str]) -> None:
    """Raise `ConfigError` when a `hydra.run.dir=`/`hydra.sweep.dir=` argument cannot be written."""
    for argument in argv:
        key, sep, value = argument.lstrip("+").partition("=")
        if sep and key in RUN_DIR_KEYS and "${" not in value:
            problem = directory_problem(value)
            if problem is not None:
                raise ConfigError(f"{key}={value!r}: cannot write there ({problem}); set {key} to a writable directory")


def check_store_dirs(cfg: DictConfig) -> None:
    """`teacher_cache.dir` for `stage=cache_teacher` and `teacher_outputs.dir` with reuse: writable."""
    cache = cfg.get("teacher_cache")
    if str(cfg.get("stage")) == "cache_teacher" and isinstance(cache, DictConfig) and cache.get("dir"):
        check_writable(cache.dir, "teacher_cache.dir")
    outputs = cfg.get("teacher_outputs")
    if isinstance(outputs, DictConfig) and outputs.get("reuse") and outputs.get("dir"):
        check_writable(outputs.dir, "teacher_outputs.dir")


def _pretrained_values(cfg: DictConfig) -> list[tuple[str, str]]:
    """(`<model key>.pretrained`, value) of the student and every teacher that has one."""
    keys = ["student.model", "teacher.model"]
    members = OmegaConf.select(cfg, "teacher.members")
    if isinstance(members, DictConfig):
        keys += [f"teacher.members.{name}.model" for name in members]
    found = []
    for key in keys:
        node = OmegaConf.select(cfg, key)
        if isinstance(node, DictConfig) and "pretrained" in node and not OmegaConf.is_missing(node, "pretrained"):
            value = node.get("pretrained")
            if isinstance(value, str) and value:
                found.append((f"{key}.pretrained", value))
    return found


def hub_reachable(timeout: float = 3.0) -> str | None:
    """None when the Hugging Face hub answers within `timeout` seconds, else why not."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError as error:
        return f"{host} cannot be reached: {error.strerror or error}"
    return None


def check_pretrained_sources(cfg: DictConfig) -> None:
    """A `pretrained=` value that is not an existing directory is a hub id: before any compute, say
    that the directory does not exist (absolute path) when the hub cannot serve it either (not in the
    local hub cache and no network access). Before, a relative path that does not exist was reported
    later as a tokenizer that cannot be loaded from the hub, under a key the user never set."""
    for key, value in _pretrained_values(cfg):
        path = Path(os.path.expanduser(value))
        if path.exists():
            continue  # a local directory: checks.check_local_pretrained says more if it is not a model
        parts = value.split("/")
        could_be_hub_id = len(parts) <= 2 and all(parts) and not value.startswith((".", "/", "~"))
        if not could_be_hub_id:
            continue  # checks.check_local_pretrained names the missing local path
        try:
            from huggingface_hub import try_to_load_from_cache

            if isinstance(try_to_load_from_cache(value, "config.json"), str):
                continue  # in the local hub cache: no network needed
        except Exception:  # noqa: BLE001 - an invalid repo id: the hub cannot serve it either
            pass
        offline = hub_reachable()
        if offline is None:
            continue  # the hub answers: from_pretrained fetches it (or names a missing repo)
        raise ConfigError(f"{key}={value!r}: no such directory ({path.absolute()}); taken as a hub id it cannot "
                          f"be fetched ({offline}): hub ids need network access. Give an existing saved model "
                          "directory, or run where the hub is reachable")


def check_teacher_weights(cfg: DictConfig) -> None:
    """`distill.teacher_weights`: one non-negative weight per teacher, not all 0 (before: refused by
    the module as `teacher_weights must be 2 non-negative numbers`, after the teachers were trained)."""
    weights = OmegaConf.select(cfg, "distill.teacher_weights")
    if weights is None or str(cfg.get("stage")) not in ("distill", "takd"):
        return
    teacher = cfg.get("teacher")
    members = teacher.get("teachers") if isinstance(teacher, DictConfig) else None
    names = [str(t.get("name")) for t in members] if members else [str(teacher.get("name"))]
    values = list(weights) if OmegaConf.is_list(weights) or isinstance(weights, (list, tuple)) else [weights]
    numbers = all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in values)
    if len(values) != len(names) or not numbers or any(w < 0 for w in values) or sum(values) <= 0:
        given = OmegaConf.to_container(weights) if OmegaConf.is_config(weights) else weights
        raise ConfigError(f"distill.teacher_weights={given}: needs {len(names)} non-negative number(s), one per teacher "
                          f"in this order: {', '.join(names)} (not all 0); got {len(values)}")


def uses_sharded_checkpoints(cfg: DictConfig) -> bool:
    """`strategy=fsdp` (kd-lightning's `ShardedDataParallel`) writes checkpoints as directories of shards."""
    target = OmegaConf.select(cfg, "trainer.strategy._target_", default=None)
    return isinstance(target, str) and target.endswith("ShardedDataParallel")


def check_checkpoint_layout(cfg: DictConfig, checkpoint: str | os.PathLike[str] | None) -> None:
    """A resume under another checkpoint layout (a DDP/single-process file under `strategy=fsdp`, or
    a sharded directory without it) is refused naming both, before compute. Before, with
    `+resume_allow_changes=true`, it ended in a strict-loading `KeyError` inside the fit."""
    if checkpoint is None:
        return
    path = Path(checkpoint)
    sharded_run, sharded_file = uses_sharded_checkpoints(cfg), path.is_dir()
    if sharded_run == sharded_file:
        return
    written = "a sharded checkpoint directory (strategy=fsdp)" if sharded_file else \
        "a single-file checkpoint (strategy=ddp, cpu or another whole-model strategy)"
    wanted = "strategy=fsdp, which loads sharded checkpoint directories" if sharded_run else \
        "a whole-model strategy, which loads single-file checkpoints"
    raise ConfigError(f"resume={cfg.get('resume')}: {path} is {written}, but this run uses {wanted}; a checkpoint "
                      "cannot move between the two layouts. Resume with the strategy that wrote it, or start a new "
                      "run in another hydra.run.dir")
