"""Logger factories that need a decision at run time."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def _has_wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


def wandb_logger(save_dir: str, offline: bool | None = None, **kwargs: Any) -> Any:
    """Lightning's `WandbLogger`, offline when `WANDB_MODE=offline` or no credentials exist.

    Offline runs write `<save_dir>/wandb/offline-run-*/` and can be uploaded later with
    `wandb sync`. The API key is read by wandb from the environment or ~/.netrc; it is never part
    of the config, so it never lands in the run directory."""
    from lightning.pytorch.loggers import WandbLogger

    if offline is None:
        offline = os.environ.get("WANDB_MODE") in ("offline", "disabled") or not _has_wandb_credentials()
        if offline:
            log.info("W&B: no credentials or WANDB_MODE=offline, logging offline to %s/wandb", save_dir)
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    return WandbLogger(save_dir=save_dir, offline=offline, **kwargs)
