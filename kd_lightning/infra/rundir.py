"""The run-directory guard: one run per directory, no silent overwrite, resume from a valid checkpoint.

- `RunDirLock(output_dir)`: an exclusive advisory lock on `<output_dir>/.kd_lock`; a second run in
  the same directory fails at once naming the directory and the owner's pid. The kernel drops the
  lock when its process dies (even by SIGKILL), so a stale lock file never blocks.
- `guard_run_dir(output_dir, resume)`: refuses to start a fresh run over a finished run or over
  checkpoints unless `resume` is set.
- `find_resume_checkpoint(checkpoint_dir)`: for `resume=auto`, `last.ckpt` when it loads, else the
  newest valid `step*.ckpt`; a damaged file is named with what is wrong.
- `start_run(...)`: all of the above plus the run record (`kd_lightning.infra.runrecord`) in one call, for
  the start of a run (rank 0, before any compute);
- `begin_run(...)`: `start_run` on DDP rank 0, only the checkpoint on the other ranks: what a run
  (`kd_lightning.run.pipeline`) and each stage of a TAKD chain call.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from kd_lightning.infra.distributed import is_global_zero
from kd_lightning.infra.resume_history import clear_resume_history, record_resume
from kd_lightning.infra.runrecord import compare_for_resume, keep_hydra_record, load_run_config, record_run_config
from kd_lightning.infra.safeload import checkpoint_problem

log = logging.getLogger("kd_lightning")

LOCK_NAME = ".kd_lock"
SUMMARY_NAME = "summary.json"
CHECKPOINT_DIR = "checkpoints"
LAST_NAME = "last.ckpt"


class RunDirBusyError(RuntimeError):
    """Another live process holds the run directory's lock."""


class ResumeCheckpointError(FileNotFoundError):
    """`resume=auto` found checkpoints but none of them loads."""


class RunDirLock:
    """Exclusive advisory lock (`fcntl.flock`) on `<output_dir>/.kd_lock`, held for the run.

        with RunDirLock(output_dir):
            ...  # the whole run

    The lock file holds the owner's pid, host and start time (JSON) so the error can name them. It is
    released on exit, also on exceptions; a process that dies loses its lock with its file
    descriptor, so a leftover `.kd_lock` never blocks a later run. Under DDP take it on rank 0 only.
    (flock is advisory and local: two hosts sharing an NFS directory may not see each other's lock.)
    """

    def __init__(self, output_dir: str | os.PathLike[str]) -> None:
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> RunDirLock:
        if self._fd is not None:
            return self
        self.output_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(fd)
            if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise RunDirBusyError(f"{self.output_dir} is in use by another run ({self._describe_owner()}); wait for it "
                                  "to finish or choose another hydra.run.dir") from None
        owner = {"pid": os.getpid(), "host": socket.gethostname(),
                 "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(owner) + "\n").encode(), 0)
        self._fd = fd
        return self

    def _describe_owner(self) -> str:
        try:
            owner = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            owner = {}
        if not owner:
            return "owner unknown"
        return f"pid {owner.get('pid')} on {owner.get('host')}, started {owner.get('started')}"

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)  # the file stays (unlinking would race a waiting opener); empty = free
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __enter__(self) -> RunDirLock:
        return self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


def resume_requested(resume: object) -> bool:
    return resume not in (None, "", "null", False)


def guard_run_dir(output_dir: str | os.PathLike[str], resume: object) -> None:
    """Before any compute: refuse a fresh run (`resume` unset) in a directory that already holds a
    finished run (`summary.json`) or checkpoints (`checkpoints/*.ckpt`), which it would overwrite."""
    output_dir = Path(output_dir)
    if resume_requested(resume):
        return
    if (output_dir / SUMMARY_NAME).exists():
        raise FileExistsError(f"{output_dir} already holds a finished run ({SUMMARY_NAME}); choose another "
                              "hydra.run.dir or pass resume=auto to continue it")
    checkpoints = sorted((output_dir / CHECKPOINT_DIR).glob("*.ckpt"))
    if checkpoints:
        raise FileExistsError(f"{output_dir} holds checkpoints of an unfinished run ({checkpoints[-1].name}, "
                              f"{len(checkpoints)} in all); pass resume=auto to continue it or choose another "
                              "hydra.run.dir")


def _step_of(path: Path) -> int:
    match = re.search(r"(\d+)", path.stem)
    return int(match.group(1)) if match else -1


