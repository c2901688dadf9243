"""Files others can read (issue #24): everything written atomically gets the mode a plain write
would give it (0666 / 0777 less the umask), not `tempfile`'s private 0600 / 0700."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from kd_lightning.infra.atomic import atomic_directory, atomic_write_json, atomic_write_text, current_umask
from kd_lightning.infra.model_cache import write_atomically


@pytest.fixture(params=[0o022, 0o002], ids=["umask022", "umask002"])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    previous = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_current_umask_reads_without_changing(umask: int) -> None:
    assert current_umask() == umask
    assert current_umask() == umask


def test_atomic_files_and_directories_get_the_plain_mode(tmp_path: Path, umask: int) -> None:
    plain_file, plain_dir = tmp_path / "plain.txt", tmp_path / "plain_dir"
    plain_file.write_text("x")
    plain_dir.mkdir()
    assert mode(atomic_write_text(tmp_path / "a.txt", "x")) == mode(plain_file) == 0o666 & ~umask
    assert mode(atomic_write_json(tmp_path / "a.json", {"a": 1})) == 0o666 & ~umask
    with atomic_directory(tmp_path / "student") as staging:
        (staging / "config.json").write_text("{}")
    assert mode(tmp_path / "student") == mode(plain_dir) == 0o777 & ~umask
    assert mode(tmp_path / "student" / "config.json") == 0o666 & ~umask
    entry = write_atomically(tmp_path / "cache" / "teacher-abc", lambda d: (d / "model.safetensors").write_bytes(b"x"),
                             {"kind": "teacher"})
    assert mode(entry) == 0o777 & ~umask and mode(entry / "kd_manifest.json") == 0o666 & ~umask


def test_a_real_run_writes_files_the_group_can_read(make_cfg, tmp_path: Path) -> None:
    """umask 002 (a team's shared directory): every file and directory of the run and of its cache
    (student/, summary.json, the run record, the cached teacher) is group-readable and -writable."""
    from kd_lightning.run.pipeline import run

    previous = os.umask(0o002)
    try:
        cfg = make_cfg("baseline=false", output_dir=tmp_path / "run")
        cfg.paths.cache_dir = str(tmp_path / "cache")
        run(cfg)
    finally:
        os.umask(previous)
    out = tmp_path / "run"
    written = [out / "student", out / "summary.json", out / "run_config.yaml", *(out / "student").iterdir(),
               *(tmp_path / "cache").rglob("*")]
    private = [f"{p} {oct(mode(p))}" for p in written if not p.name.startswith(".")
               and mode(p) & 0o060 != 0o060]
    assert not private, private


def test_store_parts_and_manifest_get_the_plain_mode(tmp_path: Path, umask: int) -> None:
    from kd_lightning.teachers.encodings import Encoding
    from tests.test_teacher_store import keys, make_store, peaked_logits

    store = make_store(tmp_path / "store", 50, Encoding("topk", k=4))
    store.put(keys(2), peaked_logits(2, 4, 50), 0.0)
    store.flush()
    files = sorted((tmp_path / "store").iterdir())
    assert any(p.name.startswith("part-") for p in files)
    assert {p.name: mode(p) for p in files} == {p.name: 0o666 & ~umask for p in files}
