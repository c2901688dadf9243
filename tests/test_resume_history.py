"""After `+resume_allow_changes=true` with a changed loss, summary.json records the history of what
changed and when (issue #24), not only the last loss."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from kd_lightning.run.pipeline import run

COMMON = ("baseline=false", "trainer.max_steps=6", "trainer.val_check_interval=2")
RESUME = ("resume=auto", "+resume_allow_changes=true")


def kill_at(step: int) -> tuple[str, ...]:
    return ("+callbacks.kill._target_=tests.test_resume.SigtermAt", f"+callbacks.kill.step={step}")


def test_summary_records_each_resume_with_changes(make_cfg, tmp_path: Path) -> None:
    out = tmp_path / "run"
    for overrides in [("loss=kl", *kill_at(2)), ("loss=reverse_kl", *kill_at(4), *RESUME)]:
        with pytest.raises(SystemExit) as stopped:
            run(make_cfg(*COMMON, *overrides, output_dir=out))
        assert stopped.value.code == 128 + signal.SIGTERM
    summary = run(make_cfg(*COMMON, "loss=js", *RESUME, output_dir=out))
    assert summary["loss"] == "js"
    history = json.loads((out / "summary.json").read_text())["resume_history"]
    assert [h["resume"] for h in history] == [1, 2]
    first, second = history
    assert first["from_step"] == 2 and second["from_step"] == 4
    assert first["changes"]["loss.name"] == {"from": "kl", "to": "reverse_kl"}
    assert first["changes"]["callbacks.kill.step"] == {"from": 2, "to": 4}
    assert second["changes"]["loss.name"] == {"from": "reverse_kl", "to": "js"}  # relative to the previous start
    assert second["changes"]["callbacks.kill.step"] == {"from": 4, "to": "<absent>"}
    assert all(h["time"] and h["from_checkpoint"] == "last.ckpt" for h in history)


def test_a_resume_without_changes_adds_no_history(make_cfg, tmp_path: Path) -> None:
    out = tmp_path / "run"
    run(make_cfg(*COMMON, output_dir=out))
    assert "resume_history" not in json.loads((out / "summary.json").read_text())
