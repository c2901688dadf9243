"""A resumed run keeps its meaning, and the original record of the run is never overwritten.

- `record_run_config(output_dir, config)`: the resolved config of the first start, written once to
  `<output_dir>/run_config.yaml` (atomically, never replaced).
- `compare_for_resume(recorded, new, allow)`: the meaning-changing keys that differ between the
  recorded config and a resumed invocation's; an error naming them (old -> new) unless allowed.
- `keep_hydra_record(output_dir)`: Hydra rewrites `<output_dir>/.hydra/{config,hydra,overrides}.yaml`
  on every start, before the task function runs (`hydra/core/utils.py:run_job`). The first start's
  files are kept in `.hydra/original/`; a later start's files are saved as `<name>.resume-<n>.yaml`
  and the originals copied back, so `.hydra/config.yaml` always shows how the run was started.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from kd_lightning.infra.atomic import atomic_directory, atomic_write_text

RUN_CONFIG_NAME = "run_config.yaml"
HYDRA_FILES = ("config.yaml", "hydra.yaml", "overrides.yaml")
ORIGINAL_DIR = "original"
ALLOW_CHANGES_KEY = "resume_allow_changes"

# Keys whose change does not change what is trained, so a resume may differ in them (fnmatch patterns
# on dotted keys). Everything else (loss, data, models, optimiser, seed, weights, temperature,
# callbacks, precision, ...) must match the recorded run.
RESUME_IGNORED_KEYS: tuple[str, ...] = (
    "resume", ALLOW_CHANGES_KEY,
    "hydra", "hydra.*",
    "paths.*",                      # where things are written, not what
    "logger", "logger.*",           # where metrics go
    "progress_bar", "progress_bar.*",
    "cpu_threads",                  # speed only (CPU results are bitwise equal across thread counts here)
    "trainer.max_steps",            # extending (or shortening) a run is legitimate
    "trainer.enable_progress_bar", "trainer.enable_model_summary", "trainer.log_every_n_steps",
    "trainer.default_root_dir", "checkpoint.dirpath",
    "baseline",                     # whether the CE-only baseline is also reported; the student is the same
    "teacher_outputs.reuse", "teacher_outputs.dir", "teacher_outputs.flush_rows", "teacher_outputs.max_gb",
    "teacher_cache.dir",            # a relocated cache; its manifest is checked against the run anyway
)


class ResumeConfigError(ValueError):
    """A resumed invocation changes keys that change what the run trains."""


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}}` -> `{"a.b": 1}`; lists are values; an empty mapping adds no key (so
    `callbacks: {}` and an absent `callbacks` compare equal)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def _ignored(key: str, ignored: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(key, pattern) for pattern in ignored)


def _plain(config: Mapping[str, Any]) -> dict[str, Any]:
    """A YAML round trip, so a recorded config and a fresh one compare alike (tuples -> lists)."""
    return yaml.safe_load(yaml.safe_dump(dict(config), sort_keys=True)) or {}


def record_run_config(output_dir: str | os.PathLike[str], config: Mapping[str, Any], *,
                      fresh: bool = False) -> tuple[Path, bool]:
    """Write the run's resolved config (plain dict, `hydra` left out) to `<output_dir>/run_config.yaml`
    once, on the first start; later starts leave it alone. `fresh=True` (a start without `resume` in
    a directory the guard found without checkpoints or summary: nothing of the old run is continued)
    records anew. Returns (path, whether it was written now)."""
    path = Path(output_dir) / RUN_CONFIG_NAME
    if path.exists() and not fresh:
        return path, False
    atomic_write_text(path, yaml.safe_dump(_plain(config), sort_keys=True))
    return path, True


def load_run_config(output_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    path = Path(output_dir) / RUN_CONFIG_NAME
    if not path.exists():
        return None
    return yaml.safe_load(path.read_text()) or {}


def compare_for_resume(recorded: Mapping[str, Any], new: Mapping[str, Any], allow: bool = False,
                       ignored: tuple[str, ...] = RESUME_IGNORED_KEYS) -> list[str]:
    """The meaning-changing differences between the recorded config and a resume's, one
    `key: old -> new` string each (a missing key shows as `<absent>`).

    Raises `ResumeConfigError` listing them unless `allow` (`+resume_allow_changes=true`), in which
    case the caller logs the returned list as a warning."""
    old, fresh = flatten(_plain(recorded)), flatten(_plain(new))
    changes = []
    for key in sorted(set(old) | set(fresh)):
        if _ignored(key, ignored):
            continue
        before, after = old.get(key, "<absent>"), fresh.get(key, "<absent>")
        if before != after:
            changes.append(f"{key}: {before!r} -> {after!r}")
    if changes and not allow:
        raise ResumeConfigError(
            f"resume would change what this run trains ({len(changes)} key(s)): " + "; ".join(changes)
            + f". Rerun with the original values, choose another hydra.run.dir for a new run, or pass "
            f"+{ALLOW_CHANGES_KEY}=true to continue with the new values anyway")
    return changes


def keep_hydra_record(output_dir: str | os.PathLike[str], *, fresh: bool = False) -> Path | None:
    """Call at every start, after Hydra wrote `.hydra/`. First start (or `fresh`, as in
    `record_run_config`): copy `.hydra/*.yaml` to `.hydra/original/`. Later starts: save this start's
    files as `.hydra/<name>.resume-<n>.yaml` (n = 1, 2, ...) and copy the originals back over
    `.hydra/<name>.yaml`. Returns the path of the saved resume config, or None on a first start (or
    when Hydra wrote no `.hydra/`)."""
    hydra_dir = Path(output_dir) / ".hydra"
    original = hydra_dir / ORIGINAL_DIR
    present = [hydra_dir / name for name in HYDRA_FILES if (hydra_dir / name).exists()]
    if not present:
        return None
    if fresh or not original.exists():
        with atomic_directory(original, replace=True) as staging:
            for file in present:
                shutil.copy2(file, staging / file.name)
        return None
    number = 1
    while any((hydra_dir / f"{Path(name).stem}.resume-{number}.yaml").exists() for name in HYDRA_FILES):
        number += 1
    for file in present:
        os.replace(file, hydra_dir / f"{file.stem}.resume-{number}.yaml")
    for name in HYDRA_FILES:
        if (original / name).exists():
            atomic_write_text(hydra_dir / name, (original / name).read_text())
    return hydra_dir / f"config.resume-{number}.yaml"
