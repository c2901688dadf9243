"""Nothing lost on SIGTERM or Ctrl-C: save a resumable checkpoint before the process exits."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

from lightning import Callback, LightningModule, Trainer
from typing_extensions import override
from lightning.pytorch.utilities.exceptions import SIGTERMException

from kd_lightning.infra.distributed import all_reduce_sums
from kd_lightning.infra.signals import defer_sigint, note_signal

log = logging.getLogger("kd_lightning")


class CheckpointOnSigterm(Callback):
    """On SIGTERM (a cluster pre-emption, `kill`, a job time limit) write `last.ckpt` into the
    ModelCheckpoint directory, so `resume=auto` continues from the last finished step.

    Lightning defers SIGTERM to the end of the current training batch (after the optimiser step)
    and raises `SIGTERMException` there: the saved state is consistent. Ctrl-C (SIGINT) is treated
    the same way (deferred to the end of the batch, then the same save; see `kd_lightning.infra.
    signals`); SIGKILL cannot be caught, and a run killed that way resumes from the last periodic
    checkpoint.

    `path` overrides where it goes (a Trainer without ModelCheckpoint, e.g. teacher pre-training).
    An exception with `resumable = True` (`kd_lightning.teachers.vllm_client.TeacherUnavailable`: the
    step failed before its optimiser step) is saved for the same way, in a single process.
    It only saves and records the file in `saved`; the stage says so in one line and exits 143:
    `with kd_lightning.infra.signals.exit_on_sigterm(stage, saved=lambda: callback.saved): trainer.fit(...)`.
    """

    def __init__(self, filename: str = "last.ckpt", path: str | Path | None = None) -> None:
        self.filename, self.path = filename, path
        self.saved: Path | None = None
        self.pending = False  # several processes: a SIGTERM noted here, not yet agreed on
        self.pending_sigint = False  # likewise for Ctrl-C
        self.agree = False

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Several processes (DDP, FSDP): every process must stop after the same step, since saving is a
        collective. Lightning's handler runs a collective inside the signal handler and forwards the
        signal to the other processes, so a process signalled twice (by the scheduler and by rank 0)
        desynchronises them and the run hangs. This handler only notes the signal; after every
        training batch the processes agree (one all-reduce) and, if any was signalled, all raise
        Lightning's `SIGTERMException` at the end of that same batch. Lightning restores the previous
        handler when the fit ends."""
        self.pending, self.pending_sigint, self.agree = False, False, False
        if threading.current_thread() is not threading.main_thread():
            return
        if trainer.world_size > 1:
            signal.signal(signal.SIGTERM, self._note)
            self.agree = True
        # Ctrl-C waits for the end of the batch like SIGTERM (Lightning restores the handler after the fit)
        signal.signal(signal.SIGINT, defer_sigint(lambda: self._stop_at_batch_end(trainer)))

    def _note(self, signum: int, frame: FrameType | None) -> None:
        self.pending = True  # nothing else in a signal handler (no logging lock, no collective)

    def _stop_at_batch_end(self, trainer: Trainer) -> None:
        if self.agree:
            self.pending_sigint = True  # the processes agree after the batch, as for SIGTERM
        else:
            trainer._signal_connector.received_sigterm = True  # what Lightning's loop checks after the batch

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self.agree:
            return
        sigterms, sigints = all_reduce_sums([float(self.pending), float(self.pending_sigint)])
        if sigterms + sigints > 0:
            if not trainer.received_sigterm:
                note_signal(signal.SIGTERM if sigterms > 0 else signal.SIGINT)
                log.info("%s (process %d%s): every process stops after step %d",
                         "SIGTERM" if sigterms > 0 else "Ctrl-C (SIGINT)", trainer.global_rank,
                         "" if self.pending or self.pending_sigint else ", from another process", trainer.global_step)
            trainer._signal_connector.received_sigterm = True  # what Lightning's loop checks after the batch

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        resumable = getattr(exception, "resumable", False)  # e.g. a served teacher that stopped answering
        if not isinstance(exception, SIGTERMException) and not (resumable and trainer.world_size == 1):
            return  # several processes: saving is a collective the others are not in; periodic checkpoints stay
        if resumable:  # the failed batch was read and started, never trained: a resume starts with it
            progress = trainer.fit_loop.epoch_loop.batch_progress
            for counts in (progress.current, progress.total):
                counts.ready = counts.started = counts.processed
        checkpoint = trainer.checkpoint_callback
        directory = getattr(checkpoint, "dirpath", None) or Path(trainer.default_root_dir) / "checkpoints"
        path = Path(self.path) if self.path is not None else Path(directory) / self.filename
        trainer.save_checkpoint(path, weights_only=False)  # the full state: a resume continues from it
        self.saved = path

    @override
    def state_dict(self) -> dict[str, Any]:
        return {}
