"""The run-directory guard (`kd_lightning.infra.rundir`) and the run record (`kd_lightning.infra.runrecord`)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from kd_lightning.infra.rundir import (ResumeCheckpointError, RunDirBusyError, RunDirLock, find_resume_checkpoint,
                                 guard_run_dir)
from kd_lightning.infra.runrecord import (ResumeConfigError, compare_for_resume, keep_hydra_record, load_run_config,
                                    record_run_config)
from tests.conftest import REPO

HOLD_LOCK = textwrap.dedent("""
    import sys, time
    from kd_lightning.infra.rundir import RunDirLock
    lock = RunDirLock(sys.argv[1]).acquire()
    print("locked", flush=True)
    time.sleep(60)
""")


def test_second_run_in_the_same_directory_fails_fast_naming_the_owner(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path)], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirBusyError, match=rf"{tmp_path} is in use by another run \(pid {holder.pid} on .*"
                                                  r"choose another hydra.run.dir"):
            RunDirLock(tmp_path).acquire()
    finally:
        holder.kill()  # SIGKILL: the kernel releases the lock with the process
        holder.wait()
    with RunDirLock(tmp_path):  # a dead owner's lock file never blocks
        pass


def test_lock_is_released_on_exception(tmp_path: Path) -> None:
    with pytest.raises(KeyError):
        with RunDirLock(tmp_path):
            raise KeyError("boom")
    with RunDirLock(tmp_path) as lock:
        assert f'"pid": {os.getpid()}' in lock.path.read_text()


def test_guard_refuses_a_finished_run_or_checkpoints_without_resume(tmp_path: Path) -> None:
    guard_run_dir(tmp_path / "fresh", None)
    (tmp_path / "ckpt" / "checkpoints").mkdir(parents=True)
    (tmp_path / "ckpt" / "checkpoints" / "last.ckpt").write_bytes(b"x")
    with pytest.raises(FileExistsError, match=r"holds checkpoints of an unfinished run \(last.ckpt, 1 in all\); "
                                              "pass resume=auto to continue it or choose another hydra.run.dir"):
        guard_run_dir(tmp_path / "ckpt", None)
    guard_run_dir(tmp_path / "ckpt", "auto")
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "summary.json").write_text("{}")
    with pytest.raises(FileExistsError, match=r"already holds a finished run \(summary.json\)"):
        guard_run_dir(tmp_path / "done", None)


def save_ckpt(path: Path, step: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {"w": torch.full((64,), float(step))}, "global_step": step}, path)
    return path


def test_resume_uses_last_or_falls_back_to_newest_valid_step(tmp_path: Path) -> None:
    checkpoints = tmp_path / "checkpoints"
    assert find_resume_checkpoint(checkpoints)[0] is None  # nothing there: a fresh start
    save_ckpt(checkpoints / "step4.ckpt", 4)
    save_ckpt(checkpoints / "step8.ckpt", 8)
    last = save_ckpt(checkpoints / "last.ckpt", 9)
    assert find_resume_checkpoint(checkpoints) == (last, [])
    last.write_bytes(last.read_bytes()[:100])  # truncated by a full disk
    (checkpoints / "step12.ckpt").write_bytes(b"garbage")
    path, notes = find_resume_checkpoint(checkpoints)
    assert path == checkpoints / "step8.ckpt"
    assert len(notes) == 1 and "last.ckpt is not a torch checkpoint archive" in notes[0] and "step8.ckpt" in notes[0]
    last.unlink()
    assert find_resume_checkpoint(checkpoints)[0] == checkpoints / "step8.ckpt"


def test_resume_with_no_valid_checkpoint_names_every_file(tmp_path: Path) -> None:
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    (checkpoints / "last.ckpt").write_bytes(b"")
    (checkpoints / "step3.ckpt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ResumeCheckpointError) as info:
        find_resume_checkpoint(checkpoints)
    message = str(info.value)
    assert "last.ckpt: empty (0 bytes)" in message and "step3.ckpt: not a torch checkpoint archive" in message
    assert "weights_only=False" not in message


def test_resume_accepts_a_whole_sharded_checkpoint_directory_only(tmp_path: Path) -> None:
    """strategy=fsdp saves `last.ckpt/` as a directory (torch.distributed.checkpoint shards, `.metadata`
    written once every process has written, then Lightning's `meta.pt`)."""
    checkpoints = tmp_path / "checkpoints"
    save_ckpt(checkpoints / "step4.ckpt", 4)
    last = checkpoints / "last.ckpt"
    last.mkdir()
    (last / "__0_0.distcp").write_bytes(b"shard")  # killed before the save finished: no .metadata
    path, notes = find_resume_checkpoint(checkpoints)
    assert path == checkpoints / "step4.ckpt" and "without .metadata" in notes[0]
    (last / ".metadata").write_bytes(b"plan")
    torch.save({"global_step": 9}, last / "meta.pt")  # no loop state
    assert "meta.pt is no loop state" in find_resume_checkpoint(checkpoints)[1][0]
    torch.save({"global_step": 9, "loops": {}, "callbacks": {}}, last / "meta.pt")
    assert find_resume_checkpoint(checkpoints) == (last, [])


RECORDED = {"seed": 0, "resume": None, "loss": {"name": "kl", "fn": {"_target_": "kd_lightning.losses.forward_kl"}},
            "dataset": {"batch_size": 8}, "distill": {"kd_weight": 0.5}, "trainer": {"max_steps": 400},
            "paths": {"output_dir": "/a"}, "cpu_threads": None, "logger": {"csv": {"save_dir": "/a"}}}


def test_resume_refuses_meaning_changing_keys_and_names_the_opt_in() -> None:
    import copy

    new = copy.deepcopy(RECORDED)
    new.update(seed=1, resume="auto", cpu_threads=2, logger={})
    new["loss"]["name"] = "reverse_kl"
    new["dataset"]["batch_size"] = 16
    new["trainer"]["max_steps"] = 800  # extending is fine
    new["paths"]["output_dir"] = "/b"
    with pytest.raises(ResumeConfigError) as info:
        compare_for_resume(RECORDED, new, allow=False)
    message = str(info.value)
    assert "dataset.batch_size: 8 -> 16" in message and "loss.name: 'kl' -> 'reverse_kl'" in message
    assert "seed: 0 -> 1" in message and "+resume_allow_changes=true" in message
    for ignored in ("max_steps", "cpu_threads", "paths", "logger", "resume:"):
        assert ignored not in message
    assert len(compare_for_resume(RECORDED, new, allow=True)) == 3
    extended = {**RECORDED, "trainer": {"max_steps": 800}, "resume": "auto"}
    assert compare_for_resume(RECORDED, extended) == []


def test_run_config_is_written_once(tmp_path: Path) -> None:
    path, written = record_run_config(tmp_path, RECORDED)
    assert written and yaml.safe_load(path.read_text()) == RECORDED
    _, again = record_run_config(tmp_path, {**RECORDED, "seed": 5})
    assert not again and load_run_config(tmp_path) == RECORDED


def test_hydra_record_of_the_first_start_is_kept(tmp_path: Path) -> None:
    hydra_dir = tmp_path / ".hydra"
    hydra_dir.mkdir()

    def hydra_writes(overrides: str) -> None:  # what Hydra's run_job does on every start
        for name in ("config.yaml", "hydra.yaml", "overrides.yaml"):
            (hydra_dir / name).write_text(f"{name}: {overrides}\n")

    hydra_writes("first")
    assert keep_hydra_record(tmp_path) is None
    hydra_writes("resume=auto")
    assert keep_hydra_record(tmp_path) == hydra_dir / "config.resume-1.yaml"
    hydra_writes("resume=auto trainer.max_steps=800")
    assert keep_hydra_record(tmp_path) == hydra_dir / "config.resume-2.yaml"
    assert (hydra_dir / "config.yaml").read_text() == "config.yaml: first\n"
    assert (hydra_dir / "overrides.yaml").read_text() == "overrides.yaml: first\n"
    assert (hydra_dir / "overrides.resume-1.yaml").read_text() == "overrides.yaml: resume=auto\n"
    assert "max_steps=800" in (hydra_dir / "config.resume-2.yaml").read_text()


HYDRA_APP = textwrap.dedent("""
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from kd_lightning.infra.runrecord import keep_hydra_record

    @hydra.main(version_base="1.3", config_path=None, config_name=None)
    def main(cfg):
        keep_hydra_record(HydraConfig.get().runtime.output_dir)

    main()
""")


def test_real_hydra_start_rewrites_dot_hydra_and_the_original_is_restored(tmp_path: Path) -> None:
    app = tmp_path / "app.py"
    app.write_text(HYDRA_APP)
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for overrides in (["+seed=0"], ["+seed=0", "+resume=auto"]):
        done = subprocess.run([sys.executable, str(app), f"hydra.run.dir={out}", *overrides], env=env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
    assert "resume" not in (out / ".hydra" / "config.yaml").read_text()
    assert "resume: auto" in (out / ".hydra" / "config.resume-1.yaml").read_text()
    assert "+resume=auto" in (out / ".hydra" / "overrides.resume-1.yaml").read_text()


def test_start_run_in_order(tmp_path: Path) -> None:
    from kd_lightning.infra.rundir import start_run

    config = {"seed": 0, "resume": None, "trainer": {"max_steps": 4}}
    first = start_run(tmp_path, None, config)
    assert first.checkpoint is None and load_run_config(tmp_path) == config
    with pytest.raises(RunDirBusyError):
        start_run(tmp_path, "auto", config)
    first.lock.release()
    last = save_ckpt(tmp_path / "checkpoints" / "last.ckpt", 2)
    with pytest.raises(FileExistsError, match="pass resume=auto"):
        start_run(tmp_path, None, config)
    again = start_run(tmp_path, "auto", {**config, "resume": "auto", "trainer": {"max_steps": 8}})
    assert again.checkpoint == last and again.notes == []
    again.lock.release()  # (a failed start released its lock itself, or this would be busy)
    with pytest.raises(ResumeConfigError, match="seed: 0 -> 1"):
        start_run(tmp_path, "auto", {**config, "seed": 1})
    allowed = start_run(tmp_path, "auto", {**config, "seed": 1}, allow_changes=True)
    assert allowed.notes == ["resume: continuing with a changed key (+resume_allow_changes=true): seed: 0 -> 1"]
    allowed.lock.release()
    assert load_run_config(tmp_path) == config  # the record of the first start stays
    (tmp_path / "bad.ckpt").write_bytes(b"junk")
    with pytest.raises(ResumeCheckpointError, match=r"resume=.*bad.ckpt: .*bad.ckpt is not a torch checkpoint archive"):
        start_run(tmp_path, str(tmp_path / "bad.ckpt"), config)
    with pytest.raises(FileNotFoundError, match="resume=.*: no checkpoint at"):
        start_run(tmp_path, str(tmp_path / "nope.ckpt"), config)


def test_refused_start_puts_the_original_hydra_record_back(tmp_path: Path) -> None:
    from kd_lightning.infra.rundir import start_run

    hydra_dir = tmp_path / ".hydra"
    hydra_dir.mkdir()
    (hydra_dir / "config.yaml").write_text("seed: 0\n")
    start_run(tmp_path, None, {"seed": 0}).lock.release()
    save_ckpt(tmp_path / "checkpoints" / "last.ckpt", 2)
    (hydra_dir / "config.yaml").write_text("seed: 7\n")  # Hydra, for a start the guard refuses
    with pytest.raises(FileExistsError):
        start_run(tmp_path, None, {"seed": 7})
    assert (hydra_dir / "config.yaml").read_text() == "seed: 0\n"
    assert (hydra_dir / "config.resume-1.yaml").read_text() == "seed: 7\n"
    assert compare_for_resume({"seed": 0, "callbacks": {}}, {"seed": 0}) == []
