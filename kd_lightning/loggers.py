"""Loggers that need a decision at run time, and a CSV logger that keeps its history on resume."""

from __future__ import annotations

import csv
import io
import logging
import os
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from typing_extensions import override

from kd_lightning.infra.atomic import atomic_write_text

log = logging.getLogger(__name__)


def _has_wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


WANDB_PROBE_SECONDS = 3.0


def wandb_unreachable(timeout: float = WANDB_PROBE_SECONDS) -> str | None:
    """None when the W&B service (WANDB_BASE_URL, default https://api.wandb.ai) accepts a connection
    within `timeout` seconds, else why not. Without this, a run with a key but no network waited
    about 100 s in `wandb.init` and ended in a `CommError`."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai")
    host, port = url.hostname or "api.wandb.ai", url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as error:
        return f"{host} does not answer within {timeout:g} s ({error.strerror or error})"
    return None


def wandb_logger(save_dir: str, offline: bool | None = None, **kwargs: Any) -> Any:
    """Lightning's `WandbLogger`, offline when `WANDB_MODE=offline`, no credentials exist, or the
    service does not answer within 3 s (`wandb_unreachable`); the log says which.

    Offline runs write `<save_dir>/wandb/offline-run-*/` and can be uploaded later with
    `wandb sync`. The API key is read by wandb from the environment or ~/.netrc; it is never part
    of the config, so it never lands in the run directory."""
    from lightning.pytorch.loggers import WandbLogger

    if offline is None:
        offline = os.environ.get("WANDB_MODE") in ("offline", "disabled") or not _has_wandb_credentials()
        if offline:
            log.info("W&B: no credentials or WANDB_MODE=offline, logging offline to %s/wandb", save_dir)
        else:  # decided up front: offline unless the service answers quickly, and said either way
            problem = wandb_unreachable()
            offline = problem is not None
            if offline:
                log.warning("W&B: %s: logging offline to %s/wandb; upload later with `wandb sync %s/wandb/offline-run-*`",
                            problem, save_dir, save_dir)
            else:
                log.info("W&B: the service answers: logging online")
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    return WandbLogger(save_dir=save_dir, offline=offline, **kwargs)


class _KeepingExperimentWriter(ExperimentWriter):
    """Lightning's CSV writer, except that an existing `metrics.csv` is continued, not deleted.

    Lightning's `_ExperimentWriter.__init__` calls `_check_log_dir_exists`, which deletes
    `metrics.csv` whenever the log directory is not empty ("Previous log files in this directory will
    be deleted"); with `version: ""` a resumed run writes to the same directory, so every row from
    before the interruption was lost. Here the old rows are kept; at the first save, rows whose step is
    at or after the first step this run logs are dropped (they came after the checkpoint the run
    resumed from and are logged again), and the header becomes the union of old and new columns.
    """

    def __init__(self, log_dir: str) -> None:
        self._continuing = False
        super().__init__(log_dir)

    @override
    def _check_log_dir_exists(self) -> None:
        self._continuing = os.path.isfile(self.metrics_file_path)

    @override
    def save(self) -> None:
        if self._continuing and self.metrics:
            self._continuing = False
            self._merge_previous_rows()
        super().save()

    def _merge_previous_rows(self) -> None:
        with open(self.metrics_file_path, newline="") as handle:
            reader = csv.DictReader(handle)
            header, rows = list(reader.fieldnames or []), list(reader)
        first_new_step = min(int(m["step"]) for m in self.metrics)
        kept = [r for r in rows if _step(r) is not None and _step(r) < first_new_step]
        if len(kept) < len(rows):
            log.info("csv logger: continuing %s; %d row(s) from step %d on are replaced by this run's",
                     self.metrics_file_path, len(rows) - len(kept), first_new_step)
        self.metrics_keys = sorted(set(header) | set(self.metrics_keys))
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=self.metrics_keys)
        writer.writeheader()
        writer.writerows(kept)
        atomic_write_text(self.metrics_file_path, text.getvalue())


def _step(row: dict[str, str]) -> int | None:
    try:
        return int(float(row.get("step") or ""))
    except ValueError:
        return None


class ResumableCSVLogger(CSVLogger):
    """`lightning.pytorch.loggers.CSVLogger` whose `metrics.csv` survives `resume=auto`: rows from
    before the interruption are kept, rows after the resumed checkpoint are replaced by the new ones.
    Same arguments as `CSVLogger`; use a fixed `version` (e.g. `""`) so a resume finds the file.
    Local file systems only (the merge reads and atomically rewrites the file)."""

    @property
    @override
    def experiment(self) -> ExperimentWriter:  # type: ignore[override]
        if self._experiment is None:
            from lightning.fabric.utilities.rank_zero import rank_zero_only

            if rank_zero_only.rank != 0:
                return super().experiment
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _KeepingExperimentWriter(log_dir=self.log_dir)
        return self._experiment
