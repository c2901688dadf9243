"""TAKD chains (teacher -> assistants -> student) through `experiment=takd`."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM

from kd_lightning.run.takd import assistant_model, count_model_parameters, propose_assistant_sizes
from kd_lightning.run.pipeline import run


def test_proposed_sizes_are_geometric_largest_first() -> None:
    assert propose_assistant_sizes(8000, 1000, 2) == [4000, 2000]
    sizes = propose_assistant_sizes(10**6, 10**3, 1)
    assert sizes == [31623] and math.isclose(sizes[0] ** 2, 10**9, rel_tol=1e-4)
    assert propose_assistant_sizes(100, 10, 0) == []
    with pytest.raises(ValueError, match="larger than the student"):
        propose_assistant_sizes(10, 100, 1)


@pytest.mark.parametrize("model", [
    {"_target_": "kd_lightning.models.build_mlp", "hidden_sizes": [32]},
    {"_target_": "kd_lightning.models.build_causal_lm",
     "config": {"_target_": "transformers.LlamaConfig", "hidden_size": 16, "intermediate_size": 48,
                "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2}},
])
def test_assistant_widens_the_student_to_the_target_size(model: dict) -> None:
    data = (type("D", (), {"task": "classification", "num_features": 64, "num_classes": 10})() if "hidden_sizes" in model
            else type("D", (), {"task": "causal_lm", "vocab_size": 259, "tokenizer": None})())
    student = OmegaConf.create(model)
    base = count_model_parameters(student, data)
    cfg, params = assistant_model(student, 8 * base, data, seed=0)
    assert abs(math.log(params / (8 * base))) < math.log(1.25)
    assert count_model_parameters(cfg, data) == params


TINY_CHAIN = [
    "experiment=takd", "teacher=dense", "teacher.model.config.hidden_size=96", "teacher.model.config.intermediate_size=192",
    "teacher.model.config.num_hidden_layers=1", "student.model.config.hidden_size=16",
    "student.model.config.intermediate_size=32", "student.model.config.num_hidden_layers=1", "baseline=false",
    "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1", "dataset.max_eval_tokens=1024",
    "dataset.seq_len=32", "dataset.batch_size=4",
]


def test_takd_chain_saves_every_model_and_resumes_only_the_unfinished_stage(make_cfg, tmp_path: Path, caplog) -> None:
    out = tmp_path / "chain"
    summary = run(make_cfg(*TINY_CHAIN, output_dir=out))
    stages = [s["stage"] for s in summary["stages"]]
    assert stages == ["stage1_ta1", "stage2_tiny"]
    assert [s["teacher"] for s in summary["stages"]] == ["dense", "ta1"]
    params = [summary["models"][k]["params"] for k in ("teacher:dense", "ta1 (stage 1)", "tiny (stage 2)")]
    assert params[0] > params[1] > params[2]
    for stage in stages:  # every intermediate model is a loadable transformers model
        model = AutoModelForCausalLM.from_pretrained(out / stage / "student")
        assert sum(p.numel() for p in model.parameters()) in params
        assert (out / stage / "csv" / "metrics.csv").is_file()  # each stage logs under its own directory
    assert json.loads((out / "summary.json").read_text())["models"].keys() == summary["models"].keys()

    first_stage_mtime = (out / "stage1_ta1" / "summary.json").stat().st_mtime_ns
    shutil.rmtree(out / "stage2_tiny")
    caplog.clear()
    with caplog.at_level("INFO", logger="kd_lightning"):
        resumed = run(make_cfg(*TINY_CHAIN, "resume=auto", output_dir=out))
    assert "stage1_ta1 finished earlier" in caplog.text and "running stage1_ta1" not in caplog.text
    assert "running stage2_tiny: ta1 -> tiny" in caplog.text
    assert (out / "stage1_ta1" / "summary.json").stat().st_mtime_ns == first_stage_mtime
    assert (out / "stage2_tiny" / "student" / "config.json").is_file()
    assert resumed["models"].keys() == summary["models"].keys()


def test_takd_chain_on_digits_mlps(make_cfg, tmp_path: Path) -> None:
    summary = run(make_cfg("experiment=takd", "dataset=digits", "teacher=mlp", "student=mlp",
                           "teacher.pretrain.max_steps=10", "trainer.max_steps=4", "trainer.val_check_interval=4",
                           "baseline=false", "takd.compare_direct=true"))
    assert list(summary["models"]) == ["teacher:mlp", "ta1 (stage 1)", "mlp (stage 2)", "student (direct KD)"]
    assert summary["task"] == "classification"
    hidden = [s["student"] for s in summary["stages"]]
    assert hidden == ["ta1", "mlp"]


def test_each_takd_stage_starts_like_a_run_with_its_lock_record_and_guard(make_cfg, tmp_path: Path, caplog) -> None:
    """A link's directory is started by `rundir.begin_run`: lock, run record, no fresh start over its
    checkpoints, and `resume=auto` continues it (its recorded config matches)."""
    out = tmp_path / "chain"
    run(make_cfg(*TINY_CHAIN, "baseline=false", output_dir=out))
    for stage in ("stage1_ta1", "stage2_tiny"):
        assert (out / stage / "run_config.yaml").is_file() and (out / stage / ".kd_lock").is_file()
    (out / "summary.json").unlink()  # the chain and its last link unfinished; the link's checkpoints remain
    (out / "stage2_tiny" / "summary.json").unlink()
    with pytest.raises(FileExistsError, match="stage1_ta1 already holds a finished run"):  # fresh over a link: refused
        run(make_cfg(*TINY_CHAIN, "baseline=false", output_dir=out))
    caplog.clear()
    with caplog.at_level("INFO", logger="kd_lightning"):
        run(make_cfg(*TINY_CHAIN, "baseline=false", "resume=auto", output_dir=out))
    assert "stage1_ta1 finished earlier" in caplog.text and "running stage2_tiny" in caplog.text
    assert (out / "stage2_tiny" / "summary.json").is_file()
