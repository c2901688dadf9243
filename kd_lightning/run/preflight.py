"""Directories a run will write, checked before any compute (issue #24).

- `check_run_dir_argument(argv)`: `hydra.run.dir=...` / `hydra.sweep.dir=...` given on the command line
  are checked before Hydra starts (Hydra creates the run directory before kd-lightning runs, and an
  unwritable one ended in a Hydra traceback). The nearest existing ancestor must be a directory this
  process may write; the message names the key and says what to do.
- `check_store_dirs(cfg)`: the teacher stores this run will write, `teacher_cache.dir`
  (`stage=cache_teacher`) and `teacher_outputs.dir` (`teacher_outputs.reuse=true`), with
  `checks.check_writable`; before, an unwritable `teacher_cache.dir` raised `PermissionError` after
  the teacher's pre-training.
"""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig

from kd_lightning.errors import ConfigError
from kd_lightning.run.checks import check_writable

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
