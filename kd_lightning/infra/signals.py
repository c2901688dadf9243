"""SIGTERM or Ctrl-C (SIGINT) in any stage ends the process with status 143 (130 for Ctrl-C) and one
line saying what was kept.

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

Ctrl-C is SIGTERM's equal: the same save and the same line (`Ctrl-C (SIGINT) during <stage>: ...`),
exit status 130 (128 + SIGINT). Lightning leaves SIGINT to Python, which raises KeyboardInterrupt
anywhere in a step; Lightning then exits 1 without a checkpoint. So a fit's SIGINT is deferred to
the end of the batch like SIGTERM (`kd_lightning.callbacks.interrupt.CheckpointOnSigterm` installs
`defer_sigint` for the fit), and outside a fit it stops at once. A second Ctrl-C aborts at once
(`abort_on_next_sigint`): status 130, one line, nothing more saved.
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
EXIT_SIGINT = 128 + signal.SIGINT
SIGNAL_NAMES = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "Ctrl-C (SIGINT)"}
_received: list[int] = []  # the signal that stopped the current block (the first one noted)

Saved = str | os.PathLike[str] | Callable[[], "str | os.PathLike[str] | None"] | None


class TerminatedOutsideFit(SIGTERMException):
    """SIGTERM received while no Trainer was fitting (raised by `exit_on_sigterm`'s handler)."""


def sigterm_message(stage: str, saved: str | os.PathLike[str] | None, signum: int = signal.SIGTERM) -> str:
    name = SIGNAL_NAMES.get(signum, signal.Signals(signum).name)
    if saved is None:
        return (f"{name} during {stage}: nothing partial was kept (caches and outputs are written whole or not "
                "at all); rerun the same command to redo it")
    return f"{name} during {stage}: saved {saved}; rerun the same command with resume=auto to continue"


def note_signal(signum: int) -> None:
    """Record which signal stops the block (safe in a signal handler: a list append)."""
    if not _received:
        _received.append(int(signum))


def _abort(signum: int, frame: FrameType | None) -> None:
    os.write(2, b"\nsecond Ctrl-C: aborting at once (nothing more is saved)\n")
    os._exit(EXIT_SIGINT)


def abort_on_next_sigint() -> None:
    """After the first Ctrl-C: the next one ends the process at once (the user insists)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _abort)


def defer_sigint(stop: Callable[[], None]) -> Callable[[int, FrameType | None], None]:
    """A SIGINT handler for a running fit: note the signal, arm the second Ctrl-C, and call `stop`
    (which asks the fit to stop at the end of the current batch, as Lightning does for SIGTERM)."""
    def handler(signum: int, frame: FrameType | None) -> None:
        note_signal(signum)
        abort_on_next_sigint()
        stop()
    return handler


def _handler(signum: int, frame: FrameType | None) -> None:
    # Called directly when we are the installed handler (no fit running), or by Lightning's composed
    # handler during a fit: then the installed handler is Lightning's and the signal is deferred.
    note_signal(signum)
    if signal.getsignal(signum) is _handler:
        if signum == signal.SIGINT:
            abort_on_next_sigint()
        raise TerminatedOutsideFit(128 + signum)


@contextmanager
def exit_on_sigterm(stage: str, saved: Saved = None) -> Iterator[None]:
    """Turn SIGTERM (or Ctrl-C) during the block into one log line and `SystemExit(143)` (130).

    `stage` names what was running (`teacher pre-training`, `distillation`, `CE baseline`,
    `stage=cache_teacher`, `TAKD assistant 1`). `saved` is what survives for a resume: a path, or a
    callable run once after the signal that may save something and returns its path (None: nothing).
    The previous SIGTERM handler is restored on exit. Outside the main thread no handler can be
    installed, and only Lightning's `SIGTERMException` is converted."""
    installed = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _handler) if installed else None
    previous_int = signal.signal(signal.SIGINT, _handler) if installed else None
    _received.clear()
    try:
        yield
    except SIGTERMException as interrupted:
        signum = _received[0] if _received else signal.SIGTERM
        if installed:  # a second SIGTERM while saving keeps the default action: the process ends
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            abort_on_next_sigint()
        path = saved() if callable(saved) else saved
        log.warning("%s", sigterm_message(stage, Path(path) if path is not None else None, signum))
        raise SystemExit(128 + signum) from interrupted
    finally:
        _received.clear()
        if installed:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
            signal.signal(signal.SIGINT, previous_int if previous_int is not None else signal.default_int_handler)
