"""Nothing lost on SIGTERM: save a resumable checkpoint before the process exits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning import Callback, LightningModule, Trainer
from typing_extensions import override
from lightning.pytorch.utilities.exceptions import SIGTERMException


class CheckpointOnSigterm(Callback):
    """On SIGTERM (a cluster pre-emption, `kill`, a job time limit) write `last.ckpt` into the
    ModelCheckpoint directory, so `resume=auto` continues from the last finished step.

    Lightning defers SIGTERM to the end of the current training batch (after the optimiser step)
    and raises `SIGTERMException` there: the saved state is consistent. Ctrl-C (KeyboardInterrupt)
    can land in the middle of a step and is not checkpointed; SIGKILL cannot be caught, and a run
    killed that way resumes from the last periodic checkpoint.

    `path` overrides where it goes (a Trainer without ModelCheckpoint, e.g. teacher pre-training).
    It only saves and records the file in `saved`; the stage says so in one line and exits 143:
    `with kd_lightning.signals.exit_on_sigterm(stage, saved=lambda: callback.saved): trainer.fit(...)`.
    """

    def __init__(self, filename: str = "last.ckpt", path: str | Path | None = None) -> None:
        self.filename, self.path = filename, path
        self.saved: Path | None = None

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        checkpoint = trainer.checkpoint_callback
        directory = getattr(checkpoint, "dirpath", None) or Path(trainer.default_root_dir) / "checkpoints"
        path = Path(self.path) if self.path is not None else Path(directory) / self.filename
        trainer.save_checkpoint(path, weights_only=False)  # the full state: a resume continues from it
        self.saved = path

    @override
    def state_dict(self) -> dict[str, Any]:
        return {}
