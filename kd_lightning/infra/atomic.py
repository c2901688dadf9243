"""Atomic writes: a reader sees the old file (or directory) or the new one, never half of either.

Every file kd-lightning writes for later reading (summaries, manifests, run records, saved models,
caches) goes through here. A file is written to a hidden temporary sibling, flushed and fsynced,
then `os.replace`d over the target (atomic on POSIX within one filesystem). A directory is built in
a hidden sibling and renamed into place; an older directory is renamed aside first and deleted only
once the new one is in place.

Temporaries are named `.<target name>.tmp-<pid>-<random>`, so `clean_stale_temporaries` can tell a
leftover of an interrupted writer (its process is dead) from a live writer's work in progress.

`tempfile` creates temporaries private (0600 files, 0700 directories) and a rename keeps that mode,
so every atomically written file would be unreadable to the rest of a team sharing a cache or an
output directory. The temporaries are given the mode a plain `open`/`mkdir` would give instead
(0666 / 0777 less the process's umask: `plain_mode`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

TMP_MARK = ".tmp-"
OLD_MARK = ".old-"  # an older directory renamed aside while its replacement moves in


def _temp_prefix(target: Path, mark: str = TMP_MARK) -> str:
    return f".{target.name}{mark}{os.getpid()}-"


def current_umask() -> int:
    """The process's umask, read from /proc where Linux offers it (no change even for an instant,
    so other threads are unaffected), else by setting and restoring it."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def plain_mode(path: str | os.PathLike[str] | int, *, directory: bool = False) -> None:
    """Give `path` (or an open file descriptor) the mode a plain `open`/`mkdir` would have given it:
    0666 (0777 for a directory) less the umask. For temporaries made by `tempfile`, which are private."""
    mode = (0o777 if directory else 0o666) & ~current_umask()
    if isinstance(path, int):
        os.fchmod(path, mode)
    else:
        os.chmod(path, mode)


def plain_modes_under(directory: Path) -> None:
    """`plain_mode` for everything in a staged directory (writers such as safetensors >= 0.8 create
    their files 0600 too); execute bits are kept."""
    for root, dirs, files in os.walk(directory):
        for name in dirs:
            plain_mode(Path(root) / name, directory=True)
        for name in files:
            path = Path(root) / name
            if not path.is_symlink():
                executable = path.stat().st_mode & 0o111 & ~current_umask()
                plain_mode(path)
                if executable:
                    os.chmod(path, path.stat().st_mode | executable)


def _fsync_directory(directory: Path) -> None:
    """Make a rename durable: fsync the directory entry (a no-op where the OS does not allow it)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_file(path: str | os.PathLike[str], write: Callable[[Path], object]) -> Path:
    """`write(temporary)` writes the whole file at the path it is given (a hidden sibling of `path`,
    not yet existing), e.g. ``lambda tmp: save_file(tensors, str(tmp))``; then fsync and `os.replace`
    it over `path`. On any exception the temporary is removed and `path` is untouched."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.parent / f"{_temp_prefix(target)}{uuid.uuid4().hex[:8]}"
    try:
        write(temporary)
        plain_mode(temporary)  # writers such as safetensors >= 0.8 create their files 0600
        _fsync_file(temporary)
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    _fsync_directory(target.parent)
    return target


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write `data` to `path` atomically (`atomic_write_file`)."""

    def write(temporary: Path) -> None:
        with open(temporary, "xb") as handle:
            handle.write(data)

    return atomic_write_file(path, write)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """`atomic_write_bytes` for UTF-8 text."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any, *, indent: int | None = 2) -> Path:
    """`obj` as JSON (keys sorted, non-JSON values via `str`), written atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=True, default=str) + "\n")


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike[str], *, replace: bool = True) -> Iterator[Path]:
    """Stage a directory in a hidden sibling; on success rename it to `target`.

        with atomic_directory(output_dir / "student") as staging:
            model.save_pretrained(staging)

    An existing `target` is replaced safely (`replace=True`): it is renamed aside, the new one is
    renamed in, then the old one is deleted, so at every instant `target` is either the old or the new
    directory (never a mix); after a crash between the two renames `clean_stale_temporaries` puts the
    old one back. With `replace=False` an existing `target`
    wins (another writer finished first) and the staged copy is discarded. On an exception the staged
    directory is deleted and `target` is untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=_temp_prefix(target), dir=target.parent))
    try:
        plain_mode(staging, directory=True)  # mkdtemp's 0700 would survive the rename
        yield staging
        plain_modes_under(staging)
        _move_into_place(staging, target, replace=replace)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _move_into_place(staging: Path, target: Path, *, replace: bool) -> None:
    if target.exists():
        if not replace:
            shutil.rmtree(staging)
            return
        aside = Path(tempfile.mkdtemp(prefix=_temp_prefix(target, OLD_MARK), dir=target.parent))
        aside.rmdir()  # only the unique name is wanted
        os.replace(target, aside)
        try:
            os.replace(staging, target)
        except BaseException:
            os.replace(aside, target)  # put the old one back
            raise
        shutil.rmtree(aside, ignore_errors=True)
    else:
        try:
            os.replace(staging, target)
        except OSError:
            if not (target.exists() and not replace):  # lost a race with another writer: keep theirs
                raise
            shutil.rmtree(staging, ignore_errors=True)
    _fsync_directory(target.parent)


def pid_alive(pid: int) -> bool:
    """True while a process with this pid exists on this host (whoever owns it)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _owner_pid(name: str) -> tuple[int, str] | None:
    """(writer's pid, target name) from `.<target>.tmp-<pid>-<random>` (or `.old-`), else None."""
    for mark in (TMP_MARK, OLD_MARK):
        head, found, rest = name.partition(mark)
        pid = rest.split("-", 1)[0]
        if found and pid.isdigit():
            return int(pid), head[1:]
    return None


def clean_stale_temporaries(parent: str | os.PathLike[str], prefix: str = "", *,
                            min_age_seconds: float = 3600.0) -> list[Path]:
    """Delete hidden temporaries (files or directories) in `parent` left by interrupted writers.

    An older directory set aside by `atomic_directory` whose target is missing (the writer died
    between its two renames) is renamed back instead. Only entries named `.<prefix>*.tmp-<pid>-*`
    (or `.old-`) whose writer process is dead here and that have not
    changed for `min_age_seconds` are removed: this host's live writers are recognised by their pid,
    and the age guards a writer on another host sharing the directory (a cache on NFS), whose pid means
    nothing here. Returns the removed paths. (A pid reused by an unrelated process only delays the
    clean-up.)
    """
    parent = Path(parent)
    removed: list[Path] = []
    if not parent.is_dir():
        return removed
    now = time.time()
    for entry in parent.iterdir():
        if not entry.name.startswith(f".{prefix}"):
            continue
        owner = _owner_pid(entry.name)
        if owner is None or pid_alive(owner[0]):
            continue
        try:
            if now - entry.lstat().st_mtime < min_age_seconds:
                continue
        except FileNotFoundError:
            continue
        target = parent / owner[1]
        if OLD_MARK in entry.name and not target.exists():  # died between the two renames: undo
            os.replace(entry, target)
            removed.append(entry)
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
        removed.append(entry)
    return removed