def find_resume_checkpoint(checkpoint_dir: str | os.PathLike[str]) -> tuple[Path | None, list[str]]:
    """The checkpoint `resume=auto` continues from, and notes to log (one line each).

    `last.ckpt` when it loads with `torch.load(weights_only=True)`; when it is missing or damaged,
    the newest valid `step*.ckpt` (by step number, then modification time), with a note naming it and
    what was wrong with `last.ckpt`. `(None, [note])` when the directory holds no checkpoint at all
    (a fresh start). Raises `ResumeCheckpointError` naming every file and its fault when checkpoints
    exist but none loads.
    """
    checkpoint_dir = Path(checkpoint_dir)
    last = checkpoint_dir / LAST_NAME
    steps = sorted((p for p in checkpoint_dir.glob("step*.ckpt") if p.is_file() or p.is_dir()),
                   key=lambda p: (_step_of(p), p.stat().st_mtime), reverse=True)
    if not last.exists() and not steps:
        return None, [f"resume=auto: no checkpoint in {checkpoint_dir}, starting fresh"]
    faults: list[str] = []
    last_problem = checkpoint_problem(last) if last.exists() else "missing"
    if last_problem is None:
        return last, []
    if last.exists():
        faults.append(f"{last.name}: {last_problem}")
    for candidate in steps:
        problem = checkpoint_problem(candidate)
        if problem is None:
            note = (f"resume=auto: {LAST_NAME} is {last_problem}; continuing from {candidate} instead "
                    f"(the newest valid checkpoint)")
            return candidate, [note]
        faults.append(f"{candidate.name}: {problem}")
    raise ResumeCheckpointError(f"resume=auto: no usable checkpoint in {checkpoint_dir}: " + "; ".join(faults)
                                + ". Restore a good copy, or delete the checkpoints directory to start over")


def resolve_resume(resume: object, checkpoint_dir: str | os.PathLike[str]) -> tuple[Path | None, list[str]]:
    """`resume` as the run's config gives it -> the checkpoint to pass to `Trainer.fit(ckpt_path=)`.
    null: None; `auto`: `find_resume_checkpoint`; a path: that file, which must load weights-only."""
    if not resume_requested(resume):
        return None, []
    if str(resume) == "auto":
        return find_resume_checkpoint(checkpoint_dir)
    path = Path(os.path.expanduser(str(resume)))
    problem = checkpoint_problem(path)
    if problem == "missing":
        raise FileNotFoundError(f"resume={resume}: no checkpoint at {path}")
    if problem is not None:
        raise ResumeCheckpointError(f"resume={resume}: {path} is {problem}; pass another checkpoint or resume=auto")
    return path, []


@dataclass
class RunStart:
    """What `start_run` found: the held lock (release it when the run ends), the checkpoint to resume
    from (None: start fresh), and lines to log."""

    lock: RunDirLock
    checkpoint: Path | None
    notes: list[str] = field(default_factory=list)


def start_run(output_dir: str | os.PathLike[str], resume: object, config: Mapping[str, Any], *,
              allow_changes: bool = False, checkpoint_dir: str | os.PathLike[str] | None = None) -> RunStart:
    """The start of a run, in order: take the directory's lock; refuse a fresh run over a finished or
    checkpointed one; keep the first start's `.hydra/` record; on a resume, compare `config` (the
    resolved config without `hydra`) with the recorded one (`ResumeConfigError` unless
    `allow_changes`); record it on the first start; find the checkpoint to continue from. The lock
    is released again if any step fails."""
    output_dir = Path(output_dir)
    try:
        lock = RunDirLock(output_dir).acquire()
    except RunDirBusyError:
        _restore_hydra_record(output_dir)  # Hydra already wrote this refused start over the live run's
        raise
    try:
        try:
            guard_run_dir(output_dir, resume)
        except FileExistsError:
            _restore_hydra_record(output_dir)
            raise
        fresh = not resume_requested(resume)  # the guard found nothing to continue
        keep_hydra_record(output_dir, fresh=fresh)
        recorded = None if fresh else load_run_config(output_dir)
        notes = []
        if recorded is not None:
            changes = compare_for_resume(recorded, config, allow=allow_changes)
            notes += [f"resume: continuing with a changed key (+resume_allow_changes=true): {c}" for c in changes]
        record_run_config(output_dir, config, fresh=fresh)
        checkpoint, found = resolve_resume(resume, checkpoint_dir or output_dir / CHECKPOINT_DIR)
        if fresh:
            clear_resume_history(output_dir)
        elif recorded is not None and notes:  # allowed changes: summary.json keeps what changed when
            record_resume(output_dir, recorded, config, checkpoint)
        return RunStart(lock, checkpoint, notes + found)
    except BaseException:
        lock.release()
        raise


def begin_run(output_dir: str | os.PathLike[str], resume: object, config: Mapping[str, Any], *,
              allow_changes: bool = False) -> tuple[RunDirLock | None, Path | None]:
    """Before any compute: on rank 0 `start_run` (the lock, the guard, the run record, the checkpoint;
    its notes are logged); other DDP ranks only find the checkpoint. Returns (the lock to hold for
    the whole run, None on other ranks; the checkpoint to continue from)."""
    if not is_global_zero():
        return None, resolve_resume(resume, Path(output_dir) / CHECKPOINT_DIR)[0]
    started = start_run(output_dir, resume, config, allow_changes=allow_changes)
    for note in started.notes:
        log.info("%s", note)
    return started.lock, started.checkpoint


def _restore_hydra_record(output_dir: Path) -> None:
    """A refused start: Hydra has already rewritten `.hydra/`; put the original record back (the
    refused invocation is kept as `<name>.resume-<n>.yaml`)."""
    if (output_dir / ".hydra" / "original").is_dir():
        keep_hydra_record(output_dir)
