"""The teacher store checks what it reads (issue #24): a checksum per part verified when it is opened,
ids range-checked; a damaged part is named, set aside and recomputed (or refused for teacher=cached).
Before, a part whose counts were overwritten with random bytes trained with exit 0 and no warning."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from kd_lightning.infra.safeload import DamagedFileError
from kd_lightning.teachers.encodings import Encoding
from kd_lightning.teachers.store import FORMAT_VERSION
from tests.test_teacher_store import keys, make_store, peaked_logits

VOCAB = 50
SAMPLE = Encoding("sample", k=8, num_draws=8)


def filled(directory: Path, rows: int = 4) -> Path:
    store = make_store(directory, VOCAB, SAMPLE)
    store.put(keys(rows), peaked_logits(rows, 6, VOCAB), 0.0)
    store.flush()
    (part,) = directory.glob("part-*.safetensors")
    return part


def overwrite_tensor(part: Path, name: str, data: bytes | None = None) -> None:
    """Overwrite a tensor's bytes in place (the header stays valid: safetensors still parses it)."""
    raw = bytearray(part.read_bytes())
    header = 8 + int.from_bytes(raw[:8], "little")
    start, end = json.loads(raw[8:header])[name]["data_offsets"]
    generator = torch.Generator().manual_seed(0)
    raw[header + start:header + end] = data or bytes(torch.randint(0, 256, (end - start,), generator=generator,
                                                                   dtype=torch.uint8).tolist())
    part.write_bytes(bytes(raw))


def test_parts_carry_a_checksum_and_a_whole_part_reads_back(tmp_path: Path) -> None:
    part = filled(tmp_path)
    with safe_open(str(part), framework="pt") as handle:
        assert set(json.loads(handle.metadata()["checksum"])) == {"keys", "ids", "counts"}
    assert len(make_store(tmp_path, VOCAB, SAMPLE)) == 4


def test_counts_overwritten_with_random_bytes_are_named_removed_and_recomputed(tmp_path: Path, caplog) -> None:
    part = filled(tmp_path)
    overwrite_tensor(part, "counts")
    with caplog.at_level(logging.WARNING, logger="kd_lightning"):
        store = make_store(tmp_path, VOCAB, SAMPLE)
    assert f"{part} is damaged: tensor 'counts' does not match its checksum" in caplog.text
    assert "it is removed and its rows are recomputed" in caplog.text
    assert not part.exists() and len(store) == 0 and store.stats["damaged_parts"] == 1
    assert store.missing(keys(4)) == keys(4)  # the rows are computed again


def test_teacher_cached_refuses_a_damaged_part_naming_it_and_the_fix(tmp_path: Path) -> None:
    part = filled(tmp_path)
    overwrite_tensor(part, "counts")
    with pytest.raises(DamagedFileError, match=rf"{part.name} is damaged: tensor 'counts' does not match.*re-run"):
        make_store(tmp_path, VOCAB, SAMPLE, damaged="error", damaged_fix="re-run stage=cache_teacher")
    assert part.exists()  # offline targets are not deleted behind the user's back


def test_ids_out_of_range_are_damaged_even_in_a_part_without_checksum(tmp_path: Path, caplog) -> None:
    """A part of the released format 2 (no checksum) is still read, and its ids are range-checked."""
    part = filled(tmp_path)
    with safe_open(str(part), framework="pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        meta = {k: v for k, v in handle.metadata().items() if k != "checksum"}
    save_file(tensors, str(part), metadata=meta)
    assert len(make_store(tmp_path, VOCAB, SAMPLE)) == 4  # old parts stay readable
    tensors["ids"][0, 0, 0] = VOCAB + 7
    save_file(tensors, str(part), metadata=meta)
    with caplog.at_level(logging.WARNING, logger="kd_lightning"):
        store = make_store(tmp_path, VOCAB, SAMPLE)
    assert f"it holds token ids in [0, {VOCAB + 7}], outside the vocabulary [0, {VOCAB})" in caplog.text
    assert len(store) == 0 and not part.exists()
    assert meta["format_version"] == str(FORMAT_VERSION)


def test_teacher_cached_run_with_overwritten_counts_stops_then_cache_teacher_recomputes(
        make_cfg, tmp_path: Path, cache_dir: Path) -> None:
    from kd_lightning.run.pipeline import run
    from tests.test_teacher_cache import DATA, SAMPLE_CACHE, cache_cfg, parts

    directory = tmp_path / "targets"
    run(cache_cfg(tmp_path / "build", cache_dir, "stage=cache_teacher", f"teacher_cache.dir={directory}"))
    rows = sum(len(p["keys"]) for p in parts(directory))
    copy = tmp_path / "copy"
    shutil.copytree(directory, copy)
    part = sorted(copy.glob("part-*.safetensors"))[0]
    overwrite_tensor(part, "counts")
    with pytest.raises(DamagedFileError, match=rf"{part.name} is damaged: tensor 'counts' does not match its "
                                               r"checksum.*re-run stage=cache_teacher"):
        run(make_cfg(*DATA, *SAMPLE_CACHE, "teacher=cached", "loss=sparse_kl", f"teacher_cache.dir={copy}",
                     "baseline=false", output_dir=tmp_path / "r"))
    run(cache_cfg(tmp_path / "again", cache_dir, "stage=cache_teacher", f"teacher_cache.dir={copy}"))
    assert not part.exists() and sum(len(p["keys"]) for p in parts(copy)) == rows
