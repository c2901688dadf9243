"""`python train.py` as a user runs it: help, Hydra's errors, W&B offline (multirun: tests/test_sweeps.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kd_lightning.run.pipeline import run
from tests.conftest import CONF, REPO, TINY_LM_DATA, TINY_TEACHER, TINY_TRAINER

GROUPS = ["dataset", "teacher", "student", "loss", "temperature", "strategy", "logger", "callbacks", "experiment"]


def train_py(*args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline"}
    return subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_help_lists_every_group_and_option(tmp_path: Path) -> None:
    result = train_py("--help", cwd=tmp_path, timeout=60)
    assert result.returncode == 0, result.stderr
    for group in GROUPS:
        options = sorted(p.stem for p in (CONF / group).glob("*.yaml"))
        assert f"{group}: {', '.join(options)}" in result.stdout, group


def test_a_renamed_key_on_the_command_line_names_the_new_one(tmp_path: Path) -> None:
    result = train_py("teacher_cache.method=topk", cwd=tmp_path, timeout=60)
    assert result.returncode == 1 and not (tmp_path / "outputs").exists()
    assert ("ConfigError: teacher_cache.method='topk': the key is now teacher_cache.encoding; pass "
            "teacher_cache.encoding=topk instead") in result.stderr, result.stderr


def test_unknown_option_and_key_fail_with_hydras_message(tmp_path: Path) -> None:
    result = train_py("loss=no_such_loss", cwd=tmp_path, timeout=60)
    assert result.returncode != 0
    assert "Could not find 'loss/no_such_loss'" in result.stderr and "Available options in 'loss'" in result.stderr
    result = train_py("no_such_key=1", cwd=tmp_path, timeout=60)
    assert result.returncode != 0 and "Could not override 'no_such_key'" in result.stderr


def tiny_cli_args(cache_dir: Path) -> list[str]:
    """Tiny settings for `train.py`, with the test session's cache (its teacher pre-trained once)."""
    return [*TINY_TRAINER, *TINY_LM_DATA, *TINY_TEACHER, f"paths.cache_dir={cache_dir}"]


def test_wandb_logger_writes_offline_run(make_cfg, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_API_KEY", "secret-key-that-must-not-leak-0000000000")
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    cfg = make_cfg("logger=wandb", "baseline=false")
    run(cfg)
    import wandb

    wandb.finish()
    wandb.teardown()  # the writer is a separate service process: wait until it has flushed the offline run
    runs = list((Path(cfg.paths.output_dir) / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    data = next(runs[0].glob("*.wandb")).read_bytes()
    assert b"train/kd_loss" in data, "training metrics missing from the offline run"
    assert b"val/student_loss" in data, "validation metrics missing from the offline run"
    leaked = [p for p in Path(cfg.paths.output_dir).rglob("*") if p.is_file() and b"secret-key-that-must-not-leak" in p.read_bytes()]
    assert not leaked, leaked


def test_console_script_kd_train_is_the_same_entry_point(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "kd-train"
    assert script.exists(), "pip install -e . installs the kd-train console script"
    result = subprocess.run([str(script), "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "loss: " in result.stdout and "teacher: " in result.stdout
