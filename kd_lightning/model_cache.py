"""Content-addressed cache for models kd-lightning trains itself (teachers, no-KD baselines).

A key is a hash of everything that determines the result (resolved model/optimiser config, data
fingerprint, seed); an entry is written to a temporary directory and renamed into place, so an
interrupted run never leaves a half-written entry behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

CACHE_VERSION = 1


def cache_root(path: str | os.PathLike[str]) -> Path:
    return Path(os.path.expanduser(str(path))).resolve()


def config_key(payload: Any) -> str:
    """A short stable hash of a JSON-able payload."""
    text = json.dumps({"v": CACHE_VERSION, "payload": payload}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def write_atomically(target: Path, write: Callable[[Path], None], manifest: dict[str, Any]) -> Path:
    """Call `write(tmp_dir)`, add `kd_manifest.json`, then move the directory to `target`."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        write(tmp)
        (tmp / "kd_manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
        if target.exists():  # another process finished first: keep theirs
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def is_complete(entry: Path) -> bool:
    return (entry / "kd_manifest.json").is_file()
