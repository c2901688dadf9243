"""Interruption and resume: SIGTERM saves a checkpoint; `resume=auto` continues from it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning import Callback

from tests.conftest import REPO, TINY_LM_DATA, TINY_TEACHER, TINY_TRAINER
from tests.test_csv_resume import rows as metric_rows


class SigtermAt(Callback):
    """Sends a signal (SIGTERM by default) to its own process once `step` optimizer steps are done."""

    def __init__(self, step: int, signum: int = signal.SIGTERM) -> None:
        self.step, self.signum = step, signum

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step and not getattr(self, "sent", False):
            self.sent = True
            os.kill(os.getpid(), self.signum)


# The killed runs add the test's `+callbacks.kill`, which a resume leaves out: the run record
# (kd_lightning.infra.runrecord) sees a changed `callbacks` key and refuses unless told. The opt-in is the
# honest fix: a callback is part of what a run trains in general, so `callbacks.*` stays compared.
RESUME = ("resume=auto", "+resume_allow_changes=true")


def train_py(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_sigterm_saves_checkpoint_and_resume_auto_continues(tmp_path: Path, cache_dir: Path) -> None:
    out = tmp_path / "run"
    common = [*TINY_TRAINER, *TINY_LM_DATA, *TINY_TEACHER, "trainer.max_steps=8", "trainer.val_check_interval=4",
              "baseline=false", f"paths.cache_dir={cache_dir}", f"hydra.run.dir={out}"]
    killed = train_py(*common, "+callbacks.kill._target_=tests.test_resume.SigtermAt", "+callbacks.kill.step=3",
                      cwd=tmp_path)
    assert killed.returncode == 128 + signal.SIGTERM, killed.stderr[-2000:]
    # one line of ours (Lightning's own "Received SIGTERM" is not counted)
    said = [line for line in (killed.stderr + killed.stdout).splitlines() if "SIGTERM" in line and "saved" in line]
    assert len(said) == 1 and "SIGTERM during distillation: saved" in said[0] and "resume=auto" in said[0], said
    last = out / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 3
    assert not (out / "summary.json").exists()
    before = metric_rows(out)

    resumed = train_py(*common, *RESUME, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Restoring states from the checkpoint path" in resumed.stdout + resumed.stderr
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 8
    assert (out / "summary.json").exists() and (out / "student" / "config.json").exists()
    # the default logger (ResumableCSVLogger) keeps the rows of steps 0-2 and logs no step twice
    # (this took over tests/test_csv_resume.py's real-run test, which checked it with its own kill at step 4)
    after = metric_rows(out)
    early = [r for r in before if int(r["step"]) < 3]
    kept = after[: len(early)]
    assert early and [{k: r[k] for k in e} for r, e in zip(kept, early)] == early
    assert all(not r[k] for r, e in zip(kept, early) for k in r.keys() - e.keys())  # columns added later: empty
    train_steps = [int(r["step"]) for r in after if r.get("train/loss")]
    assert len(train_steps) == len(set(train_steps)) and max(train_steps) >= 7  # each step once, to the end


def test_same_seed_same_metrics_different_seed_different_run(make_cfg, tmp_path: Path) -> None:
    from kd_lightning.run.pipeline import run

    def student_loss(seed: int, name: str) -> float:
        summary = run(make_cfg(f"seed={seed}", "baseline=false", output_dir=tmp_path / name))
        return summary["models"]["student (KD)"]["loss"]

    first, again, other = student_loss(0, "a"), student_loss(0, "b"), student_loss(1, "c")
    assert first == again
    assert other != first


# Single-process cases run in-process (the signal is sent to the test's own process, so the same
# handler and callback run as in `train.py`); the multi-process ones launch `train.py` (slow tier).
RESUME_CASES = {
    "plain": [],
    "dts": ["temperature=dts"],
    "taid": ["loss=taid"],
    "sar": ["callbacks=sar"],
    "offpolicy": ["callbacks=distillm_offpolicy", "callbacks.distillm_offpolicy.init_threshold=1.0",
                  "callbacks.distillm_offpolicy.capacity=16", "callbacks.distillm_offpolicy.max_new_tokens=8"],
    "ensemble_reinforced": ["teacher=ensemble", "callbacks=reinforced", "teacher.members.moe.pretrain.max_steps=4",
                            "teacher.members.dense.pretrain.max_steps=4"],
}
DISTRIBUTED_RESUME_CASES = {
    "fsdp": ["strategy=fsdp"],  # 2 processes, sharded checkpoint directory (last.ckpt/)
    "ddp": ["strategy=ddp"],
}
KILL_AT_3 = ("+callbacks.kill._target_=tests.test_resume.SigtermAt", "+callbacks.kill.step=3")
SHORT_RUN = ("trainer.max_steps=7", "trainer.val_check_interval=4", "baseline=false")


def same_students(a_dir: Path, b_dir: Path) -> bool:
    from safetensors.torch import load_file

    a = load_file(str(a_dir / "student" / "model.safetensors"))
    b = load_file(str(b_dir / "student" / "model.safetensors"))
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("case", sorted(RESUME_CASES))
def test_interrupted_and_resumed_run_equals_uninterrupted(make_cfg, tmp_path: Path, case: str) -> None:
    """SIGTERM at step 3 (mid-epoch), resume=auto: the final student is bitwise the uninterrupted one,
    with every callback's state (temperature, TAID t, router + its optimiser, replay buffer, policy).
    The teacher comes from the session's cache; only the output directories are the test's own."""
    from kd_lightning.run.pipeline import run

    extra = RESUME_CASES[case]
    run(make_cfg(*SHORT_RUN, *extra, output_dir=tmp_path / "straight"))
    with pytest.raises(SystemExit) as stopped:
        run(make_cfg(*SHORT_RUN, *extra, *KILL_AT_3, output_dir=tmp_path / "resumed"))
    assert stopped.value.code == 128 + signal.SIGTERM
    assert torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", map_location="cpu",
                      weights_only=True)["global_step"] == 3
    run(make_cfg(*SHORT_RUN, *extra, *RESUME, output_dir=tmp_path / "resumed"))
    assert same_students(tmp_path / "straight", tmp_path / "resumed"), case


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.parametrize("case", sorted(DISTRIBUTED_RESUME_CASES))
def test_interrupted_and_resumed_distributed_run_equals_uninterrupted(tmp_path: Path, cache_dir: Path, case: str) -> None:
    """The same through `train.py` on 2 processes (a real signal on every rank, mid-epoch), the teacher
    read from the session's cache; under FSDP the checkpoint is sharded and leaves the frozen
    teacher out. (This took over tests/test_distributed_resume.py, which checked the same on a
    hand-built 2-process harness.)"""
    common = [*TINY_TRAINER, *TINY_LM_DATA, *TINY_TEACHER, *SHORT_RUN, f"paths.cache_dir={cache_dir}",
              *DISTRIBUTED_RESUME_CASES[case]]
    straight = train_py(*common, f"hydra.run.dir={tmp_path / 'straight'}", cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr[-3000:]
    # the plain 2-process run (this took over tests/test_cli.py's DDP run): both ranks, a summary
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in straight.stdout + straight.stderr
    summary = json.loads((tmp_path / "straight" / "summary.json").read_text())
    assert summary["models"]["student (KD)"]["loss"] < 6.0
    interrupted = [*common, f"hydra.run.dir={tmp_path / 'resumed'}"]
    killed = train_py(*interrupted, *KILL_AT_3, cwd=tmp_path)
    assert killed.returncode == 128 + signal.SIGTERM, killed.stderr[-3000:]
    checkpoint = tmp_path / "resumed" / "checkpoints" / "last.ckpt"
    if case == "fsdp":  # sharded: a directory of shards, the frozen teacher's weights left out
        from torch.distributed.checkpoint import FileSystemReader

        stored = FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
        assert checkpoint.is_dir() and any(k.startswith("state_dict.student.") for k in stored)
        assert not any(k.startswith("state_dict.teachers.") for k in stored)
    resumed = train_py(*interrupted, *RESUME, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert same_students(tmp_path / "straight", tmp_path / "resumed"), case


@pytest.mark.slow
def test_sigkill_resumes_from_last_periodic_checkpoint_and_matches(tmp_path: Path, cache_dir: Path) -> None:
    """SIGKILL cannot be caught: the run continues from the last checkpoint written at validation
    (step 4 here) and still ends bitwise equal to the uninterrupted run."""
    from safetensors.torch import load_file

    common = [*TINY_TRAINER, *TINY_LM_DATA, *TINY_TEACHER, *SHORT_RUN, f"paths.cache_dir={cache_dir}"]
    straight = train_py(*common, f"hydra.run.dir={tmp_path / 'straight'}", cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr[-3000:]
    interrupted = [*common, f"hydra.run.dir={tmp_path / 'resumed'}"]
    killed = train_py(*interrupted, "+callbacks.kill._target_=tests.test_resume.SigtermAt", "+callbacks.kill.step=6",
                      f"+callbacks.kill.signum={int(signal.SIGKILL)}", cwd=tmp_path)
    assert killed.returncode == -signal.SIGKILL
    last = tmp_path / "resumed" / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 4
    resumed = train_py(*interrupted, *RESUME, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert same_students(tmp_path / "straight", tmp_path / "resumed")


def test_resume_from_a_missing_checkpoint_fails_clearly(make_cfg, tmp_path: Path) -> None:
    from kd_lightning.run.pipeline import run

    with pytest.raises(FileNotFoundError, match="resume=.*no checkpoint at"):
        run(make_cfg(f"resume={tmp_path / 'nope.ckpt'}"))
