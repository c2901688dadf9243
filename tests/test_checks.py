"""The validation layer (`kd_lightning.run.checks`): each bad value is named by its config key, before compute."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from kd_lightning.data.checks import check_training_text, learnable_token_counts
from kd_lightning.errors import ConfigError
from kd_lightning.run.checks import check_seq_len_fits, check_writable, validate_config

BAD_VALUES = {
    "distill.kd_weight=-0.5": r"distill.kd_weight=-0.5: must be >= 0",
    "distill.ce_weight=-1": r"distill.ce_weight=-1: must be >= 0",
    "distill.kd_weight=0 distill.ce_weight=0": r"distill.kd_weight=0 and distill.ce_weight=0: nothing to train",
    "trainer.max_steps=0": r"trainer.max_steps=0: must be a positive number of optimiser steps",
    "trainer.max_steps=-5": r"trainer.max_steps=-5: must be a positive",
    "temperature.initial=0": r"temperature.initial=0: the distillation temperature must be > 0",
    "temperature=dts temperature.initial=-1": r"temperature.initial=-1",
    "temperature=linear temperature.callback.end=0": r"temperature.callback.end=0: .* must be > 0",
    "cpu_threads=0": r"cpu_threads=0: must be a positive integer, or null",
    "cpu_threads=-2": r"cpu_threads=-2",
    "dataset.seq_len=1": r"dataset.seq_len=1: must be at least 2",
    "loss=skew_kl loss.fn.alpha=1.5": r"loss.fn.alpha=1.5: must lie in \[0, 1\] \(loss=skew_kl\)",
    "loss=gjsd loss.fn.beta=-0.1": r"loss.fn.beta=-0.1: must lie in \[0, 1\]",
    "loss=akl loss.fn.mu=2": r"loss.fn.mu=2: must lie in \[0, 1\]",
    "loss=akl loss.fn.value_form=xx": r"loss.fn.value_form='xx': must be 'kl' or 'ce'",
    "loss=sparse_kl loss.fn.num_draws=0": r"loss.fn.num_draws=0: must be >= 1",
    "loss=sparse_kl loss.fn.encoding=full": r"loss.fn.encoding='full': must be 'sample' or 'topk'",
    "loss.chunk_size=0": r"loss.chunk_size=0: must be null",
    "dataset.seq_len=2048": r"dataset.seq_len=2048 exceeds student.model.config.max_position_embeddings=1024",
    "student=hf student.model.pretrained=/no/such/model": r"student.model.pretrained='/no/such/model': no such directory",
    "teacher=hf teacher.model.pretrained=./missing": r"teacher.model.pretrained='./missing': no such directory",
    "teacher=hf": r"teacher.model.pretrained is not set",
    "loss=taid loss.callback.t_start=1.5": r"loss.callback: TAIDSchedule: t_start=1.5 must be in \[0, 1\)",
    "temperature=dts temperature.callback.momentum=1": r"temperature.callback: DynamicTemperature: momentum=1",
    "callbacks=sar callbacks.sar.lr=0": r"callbacks.sar: StudentAwareRouter: lr=0 must be > 0",
}


@pytest.mark.parametrize("overrides", sorted(BAD_VALUES))
def test_bad_value_names_its_key(make_cfg, overrides: str) -> None:
    cfg = make_cfg(*overrides.split())
    with pytest.raises(ConfigError, match=BAD_VALUES[overrides]):
        validate_config(cfg)


@pytest.mark.parametrize("overrides", ["", "loss=skew_kl", "temperature=dts", "teacher=ensemble", "loss=akl",
                                       "experiment=digits", "experiment=takd", "loss=taid", "callbacks=sar",
                                       "callbacks=distillm_offpolicy", "callbacks=on_policy", "callbacks=reinforced teacher=ensemble",
                                       "distill.kd_weight=0", "stage=teacher distill.ce_weight=0 distill.kd_weight=0",
                                       "teacher=hf teacher.model.pretrained=Qwen/Qwen1.5-MoE-A2.7B"])
def test_the_shipped_configs_pass(make_cfg, overrides: str) -> None:
    validate_config(make_cfg(*overrides.split()))


@pytest.mark.parametrize("old, new", [("teacher_cache.method", "teacher_cache.encoding"),
                                      ("teacher_outputs.method", "teacher_outputs.encoding"),
                                      ("loss.fn.method", "loss.fn.encoding")])
def test_a_renamed_key_is_refused_naming_the_new_one(make_cfg, tmp_path: Path, old: str, new: str) -> None:
    """`encoding` is the one name of a teacher distribution's encoding: the old `method` key is refused
    before compute, in a composed config (`+key=`, a user's file) and on the command line."""
    from kd_lightning.run.checks import check_renamed_overrides
    from kd_lightning.run.pipeline import run

    message = rf"{old}='topk': the key is now {new}; pass {new}=topk instead"
    extra = ("loss=sparse_kl",) if old.startswith("loss.") else ()
    with pytest.raises(ConfigError, match=message):
        run(make_cfg(*extra, f"+{old}=topk"))
    assert not (tmp_path / "run" / "checkpoints").exists()
    for override in (f"{old}=topk", f"+{old}=topk", f"++{old}=topk"):
        with pytest.raises(ConfigError, match=message):
            check_renamed_overrides(["stage=distill", override])
    check_renamed_overrides([f"{new}=topk", "loss=sparse_kl"])


def test_pretrained_empty_or_not_a_model_directory(make_cfg, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match=r"teacher.model.pretrained='.*empty': the directory is empty"):
        validate_config(make_cfg("teacher=hf", f"teacher.model.pretrained={empty}"))
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "model.safetensors").write_bytes(b"x")
    with pytest.raises(ConfigError, match="no config.json in that directory"):
        validate_config(make_cfg("student=hf", f"student.model.pretrained={tmp_path / 'weights'}"))
    (tmp_path / "weights" / "config.json").write_text("{}")
    validate_config(make_cfg("student=hf", f"student.model.pretrained={tmp_path / 'weights'}"))


