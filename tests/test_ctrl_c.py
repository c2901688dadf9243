"""Ctrl-C (SIGINT) is SIGTERM's equal (issue #24): the same save, the same one line, in every stage,
exit status 130; a second Ctrl-C aborts at once. Before, Ctrl-C during teacher pre-training exited 1
with no checkpoint (Lightning catches KeyboardInterrupt and calls `sys.exit(1)`), and during
distillation exited 1 without the resume line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict

from kd_lightning.infra.signals import EXIT_SIGINT
from kd_lightning.run.pipeline import run
from tests.conftest import REPO
from tests.test_run_reliability import kill_trainer_named, tiny_teacher_cfg

SIGINT = int(signal.SIGINT)


class UnhandledSigint(RuntimeError):
    pass


def _unhandled(signum: int, frame: object) -> None:
    raise UnhandledSigint("SIGINT reached the test's fallback handler: the stage installed none")


@pytest.fixture
def no_keyboard_interrupt() -> Iterator[None]:
    """A stage that installs no handler meets a fallback that raises a plain error, so a missing
    handler fails the test instead of interrupting pytest itself."""
    previous = signal.signal(signal.SIGINT, _unhandled)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def ctrl_c_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "kd_lightning" and "Ctrl-C" in r.getMessage()]


def stopped_by_ctrl_c(caplog: pytest.LogCaptureFixture, cfg) -> str:
    with caplog.at_level("INFO", logger="kd_lightning"), pytest.raises(SystemExit) as stopped:
        run(cfg)
    assert stopped.value.code == EXIT_SIGINT
    said = ctrl_c_lines(caplog)
    assert len(said) == 1, said
    return said[0]


def sigint_now(*_: object, **__: object) -> None:
    os.kill(os.getpid(), signal.SIGINT)


def test_ctrl_c_in_teacher_pretraining_saves_and_resume_auto_continues(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog, no_keyboard_interrupt) -> None:
    out, cache = tmp_path / "run", tmp_path / "cache"
    with monkeypatch.context() as patch:
        kill_trainer_named(patch, "teacher_", 3, signum=SIGINT)
        line = stopped_by_ctrl_c(caplog, tiny_teacher_cfg(out, cache))
    assert line.startswith("Ctrl-C (SIGINT) during teacher pre-training: saved ") and "resume=auto" in line, line
    partial = Path(line.split("saved ")[1].split(";")[0])
    assert partial.parent == out / "checkpoints"
    assert torch.load(partial, map_location="cpu", weights_only=True)["global_step"] == 3  # the batch finished
    assert signal.getsignal(signal.SIGINT) is _unhandled  # the previous handler is back
    caplog.clear()
    with caplog.at_level("INFO", logger="kd_lightning"):
        run(tiny_teacher_cfg(out, cache, "resume=auto"))
    assert f"resume: continuing the teacher pre-training from {partial}" in caplog.text


def test_ctrl_c_in_distillation_saves_last_ckpt_with_the_resume_line(
        make_cfg, tmp_path: Path, caplog, no_keyboard_interrupt) -> None:
    out = tmp_path / "run"
    cfg = make_cfg("baseline=false", "+callbacks.kill._target_=tests.test_resume.SigtermAt", "+callbacks.kill.step=2",
                   f"+callbacks.kill.signum={SIGINT}", output_dir=out)
    line = stopped_by_ctrl_c(caplog, cfg)
    last = out / "checkpoints" / "last.ckpt"
    assert line == (f"Ctrl-C (SIGINT) during distillation: saved {last}; rerun the same command with resume=auto "
                    "to continue")
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 2
    assert not (out / "summary.json").exists()


def test_ctrl_c_in_the_ce_baseline_saves_its_checkpoint(
        make_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog, no_keyboard_interrupt) -> None:
    with open_dict(cfg := make_cfg("trainer.max_steps=4", "trainer.val_check_interval=4", "seed=5")):
        cfg.paths.cache_dir = str(tmp_path / "cache")
    with monkeypatch.context() as patch:
        kill_trainer_named(patch, "baseline_", 2, signum=SIGINT)
        line = stopped_by_ctrl_c(caplog, cfg)
    assert line.startswith("Ctrl-C (SIGINT) during CE baseline: saved ") and "baseline-" in line, line


def test_ctrl_c_in_cache_teacher_in_a_takd_stage_and_while_reading_data(
        make_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog, no_keyboard_interrupt) -> None:
    import kd_lightning.run.cache_teacher as cache_teacher
    import kd_lightning.run.pipeline as pipeline
    import kd_lightning.run.takd as takd
    from tests.test_takd import TINY_CHAIN

    monkeypatch.setattr(cache_teacher, "cache_teacher_targets", sigint_now)
    line = stopped_by_ctrl_c(caplog, make_cfg("stage=cache_teacher", output_dir=tmp_path / "cache_teacher"))
    assert line.startswith("Ctrl-C (SIGINT) during stage=cache_teacher: nothing partial was kept"), line

    caplog.clear()
    monkeypatch.setattr(takd, "run_stage", sigint_now)
    line = stopped_by_ctrl_c(caplog, make_cfg(*TINY_CHAIN, output_dir=tmp_path / "takd"))
    assert line.startswith("Ctrl-C (SIGINT) during TAKD stage 1 (stage1_ta1): nothing partial was kept"), line

    caplog.clear()
    # while the data module is built (the run's first `instantiate`): no stage has started, the run's own line
    monkeypatch.setattr(pipeline.hydra.utils, "instantiate", sigint_now)
    line = stopped_by_ctrl_c(caplog, make_cfg("baseline=false", output_dir=tmp_path / "data"))
    assert line.startswith("Ctrl-C (SIGINT) during stage=distill: nothing partial was kept"), line


SECOND_CTRL_C = textwrap.dedent("""
    import logging, os, signal, time
    from kd_lightning.infra.signals import exit_on_sigterm

    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    def save():  # the user presses Ctrl-C again while the first one's save runs
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(30)
        print("save finished")

    with exit_on_sigterm("distillation", saved=save):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(30)
    print("not interrupted")
""")


def test_a_second_ctrl_c_aborts_at_once() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    done = subprocess.run([sys.executable, "-c", SECOND_CTRL_C], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == EXIT_SIGINT, done.stderr[-2000:]
    assert "second Ctrl-C: aborting at once" in done.stderr
    assert "save finished" not in done.stdout and "not interrupted" not in done.stdout
