"""Loading files kd-lightning wrote earlier, with errors that name the file and the fix.

A file can be damaged by a full disk, a copy that stopped half-way or a writer killed before the
atomic helpers existed. The libraries then raise bare errors (safetensors: `Error while
deserializing header: incomplete metadata, file not fully covered`; torch: `PytorchStreamReader
failed reading zip archive`, or an `UnpicklingError` that advises `weights_only=False`, which must
never be followed for a file one did not just write). These helpers turn them into one line naming
the file, what is wrong and what to do.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

# What to do about a damaged cache file (callers with other files pass their own `fix`).
FIX_CACHE = "delete it; it will be recomputed on the next run"


class DamagedFileError(RuntimeError):
    """A file kd-lightning wrote earlier cannot be read; the message names it and the fix."""


def _describe(error: BaseException) -> str:
    text = str(error).splitlines()[0].strip() if str(error).strip() else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _safetensors_error(path: Path, error: BaseException, fix: str) -> DamagedFileError:
    size = path.stat().st_size if path.exists() else 0
    return DamagedFileError(f"{path} is not a readable safetensors file ({size} bytes, {_describe(error)}): "
                            f"it is truncated or damaged; {fix}")


@contextmanager
def safe_open_checked(path: str | os.PathLike[str], fix: str = FIX_CACHE, framework: str = "pt",
                      device: str = "cpu") -> Iterator[Any]:
    """`safetensors.safe_open(path)` as a context manager; a damaged header raises
    `DamagedFileError` naming `path` and `fix`. Errors inside the `with` body pass unchanged."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        handle = safe_open(str(path), framework=framework, device=device)
    except Exception as error:
        raise _safetensors_error(path, error, fix) from error
    with handle as opened:
        yield opened


def sharded_checkpoint_problem(path: Path) -> str | None:
    """None for a whole sharded checkpoint directory (`strategy=fsdp`: Lightning's
    ModelParallelStrategy with torch.distributed.checkpoint), else what is wrong. Whole means: the
    `.metadata` that DCP writes after every process has written its shard, and Lightning's `meta.pt`
    (written after that, weights-only loadable, with the loop state)."""
    if not (path / ".metadata").is_file():
        return "a sharded checkpoint directory without .metadata (its save did not finish)"
    meta = path / "meta.pt"
    problem = checkpoint_problem(meta) if meta.is_file() else "missing"
    if problem == "not a Lightning checkpoint (no state_dict)":  # meta.pt holds the rest, not the weights
        state = torch.load(meta, map_location="cpu", weights_only=True, mmap=True)
        problem = None if "global_step" in state and "loops" in state else "no loop state"
    return None if problem is None else f"a sharded checkpoint directory whose meta.pt is {problem}"


def checkpoint_problem(path: str | os.PathLike[str]) -> str | None:
    """None when `path` loads with `torch.load(weights_only=True)` (or is a whole sharded checkpoint
    directory, `sharded_checkpoint_problem`), else what is wrong, in words.

    Loading is the check, with `mmap=True`: the archive's directory and the pickle are read and
    checked (a truncated or overwritten file, a type `weights_only` refuses), while tensor data is
    mapped rather than read, so even a multi-GB checkpoint is checked in a fraction of a second. The
    message never advises `weights_only=False`."""
    path = Path(path)
    if not path.exists():
        return "missing"
    if path.is_dir():
        return sharded_checkpoint_problem(path)
    if not path.is_file():
        return "not a file"
    size = path.stat().st_size
    if size == 0:
        return "empty (0 bytes)"
    if not zipfile.is_zipfile(path):
        return f"not a torch checkpoint archive ({size} bytes; truncated or overwritten)"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError:
        return "holds objects that a weights-only load refuses (not written by kd-lightning)"
    except Exception as error:  # torch raises RuntimeError/EOFError/KeyError for damaged archives
        return f"damaged ({size} bytes; {_describe(error)[:120]})"
    if not isinstance(state, dict) or "state_dict" not in state:
        return "not a Lightning checkpoint (no state_dict)"
    return None
