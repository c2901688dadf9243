"""What changed on each resume, and when (issue #24).

A resume with `+resume_allow_changes=true` continues a run with other values (another loss, say).
`summary.json` named only the values of the last start, so a run trained with `kl` for 3 steps and
`reverse_kl` for 3 more read as a `reverse_kl` run. Every resume that changes a meaning-changing key
appends one entry to `<output_dir>/resume_history.json` (written atomically):

    {"resume": 1, "time": "2026-12-06T01:02:03+0000", "from_checkpoint": "last.ckpt", "from_step": 3,
     "changes": {"loss.name": {"from": "kl", "to": "reverse_kl"}, ...}}

The changes are relative to the previous start (the recorded first start with the earlier entries
applied), so the list reads as the run's history; the distillation stage copies it into
`summary.json` as `resume_history`. A fresh start in the directory clears it.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kd_lightning.infra.atomic import atomic_write_json
from kd_lightning.infra.runrecord import RESUME_IGNORED_KEYS, _ignored, _plain, flatten

HISTORY_NAME = "resume_history.json"
ABSENT = "<absent>"


def load_resume_history(output_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    path = Path(output_dir) / HISTORY_NAME
    if not path.is_file():
        return []
    try:
        history = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    return history if isinstance(history, list) else []


def _checkpoint_step(checkpoint: Path | None) -> int | None:
    """The checkpoint's global step, read without loading its tensors (None if it cannot be read)."""
    if checkpoint is None or not Path(checkpoint).is_file():
        return None
    try:
        import torch

        state = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
        return int(state.get("global_step")) if isinstance(state, dict) and "global_step" in state else None
    except Exception:  # noqa: BLE001 - the step is a courtesy; the checkpoint itself was checked already
        return None


def record_resume(output_dir: str | os.PathLike[str], recorded: Mapping[str, Any], config: Mapping[str, Any],
                  checkpoint: Path | None) -> dict[str, Any] | None:
    """Append this resume's changes (relative to the previous start) to the history; returns the
    entry, or None when nothing meaning-changing differs from the previous start."""
    history = load_resume_history(output_dir)
    previous = {k: v for k, v in flatten(_plain(recorded)).items() if not _ignored(k, RESUME_IGNORED_KEYS)}
    for entry in history:
        for key, change in entry.get("changes", {}).items():
            if change.get("to") == ABSENT:
                previous.pop(key, None)
            else:
                previous[key] = change.get("to")
    now = {k: v for k, v in flatten(_plain(config)).items() if not _ignored(k, RESUME_IGNORED_KEYS)}
    changes = {key: {"from": previous.get(key, ABSENT), "to": now.get(key, ABSENT)}
               for key in sorted(set(previous) | set(now)) if previous.get(key, ABSENT) != now.get(key, ABSENT)}
    if not changes:
        return None
    entry = {"resume": len(history) + 1, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
             "from_checkpoint": None if checkpoint is None else Path(checkpoint).name,
             "from_step": _checkpoint_step(checkpoint), "changes": changes}
    atomic_write_json(Path(output_dir) / HISTORY_NAME, [*history, entry])
    return entry


def clear_resume_history(output_dir: str | os.PathLike[str]) -> None:
    """A fresh start: the directory's earlier history is not this run's."""
    (Path(output_dir) / HISTORY_NAME).unlink(missing_ok=True)