def test_seq_len_against_a_loaded_model_config() -> None:
    from transformers import GPT2Config

    check_seq_len_fits("teacher.model", 512, GPT2Config(n_positions=1024))
    with pytest.raises(ConfigError, match=r"dataset.seq_len=2048 exceeds teacher.model.max_position_embeddings=1024.*"
                                          r"lower dataset.seq_len to at most 1024"):
        check_seq_len_fits("teacher.model", 2048, GPT2Config(n_positions=1024))
    with pytest.raises(ConfigError, match=r"exceeds student.model.config.n_positions=256"):
        check_seq_len_fits("student.model.config", 300, {"n_positions": 256})
    check_seq_len_fits("student.model.config", 300, {"hidden_size": 8})  # no known limit: not checked


def test_unwritable_directory_names_the_key(tmp_path: Path) -> None:
    assert check_writable(tmp_path / "cache" / "new", "paths.cache_dir").is_dir()
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match=r"paths.cache_dir='.*a_file/cache': cannot write there .*"
                                          "set paths.cache_dir to a writable directory"):
        check_writable(blocker / "cache", "paths.cache_dir")


def test_training_text_nothing_to_learn_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"dataset.paths=\['qa.jsonl'\]: every one of the 3 train records is empty"):
        check_training_text("dataset.paths=['qa.jsonl']", [0, 0, 0])


def test_training_text_warns_on_empty_records_and_a_dominant_document() -> None:
    with pytest.warns(UserWarning, match=r"dataset.paths: 4 of 10 train records \(40%\) are empty"):
        check_training_text("dataset.paths", [0, 0, 0, 0, 5, 5, 5, 5, 5, 5])
    with pytest.warns(UserWarning, match=r"dataset.paths: big.txt holds 90% of the train split's 1000 tokens"):
        check_training_text("dataset.paths", [900, 50, 50], names=["big.txt", "a.txt", "b.txt"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_training_text("dataset.paths", [10, 12, 9, 0] + [10] * 20)


def test_whitespace_only_responses_count_as_empty() -> None:
    texts = ["  \n", "", "4"]
    counts = learnable_token_counts(texts, [list(t.encode()) for t in texts])
    assert counts == [0, 0, 1]
    with pytest.raises(ConfigError, match="dataset.response_field='response': every one of the 2 train records"):
        check_training_text("dataset.response_field='response'", learnable_token_counts(texts[:2], [[32, 10], []]))
