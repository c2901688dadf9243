"""Issue #16 wired into the real entry point (`kd_lightning.run.pipeline.run`): checks before compute,
one run per directory, resume keeps its meaning, SIGTERM in teacher pre-training resumes exactly,
bad training text, positions of a from_pretrained model, a visible held-out evaluation."""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict
from safetensors.torch import load_file

from kd_lightning.errors import ConfigError
from kd_lightning.run.pipeline import run
from kd_lightning.infra.rundir import RunDirBusyError, RunDirLock
from kd_lightning.infra.runrecord import ResumeConfigError
from tests.conftest import compose_config, tiny_overrides
from tests.test_resume import SigtermAt


def test_busy_run_directory_is_refused_before_any_compute(make_cfg, tmp_path: Path) -> None:
    out = tmp_path / "busy"
    with RunDirLock(out), pytest.raises(RunDirBusyError, match=r"is in use by another run \(pid \d+"):
        run(make_cfg("baseline=false", output_dir=out))
    assert not (out / "checkpoints").exists()


def test_fresh_run_over_checkpoints_of_an_unfinished_run_is_refused(make_cfg, tmp_path: Path) -> None:
    out = tmp_path / "unfinished"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "last.ckpt").write_bytes(b"not yet overwritten")
    with pytest.raises(FileExistsError, match="holds checkpoints of an unfinished run.*resume=auto"):
        run(make_cfg("baseline=false", output_dir=out))
    assert (out / "checkpoints" / "last.ckpt").read_bytes() == b"not yet overwritten"


def test_resume_that_changes_what_is_trained_is_refused_and_evaluation_shows_progress(
        make_cfg, tmp_path: Path, capfd) -> None:
    out = tmp_path / "run"
    cfg = make_cfg("baseline=false", "trainer.max_steps=2", "trainer.val_check_interval=2",
                   "trainer.enable_progress_bar=true", output_dir=out)
    run(cfg)
    assert "held-out: student (KD)" in capfd.readouterr().err  # a progress bar over the evaluation
    finished = (out / "summary.json").read_text()
    with pytest.raises(ResumeConfigError, match=r"seed: 0 -> 1.*\+resume_allow_changes=true"):
        run(make_cfg("baseline=false", "trainer.max_steps=2", "trainer.val_check_interval=2", "seed=1",
                     "resume=auto", output_dir=out))
    assert (out / "summary.json").read_text() == finished
    assert json.loads(finished)["student_dir"] == str(out / "student")
    assert not list(out.glob(".student.tmp-*")) and not list(out.glob(".summary.json.tmp-*"))


@pytest.mark.parametrize("where", ["missing", "empty"])
def test_pretrained_local_path_is_checked_before_compute(make_cfg, tmp_path: Path, where: str) -> None:
    path = tmp_path / "no_such_model"
    if where == "empty":
        path.mkdir()
    # a teacher config no test has cached: reaching its pre-training would train it
    cfg = make_cfg("student=hf", f"student.model.pretrained={path}", "teacher.pretrain.max_steps=3")
    message = "no such directory" if where == "missing" else "the directory is empty"
    with pytest.raises(ConfigError, match=rf"student\.model\.pretrained='{path}': {message}"):
        run(cfg)
    assert not (Path(cfg.paths.output_dir) / "teacher_moe").exists()  # no teacher pre-training began


def test_unwritable_cache_dir_is_named_before_compute(make_cfg, tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    cfg = make_cfg("baseline=false", "teacher.pretrain.max_steps=3")
    with open_dict(cfg):
        cfg.paths.cache_dir = str(blocker / "cache")
    with pytest.raises(ConfigError, match=r"paths\.cache_dir='.*a_file/cache': cannot write there"):
        run(cfg)
    assert not (Path(cfg.paths.output_dir) / "teacher_moe").exists()  # no teacher pre-training began


def test_seq_len_beyond_a_pretrained_students_positions_is_refused(make_cfg, tmp_path: Path) -> None:
    from transformers import LlamaConfig

    from kd_lightning.data import byte_tokenizer
    from kd_lightning.models import build_causal_lm, save_model

    config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, max_position_embeddings=32)
    student_dir = save_model(build_causal_lm(config, vocab_size=259, tokenizer=byte_tokenizer(), seed=0),
                             tmp_path / "short", byte_tokenizer())
    cfg = make_cfg("student=hf", f"student.model.pretrained={student_dir}", "baseline=false")  # seq_len 64
    # Refused by the checks that run before any data is read or model built (a local model's
    # config.json is read there), not after the teacher's pre-training.
    from kd_lightning.run.checks import validate_config

    with pytest.raises(ConfigError, match=r"dataset\.seq_len=64 exceeds student\.model\.max_position_embeddings=32"):
        validate_config(cfg)
    with pytest.raises(ConfigError, match=r"dataset\.seq_len=64 exceeds student\.model\.max_position_embeddings=32"):
        run(cfg)
    assert not (Path(cfg.paths.output_dir) / "student").exists()


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_every_response_empty_is_refused_naming_the_data(make_cfg, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": f"question {i}?", "response": " " * (i % 2)}
                                                  for i in range(40)])
    cfg = make_cfg("dataset=text_files", f"dataset.paths=[{data}]", "dataset.prompt_field=prompt",
                   "dataset.seq_len=32", "baseline=false")
    with pytest.raises(ConfigError, match=r"dataset\.paths=\[.*pairs\.jsonl'\] \(dataset\.response_field='response'\): "
                                          r"every one of the \d+ train records is empty or whitespace only"):
        run(cfg)


