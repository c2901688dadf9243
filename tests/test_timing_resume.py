"""Timing after a resume counts the whole training (issue #24): `FitTimer`'s counters travel in the
checkpoint. Before, a resumed run reported only the tokens trained after the resume (and 0 when the
resume only redid the saving)."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from omegaconf import open_dict

from kd_lightning.callbacks.timing import FitTimer
from kd_lightning.run.pipeline import run

KILL = ("+callbacks.kill._target_=tests.test_resume.SigtermAt", "+callbacks.kill.step=3")
RESUME = ("resume=auto", "+resume_allow_changes=true")


def test_fit_timer_round_trips_its_counters() -> None:
    import torch

    timer = FitTimer()
    timer.tokens = torch.tensor(1234)
    timer.seconds = 5.0
    restored = FitTimer()
    restored.load_state_dict(timer.state_dict())
    assert int(restored.tokens) == 1234 and restored.carried_seconds == 5.0


def test_a_resumed_run_reports_the_tokens_and_time_of_the_whole_training(make_cfg, tmp_path: Path) -> None:
    common = ("baseline=false", "trainer.max_steps=6", "trainer.val_check_interval=3")
    straight = run(make_cfg(*common, output_dir=tmp_path / "straight"))["timing"]
    out = tmp_path / "resumed"
    with pytest.raises(SystemExit) as stopped:
        run(make_cfg(*common, *KILL, output_dir=out))
    assert stopped.value.code == 128 + signal.SIGTERM
    resumed = run(make_cfg(*common, *RESUME, output_dir=out))["timing"]
    assert resumed["train_tokens"] == straight["train_tokens"] > 0
    assert resumed["fit_seconds"] > 0

    # a resume of a finished fit (only the saving is redone) keeps the figures too
    (out / "summary.json").unlink()
    cfg = make_cfg(*common, *RESUME, output_dir=out)
    again = run(cfg)["timing"]
    assert again["train_tokens"] == straight["train_tokens"]
    assert again["fit_seconds"] >= resumed["fit_seconds"] * 0.5
