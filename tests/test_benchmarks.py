"""Smoke tests of the benchmark scripts' `--quick` modes: they run, print their table, and the
numbers they return are sane (not their values: benchmarks are not tests). The single-process
timing scripts run in-process (their `main(argv)`, as `python benchmarks/X.py ARGS` calls it); the
ones that start train.py or several processes run as scripts (slow tier)."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The smoke runs need a teacher and data, not good ones: the test suite's tiny sizes (the
# benchmarks pass unknown arguments on to train.py as Hydra overrides).
TINY = ["teacher.pretrain.max_steps=4", "dataset.max_train_tokens=40000", "dataset.seq_len=64"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}  # the checkout under test, not an installed copy


def bench(script: str, *args: str, timeout: int = 300) -> str:
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def bench_in_process(script: str, *args: str, capsys: pytest.CaptureFixture[str],
                     monkeypatch: pytest.MonkeyPatch) -> str:
    """`python benchmarks/SCRIPT.py ARGS` without a new interpreter: its `main(ARGS)`, stdout captured."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))  # as for the script: `from speed import ...`
    importlib.import_module(script).main(list(args))
    return capsys.readouterr().out


def test_speed_quick_prints_the_ratio(capsys, monkeypatch):
    out = bench_in_process("speed", "--quick", "--repeats", "3", "--warmup", "1", "--pieces", capsys=capsys,
                           monkeypatch=monkeypatch)
    ratio_line = next(line for line in out.splitlines() if line.startswith("ratio (a) / ((b) + (c))"))
    ratio = float(ratio_line.split(":")[1].split()[0])
    assert 0.5 < ratio < 3.0, ratio_line
    assert "tokens/s" in out
    assert "loss=forward_kl forward + backward" in out and "teacher token CE" in out  # --pieces


def test_cached_kd_quick_prints_the_ratio(capsys, monkeypatch):
    out = bench_in_process("cached_kd", "--quick", "--repeats", "3", "--warmup", "1", capsys=capsys,
                           monkeypatch=monkeypatch)
    assert "ratio" in out and "target <= 1.05" in out


@pytest.mark.slow
def test_sweep_reuse_quick_saves_teacher_time_and_keeps_the_results(tmp_path: Path):
    out = bench("sweep_reuse.py", "--quick", "--steps", "6", "--out", str(tmp_path), *TINY, timeout=600)
    result = json.loads((tmp_path / "sweep_reuse.json").read_text())
    assert result["max_loss_diff"] < 1e-4, result  # float32 store: the same students
    assert result["store_mib"] > 0
    assert "Teacher time saved: about" in out
    b = [json.loads(p.read_text())["teacher_outputs"] for p in sorted((tmp_path / "B_reuse").glob("*/summary.json"))]
    assert len(b) == 2 and b[0]["computed_rows"] > 0 and b[1]["computed_rows"] == 0


@pytest.mark.slow
@pytest.mark.dist
def test_ddp_quick_runs_one_and_two_processes(tmp_path: Path):
    bench("ddp.py", "--quick", "--steps", "6", "--out", str(tmp_path), *TINY, timeout=600)
    rows = json.loads((tmp_path / "ddp.json").read_text())
    assert [r["processes"] for r in rows] == [1, 2, 2] and [r["global_batch"] for r in rows] == [16, 32, 16]
    assert all(r["tokens_per_second"] > 0 and r["peak_rss_mib"] > 50 for r in rows)


@pytest.mark.slow
def test_kd_step_quick_prints_every_arm_and_the_divergences():
    out = bench("kd_step.py", "--quick", "--arms", "module,fast,chunked,reference,trl,floor", timeout=900)
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    for arm in ("module", "fast", "chunked", "reference", "floor"):
        step_ms = float(rows[arm].split("|")[2])
        assert step_ms > 0, rows[arm]
    # Every KD arm computes the same loss on the same batch (forward KL, T=1): compare the values.
    kd_losses = {arm: float(rows[arm].split("|")[7]) for arm in ("module", "fast", "chunked", "reference")}
    assert max(kd_losses.values()) - min(kd_losses.values()) < 1e-4, kd_losses
    assert "trl" in rows or "trl not installed" in out
    assert "| taid |" in out and "two-line" in out


@pytest.mark.slow
def test_store_encodings_quick_prints_sizes_and_gaps(tmp_path: Path):
    out = bench("store_encodings.py", "--quick", "--out", str(tmp_path), timeout=600)
    result = json.loads((tmp_path / "results.json").read_text())
    methods = result["methods"]
    assert set(methods) == {"online", "full-f32", "topk32-u8", "topk32-u8-bucket", "sample32"} and "vs online" in out
    assert methods["topk32-u8"]["bytes_per_token"] == 100 and methods["sample32"]["bytes_per_token"] == 96
    assert abs(methods["full-f32"]["gap_to_online"]) < 1e-3  # the exact encoding trains the online student


@pytest.mark.slow
@pytest.mark.dist
def test_fsdp_bench_tiny_shards_model_state(tmp_path: Path):
    out = bench("fsdp.py", "--teacher-hidden", "128", "--teacher-layers", "2", "--student-hidden", "64",
                "--student-layers", "2", "--steps", "3", "--warmup", "1", "--out", str(tmp_path), timeout=600)
    assert "| fsdp x2 |" in out and "| ddp x2 |" in out and "| fsdp-keep x2 |" in out
    single, ddp, fsdp, keep = json.loads((tmp_path / "fsdp.json").read_text())
    assert single["model_state_mib"] == pytest.approx(ddp["model_state_mib"])  # DDP replicates everything
    for sharded in (fsdp, keep):  # FSDP holds about half per process (kept-gathered blocks are freed after backward)
        assert 0.4 < sharded["model_state_mib"] / ddp["model_state_mib"] < 0.6
    assert all(r["tokens_per_second"] > 0 for r in (single, ddp, fsdp, keep))
