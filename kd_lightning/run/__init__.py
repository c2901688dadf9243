"""The run layer: the only place that reads the Hydra config.

    python train.py  ->  run.cli.main  ->  run.pipeline.run(cfg)  ->  one stage file:
        run.distill (teachers -> student -> summary), run.teacher, run.cache_teacher, run.takd

`settings` reads the config into typed values, `checks` refuses bad values before compute, and
`builders` makes models, trainers, cached teachers and baselines. Everything below this package
receives typed arguments, never a `DictConfig`.
"""

from pathlib import Path

CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "conf")
"""The repository's `conf/` (next to this package in an editable install)."""

