"""`kd-train` / `python train.py`: the Hydra entry point (thin; `kd_lightning.run.pipeline.run` does the work)."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from kd_lightning.errors import ConfigError
from kd_lightning.run.settings import CONFIG_DIR


def main() -> None:
    """Check the run directory given on the command line (Hydra creates it before the task runs),
    then hand over to Hydra."""
    from kd_lightning.run.preflight import check_run_dir_argument

    try:
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
