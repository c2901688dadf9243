"""`kd-train` / `python train.py`: the Hydra entry point (thin; the work is in kd_lightning.train)."""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

# The configs live in the repository's conf/ (next to this package in an editable install).
CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "conf")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    from kd_lightning.train import run  # imported lazily: `--help` stays fast

    # Sweepers that optimise (hydra-optuna-sweeper, +sweep=optuna) minimise what the task returns:
    # the last validation loss, never the held-out test loss.
    return run(cfg).get("val_student_loss")


if __name__ == "__main__":
    main()
