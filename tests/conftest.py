"""Shared fixtures: compose the real Hydra config with tiny settings and temp directories."""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf, open_dict

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
# One intra-op thread: tiny models gain nothing from two, and two threads on a busy 2-core machine
# spin-wait each other into 10x slower steps (subprocesses inherit this too).
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# Small enough that every integration test trains in seconds on 2 cores.
TINY_TRAINER = [
    "trainer.max_steps=6",
    "trainer.val_check_interval=3",
    "trainer.limit_val_batches=2",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "lr_scheduler.num_warmup_steps=1",
]
TINY_LM_DATA = ["dataset.max_train_tokens=40000", "dataset.max_eval_tokens=4096", "dataset.seq_len=64", "dataset.batch_size=8"]
TINY_TEACHER = ["teacher.pretrain.max_steps=4"]


def tiny_overrides(overrides: tuple[str, ...]) -> list[str]:
    """Tiny settings that fit the chosen dataset/teacher (digits has no token caps, hf teachers no pretraining)."""
    chosen = " ".join(overrides)
    tiny = list(TINY_TRAINER)
    if "digits" not in chosen and "dataset=" not in chosen:
        tiny += TINY_LM_DATA
    if not any(f"teacher={name}" in chosen for name in ("hf", "ensemble", "cached", "smollm2", "vllm")) and "experiment=smollm2" not in chosen:
        tiny += TINY_TEACHER
    given = {o.split("=")[0].lstrip("+") for o in overrides}
    return [o for o in tiny if o.split("=")[0] not in given]


_COMPOSED: dict[tuple[str, ...], DictConfig] = {}


def compose_config(overrides: list[str], output_dir: Path, cache_dir: Path) -> DictConfig:
    """The real Hydra config for `overrides`, composed once per test session (composing takes a
    noticeable fraction of a second and most tests ask for a handful of the same settings); each
    caller gets its own deep copy, pointed at its own directories."""
    key = tuple(overrides)
    if key not in _COMPOSED:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            _COMPOSED[key] = compose("train", overrides=list(overrides))
    cfg = copy.deepcopy(_COMPOSED[key])
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.cache_dir = str(cache_dir)
    return cfg


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache for the whole session: tiny teachers are trained once and reused."""
    return tmp_path_factory.mktemp("kd_cache")


@pytest.fixture
def make_cfg(tmp_path: Path, cache_dir: Path) -> Callable[..., DictConfig]:
    def factory(*overrides: str, tiny: bool = True, output_dir: Path | None = None) -> DictConfig:
        extra = tiny_overrides(overrides) if tiny else []
        return compose_config([*extra, *overrides], output_dir or tmp_path / "run", cache_dir)

    return factory


def metrics_csv(output_dir: Path, name: str = "csv") -> list[dict[str, str]]:
    import csv

    with open(Path(output_dir) / name / "metrics.csv") as f:
        return list(csv.DictReader(f))


def column(rows: list[dict[str, str]], key: str) -> list[float]:
    return [float(r[key]) for r in rows if r.get(key) not in (None, "")]


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg)