def test_empty_records_and_a_dominant_document_warn_with_counts(tmp_path: Path) -> None:
    from kd_lightning.data.text import TextFilesDataModule

    rows = [{"text": "" if i % 3 == 0 else f"line {i} " * 3} for i in range(30)] + [{"text": "x" * 5000}]
    data = write_jsonl(tmp_path / "docs.jsonl", rows)
    datamodule = TextFilesDataModule(paths=[str(data)], seq_len=32, val_fraction=0.0, test_fraction=0.0)
    with pytest.warns(UserWarning) as warned:
        datamodule.setup("fit")
    messages = [str(w.message) for w in warned]
    assert any(re.search(r"dataset\.paths=.*: 10 of 31 train records \(32%\) are empty", m) for m in messages), messages
    # records are shuffled before the split: the long one is somewhere
    assert any(re.search(r"record \d+ holds 9\d% of the train split's \d+ tokens; the split is mostly one document", m)
               for m in messages), messages


def kill_trainer_named(monkeypatch: pytest.MonkeyPatch, prefix: str, step: int, signum: int = signal.SIGTERM) -> None:
    """Every Trainer `kd_lightning.run.builders.make_trainer` builds for `name=<prefix>...` sends itself
    SIGTERM after `step` optimiser steps (the pattern of tests/test_resume.py, for stages whose
    Trainer has no `callbacks` config); `signum=signal.SIGINT` stands for Ctrl-C."""
    import kd_lightning.run.builders as builders

    make_trainer = builders.make_trainer

    def killing(cfg, **kwargs):
        if kwargs["name"].startswith(prefix):
            kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), SigtermAt(step, signum)]
        return make_trainer(cfg, **kwargs)

    monkeypatch.setattr(builders, "make_trainer", killing)


def our_sigterm_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "kd_lightning" and "SIGTERM" in r.getMessage()]


def tiny_teacher_cfg(out: Path, cache: Path, *extra: str):
    overrides = ("stage=teacher", "teacher.pretrain.max_steps=6", "teacher.pretrain.warmup_steps=1", *extra)
    return compose_config([*tiny_overrides(overrides), *overrides], out, cache)


def test_sigterm_in_teacher_pretraining_saves_and_resume_auto_ends_with_the_same_teacher(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    """SIGTERM at step 3 of 6 of the teacher's CE pre-training: a resumable checkpoint, one line,
    exit 143; `resume=auto` continues it and the cached teacher is bitwise the uninterrupted one."""
    run(tiny_teacher_cfg(tmp_path / "straight", tmp_path / "cache_straight"))
    with monkeypatch.context() as patch:
        kill_trainer_named(patch, "teacher_", 3)
        out, cache = tmp_path / "resumed", tmp_path / "cache_resumed"
        with caplog.at_level("INFO", logger="kd_lightning"), pytest.raises(SystemExit) as stopped:
            run(tiny_teacher_cfg(out, cache))
    assert stopped.value.code == 128 + signal.SIGTERM
    said = our_sigterm_lines(caplog)
    assert len(said) == 1 and said[0].startswith("SIGTERM during teacher pre-training: saved ") and "resume=auto" in said[0]
    partial = Path(said[0].split("saved ")[1].split(";")[0])
    assert partial.parent == out / "checkpoints"
    assert torch.load(partial, map_location="cpu", weights_only=True)["global_step"] == 3
    assert not list((cache).glob("**/kd_manifest.json"))  # nothing half-trained was cached

    caplog.clear()
    with caplog.at_level("INFO", logger="kd_lightning"):
        run(tiny_teacher_cfg(out, cache, "resume=auto"))
    assert f"resume: continuing the teacher pre-training from {partial}" in caplog.text
    assert not partial.exists()  # deleted once the teacher is cached
    straight = load_file(str(next((tmp_path / "cache_straight").glob("**/model.safetensors"))))
    resumed = load_file(str(next(cache.glob("**/model.safetensors"))))
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)



