"""Atomic writes (`kd_lightning.infra.atomic`), checked loads (`kd_lightning.infra.safeload`), and the cache on top."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kd_lightning.infra.atomic import (atomic_directory, atomic_write_file, atomic_write_json, atomic_write_text,
                                 clean_stale_temporaries)
from kd_lightning.infra.model_cache import is_complete, write_atomically
from kd_lightning.infra.safeload import DamagedFileError, checkpoint_problem, safe_open_checked


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def age(path: Path, seconds: float = 7200) -> Path:
    old = time.time() - seconds
    os.utime(path, (old, old))
    return path


def test_atomic_write_replaces_whole_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "summary.json"
    atomic_write_json(target, {"b": 1, "a": [1, 2]})
    atomic_write_text(tmp_path / "note.txt", "first")
    atomic_write_text(tmp_path / "note.txt", "second")
    assert json.loads(target.read_text()) == {"a": [1, 2], "b": 1}
    assert (tmp_path / "note.txt").read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["note.txt", "sub"]


def test_atomic_write_file_hands_the_writer_a_hidden_temporary(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    seen: list[Path] = []

    def write(temporary: Path) -> None:
        seen.append(temporary)
        save_file({"w": torch.arange(4)}, str(temporary), metadata={"k": "v"})

    target = atomic_write_file(tmp_path / "part-1.safetensors", write)
    assert seen[0].parent == tmp_path and seen[0].name.startswith(f".part-1.safetensors.tmp-{os.getpid()}-")
    assert torch.equal(load_file(target)["w"], torch.arange(4))

    def half_written(temporary: Path) -> None:
        temporary.write_bytes(b"half")
        raise RuntimeError("writer died")

    with pytest.raises(RuntimeError, match="writer died"):
        atomic_write_file(target, half_written)
    assert torch.equal(load_file(target)["w"], torch.arange(4))  # the old file is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["part-1.safetensors"]


def test_atomic_write_failure_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "summary.json"
    atomic_write_json(target, {"ok": True})

    def full_disk(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        atomic_write_json(target, {"ok": False})
    assert json.loads(target.read_text()) == {"ok": True}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_atomic_directory_replaces_an_older_directory(tmp_path: Path) -> None:
    target = tmp_path / "student"
    with atomic_directory(target) as staging:
        (staging / "old.bin").write_text("old")
    with atomic_directory(target) as staging:
        assert not target.joinpath("new.bin").exists()  # nothing visible until the block ends
        (staging / "new.bin").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new.bin"]
    assert [p.name for p in tmp_path.iterdir()] == ["student"]


def test_atomic_directory_exception_leaves_target_untouched(tmp_path: Path) -> None:
    target = tmp_path / "student"
    with atomic_directory(target) as staging:
        (staging / "model.safetensors").write_text("good")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_directory(target) as staging:
            (staging / "model.safetensors").write_text("half")
            raise RuntimeError("disk full")
    assert (target / "model.safetensors").read_text() == "good"
    assert [p.name for p in tmp_path.iterdir()] == ["student"]


def test_clean_stale_temporaries_removes_only_dead_writers(tmp_path: Path) -> None:
    dead = tmp_path / f".teacher-abc.tmp-{dead_pid()}-x1"
    live = tmp_path / f".teacher-abc.tmp-{os.getpid()}-x2"
    other = tmp_path / ".unrelated"
    recent = tmp_path / f".teacher-abc.tmp-{dead_pid()}-x3"  # maybe another host's live writer
    for directory in (dead, live, other, recent):
        directory.mkdir()
    stale_file = tmp_path / f".summary.json.tmp-{dead_pid()}-y"
    stale_file.write_text("{")
    for path in (dead, live, other, stale_file):
        age(path)
    removed = clean_stale_temporaries(tmp_path)
    assert sorted(removed) == sorted([dead, stale_file])
    assert live.exists() and other.exists() and recent.exists()
    assert clean_stale_temporaries(tmp_path, min_age_seconds=0) == [recent]
    assert clean_stale_temporaries(tmp_path, prefix="other") == []


def test_cache_write_atomically_keeps_api_and_cleans_leftovers(tmp_path: Path) -> None:
    entry = tmp_path / "teachers" / "moe-1234"
    leftover = entry.parent / f".moe-1234.tmp-{dead_pid()}-z"
    leftover.mkdir(parents=True)
    age(leftover)
    write_atomically(entry, lambda d: (d / "model.safetensors").write_text("w"), {"seed": 0})
    assert is_complete(entry) and json.loads((entry / "kd_manifest.json").read_text()) == {"seed": 0}
    write_atomically(entry, lambda d: (d / "model.safetensors").write_text("other"), {"seed": 0})
    assert (entry / "model.safetensors").read_text() == "w"  # the first finished entry is kept
    assert sorted(p.name for p in entry.parent.iterdir()) == ["moe-1234"]


def test_damaged_safetensors_names_the_file_and_the_fix(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    good = tmp_path / "part-0.safetensors"
    save_file({"logp": torch.zeros(64)}, str(good))
    with safe_open_checked(good) as handle:
        assert list(handle.keys()) == ["logp"]
        assert torch.equal(handle.get_tensor("logp"), torch.zeros(64))
    truncated = tmp_path / "part-1.safetensors"
    truncated.write_bytes(good.read_bytes()[:-40])
    with pytest.raises(DamagedFileError, match=r"part-1\.safetensors is not a readable safetensors file .*"
                                               r"truncated or damaged; delete it; it will be recomputed"):
        with safe_open_checked(truncated):
            pass
    garbage = tmp_path / "shard-0.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(DamagedFileError, match="shard-0.safetensors.*re-run stage=cache_teacher"):
        with safe_open_checked(garbage, fix="delete the directory and re-run stage=cache_teacher"):
            pass
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        with safe_open_checked(tmp_path / "nope.safetensors"):
            pass


def test_checkpoint_problem_detects_truncated_garbage_and_unsafe(tmp_path: Path) -> None:
    import argparse

    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(256)}, "global_step": 3}, good)
    assert checkpoint_problem(good) is None
    (tmp_path / "trunc.ckpt").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (tmp_path / "garbage.ckpt").write_bytes(b"x" * 100)
    (tmp_path / "empty.ckpt").write_bytes(b"")
    torch.save({"state_dict": {}, "args": argparse.Namespace(a=1)}, tmp_path / "unsafe.ckpt")
    assert "not a torch checkpoint archive" in checkpoint_problem(tmp_path / "trunc.ckpt")
    assert "not a torch checkpoint archive" in checkpoint_problem(tmp_path / "garbage.ckpt")
    assert checkpoint_problem(tmp_path / "empty.ckpt") == "empty (0 bytes)"
    unsafe = checkpoint_problem(tmp_path / "unsafe.ckpt")
    assert "weights-only load refuses" in unsafe and "weights_only=False" not in unsafe
    assert checkpoint_problem(tmp_path / "missing.ckpt") == "missing"


def test_directory_set_aside_by_a_dead_writer_is_put_back(tmp_path: Path) -> None:
    aside = tmp_path / f".student.old-{dead_pid()}-q"
    aside.mkdir()
    (aside / "model.safetensors").write_text("old")
    orphan_new = tmp_path / f".student.tmp-{dead_pid()}-r"  # its replacement, never renamed in
    orphan_new.mkdir()
    age(orphan_new), age(aside)
    assert sorted(clean_stale_temporaries(tmp_path)) == sorted([aside, orphan_new])
    assert (tmp_path / "student" / "model.safetensors").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["student"]
