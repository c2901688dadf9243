"""SIGTERM in any stage ends the process with status 143 and one line saying what was kept.

Lightning turns SIGTERM into `SIGTERMException` at the end of the current training batch, but only
while a Trainer is fitting; outside a fit (writing caches, evaluating, saving) the default action
kills the process with no message, and a stage that catches nothing exits 0 after Lightning's
exception. `exit_on_sigterm` covers both:

    with exit_on_sigterm("teacher pre-training", saved=lambda: checkpoint_path):
        trainer.fit(...)

- inside a fit, Lightning's own handler (which also calls ours) defers the signal to the end of the
  batch; ours then does nothing, so a checkpoint is written at a consistent step;
- outside a fit, ours raises at once;
- either way the block ends with `SIGTERM during <stage>: saved <path>; rerun the same command with
  resume=auto to continue` on the log and `SystemExit(143)` (128 + SIGTERM, what shells and
  schedulers expect from a terminated job).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger("kd_lightning")

EXIT_SIGTERM = 128 + signal.SIGTERM

Saved = str | os.PathLike[str] | Callable[[], "str | os.PathLike[str] | None"] | None


class TerminatedOutsideFit(SIGTERMException):
    """SIGTERM received while no Trainer was fitting (raised by `exit_on_sigterm`'s handler)."""


def sigterm_message(stage: str, saved: str | os.PathLike[str] | None) -> str:
    if saved is None:
        return (f"SIGTERM during {stage}: nothing partial was kept (caches and outputs are written whole or not "
                "at all); rerun the same command to redo it")
    return f"SIGTERM during {stage}: saved {saved}; rerun the same command with resume=auto to continue"


def _handler(signum: int, frame: FrameType | None) -> None:
    # Called directly when we are the installed handler (no fit running), or by Lightning's composed
    # handler during a fit: then the installed handler is Lightning's and the signal is deferred.
    if signal.getsignal(signal.SIGTERM) is _handler:
        raise TerminatedOutsideFit(EXIT_SIGTERM)


@contextmanager
def exit_on_sigterm(stage: str, saved: Saved = None) -> Iterator[None]:
    """Turn SIGTERM during the block into one log line and `SystemExit(143)`.

    `stage` names what was running (`teacher pre-training`, `distillation`, `CE baseline`,
    `stage=cache_teacher`, `TAKD assistant 1`). `saved` is what survives for a resume: a path, or a
    callable run once after the signal that may save something and returns its path (None: nothing).
    The previous SIGTERM handler is restored on exit. Outside the main thread no handler can be
    installed, and only Lightning's `SIGTERMException` is converted."""
    installed = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _handler) if installed else None
    try:
        yield
    except SIGTERMException as interrupted:
        if installed:  # a second SIGTERM while saving keeps the default action: the process ends
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        path = saved() if callable(saved) else saved
        log.warning("%s", sigterm_message(stage, Path(path) if path is not None else None))
        raise SystemExit(EXIT_SIGTERM) from interrupted
    finally:
        if installed:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
