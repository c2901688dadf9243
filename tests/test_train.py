"""The real entry point (`kd_lightning.run.pipeline.run` on a composed Hydra config) end to end, tiny."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from kd_lightning.models import build_causal_lm, save_model
from kd_lightning.run.builders import build_model
from kd_lightning.run.pipeline import run
from tests.conftest import column, metrics_csv


def student_state_from_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    return {k.removeprefix("student."): v for k, v in state.items() if k.startswith("student.")}


def test_distill_moe_teacher_skew_kl_end_to_end(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg("loss=skew_kl", "teacher=moe")
    summary = run(cfg)
    out = Path(cfg.paths.output_dir)
    rows = metrics_csv(out)
    losses = column(rows, "train/loss")
    assert len(losses) == 6 and losses[-1] < losses[0], losses
    assert column(rows, "train/temperature")[0] == 1.0
    assert column(rows, "val/student_loss") and column(rows, "val/teacher_agreement")
    assert (out / "checkpoints" / "last.ckpt").is_file()
    assert set(summary["models"]) == {"teacher:moe", "student (KD)", "student (CE only)"}
    assert json.loads((out / "summary.json").read_text())["loss"] == "skew_kl"

    # The saved student loads with plain transformers and matches the checkpointed weights.
    student_dir = Path(summary["student_dir"])
    reloaded = AutoModelForCausalLM.from_pretrained(student_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    fresh = build_model(cfg.student.model, type("D", (), {"task": "causal_lm", "vocab_size": len(tokenizer),
                                                           "tokenizer": tokenizer})(), seed=123)
    fresh.load_state_dict(student_state_from_checkpoint(out / "checkpoints" / "last.ckpt"))
    ids = torch.tensor([tokenizer("def f(x):\n    return x")["input_ids"]])
    assert torch.equal(reloaded(input_ids=ids).logits, fresh.eval()(input_ids=ids).logits)
    # The checkpoint holds the student, not the frozen teacher.
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert not any(k.startswith("teachers.") for k in ckpt["state_dict"])


def test_dense_teacher_and_cached_teacher_reused(make_cfg, tmp_path: Path, caplog) -> None:
    run(make_cfg("teacher=dense", "stage=teacher", output_dir=tmp_path / "a"))
    caplog.clear()
    with caplog.at_level("INFO", logger="kd_lightning"):
        summary = run(make_cfg("teacher=dense", "baseline=false", output_dir=tmp_path / "b"))
    assert "Using cached teacher 'dense'" in caplog.text
    assert set(summary["models"]) == {"teacher:dense", "student (KD)"}


def tiny_pretrained(directory: Path, vocab_size: int, hidden: int, seed: int) -> Path:
    from kd_lightning.data import byte_tokenizer

    config = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256)
    model = build_causal_lm(config, vocab_size=vocab_size, tokenizer=byte_tokenizer(), seed=seed)
    return save_model(model, directory, byte_tokenizer())


def test_hf_teacher_and_student_from_local_directories(make_cfg, tmp_path: Path) -> None:
    teacher_dir = tiny_pretrained(tmp_path / "t", 259, 48, 0)
    student_dir = tiny_pretrained(tmp_path / "s", 259, 16, 1)
    cfg = make_cfg("teacher=hf", f"teacher.model.pretrained={teacher_dir}", "student=hf",
                   f"student.model.pretrained={student_dir}", "baseline=false")
    summary = run(cfg)
    assert summary["models"]["teacher:hf"]["params"] == sum(
        p.numel() for p in AutoModelForCausalLM.from_pretrained(teacher_dir).parameters())


def test_vocabulary_mismatch_fails_before_training(make_cfg, tmp_path: Path) -> None:
    teacher_dir = tiny_pretrained(tmp_path / "t", 300, 16, 0)
    cfg = make_cfg("teacher=hf", f"teacher.model.pretrained={teacher_dir}")
    with pytest.raises(ValueError, match=r"vocabulary size 300 but the student has 259.*loss=uld"):
        run(cfg)
    assert not (Path(cfg.paths.output_dir) / "checkpoints").exists()


def test_digits_classic_kd(make_cfg) -> None:
    summary = run(make_cfg("experiment=digits", "trainer.max_steps=60", "teacher.pretrain.max_steps=60"))
    models = summary["models"]
    assert summary["task"] == "classification"
    assert models["teacher:mlp"]["accuracy"] > 0.8  # 60 steps of a wide MLP on digits
    assert models["student (KD)"]["accuracy"] > 0.3
    assert Path(summary["student_dir"], "model.safetensors").is_file()


def test_classification_data_with_lm_teacher_fails_clearly(make_cfg) -> None:
    with pytest.raises(ValueError, match="teacher=mlp student=mlp"):
        run(make_cfg("dataset=digits"))


def test_bf16_mixed_precision_run(make_cfg) -> None:
    summary = run(make_cfg("strategy=bf16", "baseline=false"))
    assert summary["models"]["student (KD)"]["loss"] < 6.0


def test_finished_run_directory_is_not_overwritten(make_cfg, tmp_path: Path) -> None:
    out = tmp_path / "same"
    run(make_cfg("baseline=false", output_dir=out))
    with pytest.raises(FileExistsError, match="already holds a finished run"):
        run(make_cfg("baseline=false", output_dir=out))


def test_deepspeed_refuses_cpu_clearly(make_cfg) -> None:
    # strategy=fsdp runs on CPU (FSDP2 over gloo: tests/test_fsdp.py); DeepSpeed stays GPU-only
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        run(make_cfg("strategy=deepspeed"))
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        run(make_cfg("trainer.strategy=fsdp", "trainer.accelerator=cpu"))  # Lightning's FSDPStrategy


LOSS_CONFIGS = sorted((Path(__file__).parents[1] / "conf" / "loss").glob("*.yaml"))
# `needs:` losses (alm, byte_kl) compare two tokenizations: tests/test_cross_tokenizer_run.py runs them
LOSSES = [p.stem for p in LOSS_CONFIGS if OmegaConf.load(p).get("needs") is None]
NEEDS_DUAL_DATA = [p.stem for p in LOSS_CONFIGS if OmegaConf.load(p).get("needs") is not None]


@pytest.mark.parametrize("loss", NEEDS_DUAL_DATA)
def test_a_loss_that_needs_two_tokenizations_is_refused_on_single_data_before_compute(make_cfg, loss: str) -> None:
    from kd_lightning.errors import ConfigError

    assert NEEDS_DUAL_DATA == ["alm", "byte_kl", "xtoken_kl"]
    with pytest.raises(ConfigError, match=rf"loss={loss} compares the student's and the teacher's tokenizations"):
        run(make_cfg(f"loss={loss}", "baseline=false"))
    if loss == "byte_kl":  # dual data, but a sub-word student
        with pytest.raises(ConfigError, match=r"loss=byte_kl gives a byte-level student .* dataset.tokenizer='bpe:4096'"):
            run(make_cfg("experiment=cross_tokenizer", "loss=byte_kl", "baseline=false"))


@pytest.mark.parametrize("loss", LOSSES)
def test_every_loss_option_trains_end_to_end(make_cfg, loss: str) -> None:
    cfg = make_cfg(f"loss={loss}", "baseline=false", "trainer.max_steps=4", "trainer.val_check_interval=4")
    summary = run(cfg)
    losses = column(metrics_csv(Path(cfg.paths.output_dir)), "train/kd_loss")
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert summary["loss"] == loss and torch.isfinite(torch.tensor(summary["models"]["student (KD)"]["loss"]))


@pytest.mark.slow
def test_kd_student_beats_ce_only_student_on_embedded_data(make_cfg, tmp_path: Path) -> None:
    """The product's promise at small scale: same student, init, data order and steps; the one
    distilled from the (pre-trained) MoE teacher has the lower held-out loss."""
    cfg = make_cfg("teacher=moe", "dataset.seq_len=64", "dataset.batch_size=16", "dataset.max_train_tokens=600000",
                   "dataset.max_eval_tokens=16384", "teacher.pretrain.max_steps=200", "trainer.max_steps=120",
                   "trainer.val_check_interval=60", "lr_scheduler.num_warmup_steps=10",
                   f"paths.cache_dir={tmp_path / 'cache'}")
    models = run(cfg)["models"]
    teacher, kd, ce = models["teacher:moe"], models["student (KD)"], models["student (CE only)"]
    assert teacher["loss"] < ce["loss"], "the teacher must be better than the student for KD to help"
    assert kd["loss"] < ce["loss"] - 0.02, (kd["loss"], ce["loss"])
    assert kd["teacher_agreement"] > ce["teacher_agreement"]
