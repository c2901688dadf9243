"""Content-addressed cache for models kd-lightning trains itself (teachers, no-KD baselines).

A key is a hash of everything that determines the result (resolved model/optimiser config, data
fingerprint, seed); an entry is written to a temporary directory and renamed into place, so an
interrupted run never leaves a half-written entry behind.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kd_lightning.infra.atomic import atomic_directory, atomic_write_json, clean_stale_temporaries

CACHE_VERSION = 1


def cache_root(path: str | os.PathLike[str]) -> Path:
    return Path(os.path.expanduser(str(path))).resolve()


def config_key(payload: Any) -> str:
    """A short stable hash of a JSON-able payload."""
    text = json.dumps({"v": CACHE_VERSION, "payload": payload}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def write_atomically(target: Path, write: Callable[[Path], None], manifest: dict[str, Any]) -> Path:
    """Call `write(tmp_dir)`, add `kd_manifest.json`, then move the directory to `target`.

    If another process finished the same entry first, theirs is kept (entries are content-addressed,
    so both are equal). Leftovers of writers that died mid-way are removed first."""
    clean_stale_temporaries(target.parent, prefix=target.name)
    with atomic_directory(target, replace=False) as tmp:
        write(tmp)
        atomic_write_json(tmp / "kd_manifest.json", manifest)
    return target


def is_complete(entry: Path) -> bool:
    return (entry / "kd_manifest.json").is_file()


def check_entry_weights(entry: Path) -> None:
    """Before loading a cached model (teacher, baseline): every `*.safetensors` of the entry has a
    whole header and the size it promises; else `DamagedFileError` naming the file and the fix
    (before: the safetensors library's own error, without a path)."""
    from kd_lightning.infra.safeload import safe_open_checked

    fix = f"delete the cache entry {entry} (rm -r); the model is trained again and cached on the next run"
    for path in sorted(entry.glob("*.safetensors")):
        with safe_open_checked(path, fix=fix):
            pass