def test_sigterm_in_the_ce_baseline_saves_and_resume_auto_reports_the_same_models(
        make_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    """SIGTERM at step 2 of 4 of the CE-only baseline (after the distillation finished): one line,
    exit 143; `resume=auto` skips the finished distillation, continues the baseline, and reports the
    held-out rows of an uninterrupted run."""
    short = ("trainer.max_steps=4", "trainer.val_check_interval=4", "seed=3")  # seed 3: a baseline no test cached
    straight = run(make_cfg(*short, output_dir=tmp_path / "straight"))
    with open_dict(cfg := make_cfg(*short, output_dir=tmp_path / "resumed")):
        cfg.paths.cache_dir = str(tmp_path / "cache_resumed")  # the baseline is not in the straight run's cache
    with monkeypatch.context() as patch:
        kill_trainer_named(patch, "baseline_", 2)
        with caplog.at_level("INFO", logger="kd_lightning"), pytest.raises(SystemExit) as stopped:
            run(cfg)
    assert stopped.value.code == 128 + signal.SIGTERM
    said = our_sigterm_lines(caplog)
    assert len(said) == 1 and said[0].startswith("SIGTERM during CE baseline: saved "), said
    assert not (tmp_path / "resumed" / "summary.json").exists()
    with open_dict(cfg):
        cfg.resume = "auto"
    resumed = run(cfg)
    assert resumed["models"] == straight["models"]


def sigterm_now(*_: object, **__: object) -> None:
    """Stands in for a step that runs outside any fit and is interrupted there."""
    import os

    os.kill(os.getpid(), signal.SIGTERM)


class UnhandledSigterm(RuntimeError):
    pass


def _unhandled(signum: int, frame: object) -> None:
    raise UnhandledSigterm("SIGTERM reached the test's fallback handler: the stage installed none")


def stops_with_one_sigterm_line(caplog: pytest.LogCaptureFixture, cfg) -> str:
    """Run `cfg`; it must exit 143 with one line of ours. A stage that installs no handler meets a
    fallback that raises (instead of the default action, which would kill the test process)."""
    previous = signal.signal(signal.SIGTERM, _unhandled)
    try:
        return _stops(caplog, cfg)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _stops(caplog: pytest.LogCaptureFixture, cfg) -> str:
    with caplog.at_level("INFO", logger="kd_lightning"), pytest.raises(SystemExit) as stopped:
        run(cfg)
    assert stopped.value.code == 128 + signal.SIGTERM
    said = our_sigterm_lines(caplog)
    assert len(said) == 1, said
    return said[0]


def test_sigterm_in_cache_teacher_and_in_a_takd_stage_exit_143_with_one_line(
        make_cfg, monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    import kd_lightning.run.cache_teacher as cache_teacher
    import kd_lightning.run.takd as takd
    from tests.test_takd import TINY_CHAIN

    monkeypatch.setattr(cache_teacher, "cache_teacher_targets", sigterm_now)
    line = stops_with_one_sigterm_line(caplog, make_cfg("stage=cache_teacher"))
    assert line.startswith("SIGTERM during stage=cache_teacher: nothing partial was kept")

    caplog.clear()
    monkeypatch.setattr(takd, "run_stage", sigterm_now)
    line = stops_with_one_sigterm_line(caplog, make_cfg(*TINY_CHAIN))
    assert line.startswith("SIGTERM during TAKD stage 1 (stage1_ta1): nothing partial was kept"), line


def test_sigterm_after_the_fit_says_what_is_kept_and_resume_auto_finishes(
        make_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    import kd_lightning.run.distill as distill_stage

    out = tmp_path / "run"
    cfg = make_cfg("baseline=false", "trainer.max_steps=2", "trainer.val_check_interval=2", output_dir=out)
    with monkeypatch.context() as patch:
        patch.setattr(distill_stage, "summarize", sigterm_now)
        line = stops_with_one_sigterm_line(caplog, cfg)
    assert line == (f"SIGTERM during the held-out evaluation and saving: saved {out / 'checkpoints' / 'last.ckpt'}; "
                    "rerun the same command with resume=auto to continue")
    assert not (out / "summary.json").exists() and not list(out.glob(".student.tmp-*"))
    with open_dict(cfg):
        cfg.resume = "auto"
    summary = run(cfg)
    assert (out / "summary.json").is_file() and (out / "student" / "config.json").is_file()
    assert summary["models"]["student (KD)"]["count"] > 0
