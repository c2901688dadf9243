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


# The slow tier's longest tests (measured: seconds on 2 workers, longest first). pytest-xdist hands
# tests out in collection order, and the tier ends when its last test does, so these are collected
# first and the short ones fill in behind them. Order only; a name missing here keeps its place.
LONGEST_FIRST = (
    "test_served_teacher_vllm.py::test_real_server_scores_like_the_model_in_process",  # the server starts: ~110 s
    "test_served_teacher_vllm.py::test_distill_from_a_real_vllm_server",
    "test_real_teacher.py::test_smollm2_experiment_runs_end_to_end",  # 74 s
    "test_train.py::test_kd_student_beats_ce_only_student_on_embedded_data",  # 58
    "test_benchmarks.py::test_ddp_quick_runs_one_and_two_processes",  # 52
    "test_resume.py::test_interrupted_and_resumed_distributed_run_equals_uninterrupted",  # 50 each
    "test_benchmarks.py::test_fsdp_bench_tiny_shards_model_state",  # 48
    "test_fsdp.py::test_fsdp_run_prints_summary_and_saves_the_ddp_student",  # 39
    "test_benchmarks.py::test_sweep_reuse_quick_saves_teacher_time_and_keeps_the_results",  # 37
    "test_benchmarks.py::test_store_encodings_quick_prints_sizes_and_gaps",  # 32
    "test_benchmarks.py::test_kd_step_quick_prints_every_arm_and_the_divergences",  # 28
    "test_resume.py::test_sigkill_resumes_from_last_periodic_checkpoint_and_matches",  # 26
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        where = item.nodeid.split("/")[-1].split("[")[0]
        return next((i for i, name in enumerate(LONGEST_FIRST) if where == name), len(LONGEST_FIRST))

    items.sort(key=rank)  # stable: every other test keeps its collection order


# The 2-process configurations the tests compare with 1 process (tests/dist_check.py): name ->
# [strategy, processes, per-process batch, accumulate, extras]. One launch runs them all.
DIST_PLAN: dict[str, list] = {
    "ddp": ["ddp", 2, 2, 1, []],
    "fsdp": ["fsdp", 2, 2, 1, []],
    "fsdp-keep": ["fsdp", 2, 2, 1, ["keep"]],
    "fsdp-chunk-fused": ["fsdp", 2, 2, 1, ["chunk=5", "vocab=40"]],
    "fsdp-chunk-reference": ["fsdp", 2, 2, 1, ["chunk=5", "vocab=40", "reference"]],
    "fsdp-chunk-fused-32k": ["fsdp", 2, 2, 1, ["chunk=5", "vocab=32000"]],
    "fsdp-ka": ["fsdp", 2, 2, 1, ["teacher=ka"]],
    "fsdp-reuse": ["fsdp", 2, 2, 1, ["teacher=reuse={store}"]],
    "ddp-on-policy": ["ddp", 2, 2, 1, ["callback=on_policy"]],
    "fsdp-on-policy": ["fsdp", 2, 2, 1, ["callback=on_policy"]],
    "ddp-sar": ["ddp", 2, 2, 1, ["teacher=moe", "callback=sar", "rows=full"]],
    "fsdp-sar": ["fsdp", 2, 2, 1, ["teacher=moe", "callback=sar", "rows=full"]],
}


@pytest.fixture(scope="session")
def dist_runs(tmp_path_factory: pytest.TempPathFactory):
    """Every configuration of DIST_PLAN, run once per test run in one 2-process launch (each separate
    launch paid Python, Lightning and gloo start-up on both processes). Index it by name for the
    rank-0 result of `tests.dist_check.run_steps`; a configuration that failed fails only the tests
    that read it, with its traceback. `runs.reuse` describes fsdp-reuse's store: its directory, the
    rows of rank 0's share it was filled with, and the rows it held before the run. Under xdist the
    workers share the launch: the first to need it runs it (under a file lock) and the others read
    its results."""
    import json

    from filelock import FileLock

    from tests.dist_check import PlanRuns, fill_rank0_share, launch_plan, reuse_store

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's directory, shared by its workers
    out = root / "dist_runs"
    with FileLock(str(root / "dist_runs.lock")):
        done = out / "runs.json"
        if not done.exists():
            store = out / "reuse_store"
            rank0_rows = fill_rank0_share(str(store))
            stored_before = len(reuse_store(str(store)))
            plan = {name: [*spec[:4], [e.format(store=store) for e in spec[4]]] for name, spec in DIST_PLAN.items()}
            errors = launch_plan(plan, out).errors
            reuse = {"store": str(store), "rank0_rows": rank0_rows, "stored_before": stored_before}
            done.write_text(json.dumps({"errors": errors, "reuse": reuse}))
    recorded = json.loads(done.read_text())
    runs = PlanRuns(out, recorded["errors"])
    runs.reuse = recorded["reuse"]
    return runs


def metrics_csv(output_dir: Path, name: str = "csv") -> list[dict[str, str]]:
    import csv

    with open(Path(output_dir) / name / "metrics.csv") as f:
        return list(csv.DictReader(f))


def column(rows: list[dict[str, str]], key: str) -> list[float]:
    return [float(r[key]) for r in rows if r.get(key) not in (None, "")]


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg)
