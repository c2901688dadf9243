"""`kd-train` / `python train.py`: the Hydra entry point (thin; `kd_lightning.run.pipeline.run` does the work)."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from kd_lightning.errors import ConfigError
from kd_lightning.run import CONFIG_DIR


def main() -> None:
    """Refuse what can be refused from the command line alone, in one line with exit status 1 (a
    renamed key; a run directory that cannot be written, which Hydra creates before the task runs),
    then hand over to Hydra."""
    from kd_lightning.run.checks import check_renamed_overrides, check_run_dir_argument  # light: no torch

    try:
        check_renamed_overrides(sys.argv[1:])
        check_run_dir_argument(sys.argv[1:])
    except ConfigError as error:
        sys.exit(f"ConfigError: {error}")
    hydra_main()


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def hydra_main(cfg: DictConfig) -> float | None:
    from kd_lightning.run.pipeline import run  # imported here, not at the top: `--help` stays fast

    # Sweepers that optimise (hydra-optuna-sweeper, +sweep=optuna) minimise what the task returns:
    # the last validation loss, never the held-out test loss.
    return run(cfg).get("val_student_loss")


if __name__ == "__main__":
    main()
