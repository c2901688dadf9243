"""The run layer: the only place that reads the Hydra config.

    python train.py  ->  run.cli.main  ->  run.pipeline.run(cfg)  ->  one stage file:
        run.distill (teachers -> student -> summary), run.teacher, run.cache_teacher, run.takd

`settings` reads the config into typed values, `checks` refuses bad values before compute, and
`builders` makes models, trainers, cached teachers and baselines. Everything below this package
receives typed arguments, never a `DictConfig`.
"""

from pathlib import Path

from omegaconf import OmegaConf

CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "conf")
"""The repository's `conf/` (next to this package in an editable install)."""


def _packaged_gguf(distribution: str, filename: str, cache_dir: str) -> str:
    """`${kd_packaged_gguf:<distribution>,<file>,<cache_dir>}`: the model directory converted once from
    a GGUF file shipped in an installed Python package (kd_lightning/teachers/packaged.py); a missing
    package fails, when the config is first resolved (before any compute), naming what to pip install."""
    from kd_lightning.teachers.packaged import packaged_gguf_model

    return packaged_gguf_model(distribution, filename, cache_dir)


if not OmegaConf.has_resolver("kd_packaged_gguf"):
    OmegaConf.register_new_resolver("kd_packaged_gguf", _packaged_gguf, use_cache=True)
