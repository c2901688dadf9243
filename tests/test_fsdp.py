"""`python train.py strategy=fsdp`: 2 CPU processes (gloo), student and teacher sharded with FSDP2; the
saved student loads with `from_pretrained` and equals the one a DDP run of the same config saves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.test_cli import tiny_cli_args, train_py


@pytest.mark.slow
def test_fsdp_run_prints_summary_and_saves_the_ddp_student(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    students = {}
    for strategy in ("fsdp", "ddp"):
        out = tmp_path / strategy
        result = train_py(f"strategy={strategy}", "baseline=false", f"hydra.run.dir={out}", *tiny_cli_args(tmp_path),
                          cwd=tmp_path)
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


def test_fsdp_refuses_what_changes_or_wraps_teachers_and_bad_precision() -> None:
    from kd_lightning.losses import forward_kl
    from kd_lightning.module import DistillationModule
    from kd_lightning.sharding import ShardedDataParallel, shard_distillation
    from tests.helpers import tiny_lm

    sar = DistillationModule(tiny_lm(0), tiny_lm(1), forward_kl)
    sar.trainable_teacher_keys.add("teachers.teacher.model.layers.0.mlp.gate.weight")
    with pytest.raises(NotImplementedError, match="sar"):
        shard_distillation(sar, mesh=None)
    wrapped = DistillationModule(tiny_lm(0), torch.nn.Sequential(tiny_lm(1)), forward_kl)
    with pytest.raises(NotImplementedError, match="wrapper"):
        shard_distillation(wrapped, mesh=None)
    with pytest.raises(ValueError, match="mixed_precision"):
        ShardedDataParallel(mixed_precision="fp16")
