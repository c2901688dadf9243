"""`python train.py strategy=fsdp`: 2 CPU processes (gloo), student and teacher sharded with FSDP2; the
saved student loads with `from_pretrained` and equals the one a DDP run of the same config saves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.dist_check import run_steps
from tests.test_cli import tiny_cli_args, train_py


@pytest.mark.slow
@pytest.mark.dist
def test_fsdp_run_prints_summary_and_saves_the_ddp_student(tmp_path: Path, cache_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    students = {}
    for strategy in ("fsdp", "ddp"):
        out = tmp_path / strategy
        # teacher_outputs.reuse: the summary gathers the model inside the store's wrapper; the DDP run
        # reads what the FSDP run stored (float32: the same numbers)
        result = train_py(f"strategy={strategy}", "baseline=false", "teacher_outputs.reuse=true", f"hydra.run.dir={out}",
                          f"teacher_outputs.dir={tmp_path / 'store'}", *tiny_cli_args(cache_dir), cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        summary = json.loads((out / "summary.json").read_text())
        assert summary["models"]["student (KD)"]["loss"] < 6.0
        if strategy == "fsdp":
            assert "kd-lightning: loss=kl" in result.stdout and "GLOBAL_RANK: 1, MEMBER: 2/2" in result.stdout + result.stderr
        students[strategy] = AutoModelForCausalLM.from_pretrained(out / "student")
    fsdp, ddp = (dict(students[s].named_parameters()) for s in ("fsdp", "ddp"))
    assert type(students["fsdp"]).__name__ == type(students["ddp"]).__name__  # no FSDP class in the config
    assert fsdp.keys() == ddp.keys()
    worst = max(float((fsdp[k] - ddp[k]).detach().abs().max()) for k in fsdp)
    assert worst < 1e-4, worst


def test_fsdp_refuses_unshardable_teachers_and_bad_precision() -> None:
    from kd_lightning.losses import forward_kl
    from kd_lightning.module import DistillationModule
    from kd_lightning.infra.sharding import ShardedDataParallel, shard_distillation
    from tests.helpers import tiny_lm

    wrapped = DistillationModule(tiny_lm(0), torch.nn.Sequential(tiny_lm(1)), forward_kl)
    with pytest.raises(NotImplementedError, match="wrapper"):
        shard_distillation(wrapped, mesh=None)
    with pytest.raises(ValueError, match="mixed_precision"):
        ShardedDataParallel(mixed_precision="fp16")


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.xdist_group("dist_runs")
@pytest.mark.parametrize("teacher", ["ka", "reuse"])
def test_fsdp_shards_the_model_inside_a_teacher_wrapper(dist_runs, teacher: str) -> None:
    """KA routing (hooks on the routers, 2 passes a step) and `teacher_outputs.reuse` wrap the teacher;
    under FSDP the model inside is sharded and the step equals the single process's. For the store,
    rank 0's share of the epoch is stored beforehand, so every step rank 0 hits and rank 1 misses:
    rank 0 must still join rank 1's collective forward (else both hang), and return what it read."""
    from tests.dist_check import reuse_store
    from tests.test_step_tokens import close

    if teacher == "reuse":  # conftest.dist_runs filled the store with rank 0's share of epoch 0
        assert dist_runs.reuse["stored_before"] == dist_runs.reuse["rank0_rows"] == 12
    single = run_steps(batch_size=4, teacher="ka" if teacher == "ka" else "dense")
    fsdp = dist_runs[f"fsdp-{teacher}"]
    assert fsdp["sharded"] and 0.45 < fsdp["teacher_fraction"] < 0.55
    for step in range(3):
        close(single["grads"][step], fsdp["grads"][step], 1e-5)
    close(list(single["params"].values()), list(fsdp["params"].values()), 1e-5)
    if teacher == "reuse":  # rank 1 stored what it computed: its 6 training rows (validation is off)
        assert len(reuse_store(dist_runs.reuse["store"])) == dist_runs.reuse["rank0_rows"] + 6


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.xdist_group("dist_runs")
def test_fsdp_on_policy_generation_matches_ddp(dist_runs) -> None:
    """`callbacks=on_policy` with a sharded student: every forward of `generate` is a collective, so
    the processes generate in lockstep (`synced_gpus`) although their rows end (EOS) at different
    times; the samples and the step equal a DDP run's (same per-rank seeds)."""
    from tests.test_step_tokens import close

    ddp, fsdp = dist_runs["ddp-on-policy"], dist_runs["fsdp-on-policy"]
    assert fsdp["sharded"] and not ddp["sharded"]
    for step in range(3):
        close(ddp["grads"][step], fsdp["grads"][step], 1e-5)
        assert abs(ddp["losses"][step] - fsdp["losses"][step]) < 1e-5
    close(list(ddp["params"].values()), list(fsdp["params"].values()), 1e-5)


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.xdist_group("dist_runs")
def test_sar_under_ddp_and_fsdp_gives_the_single_process_steps(dist_runs) -> None:
    """`callbacks=sar`: a router step of the MoE teacher before each student step. FSDP keeps the routers
    whole and replicated (SAR all-reduces their gradients); DDP leaves them out of its buckets (they
    once shared a bucket with student parameters, which then were not averaged: 0.13 off at step 0).
    With every token counted (equal counts per process) and no balance term, 1 process (batch 4), DDP
    and FSDP (2 x 2) give the same steps."""
    from tests.dist_check import every_token_counted
    from tests.test_step_tokens import close

    single = run_steps(batch_size=4, teacher="moe", callback="sar", rows=every_token_counted())
    ddp, fsdp = dist_runs["ddp-sar"], dist_runs["fsdp-sar"]
    assert fsdp["sharded"] and 0.4 < fsdp["teacher_fraction"] < 0.55  # the routers are kept whole
    for run in (ddp, fsdp):
        for step in range(3):
            close(single["grads"][step], run["grads"][step], 1e-5)
            assert abs(single["losses"][step] - run["losses"][step]) < 1e-5
        close(list(single["params"].values()), list(run["params"].values()), 1e-5)
