"""Exact resume on 2 processes: a run interrupted after 2 steps (mid-epoch) and resumed from its
checkpoint ends with the same student as the uninterrupted run, under DDP and under FSDP (sharded
checkpoint without the frozen teacher's weights)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_step_tokens import close, run_processes


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_process_run_resumed_mid_epoch_equals_uninterrupted(tmp_path: Path, strategy: str) -> None:
    result = run_processes(tmp_path, strategy, 2, batch_size=2, extra=("resume",))
    uninterrupted, resumed = result["params"], result["resumed_params"]
    assert uninterrupted.keys() == resumed.keys()
    worst = close(list(uninterrupted.values()), list(resumed.values()), 0.0)  # bitwise
    assert worst == 0.0
    checkpoint = tmp_path / "step2.ckpt"
    if strategy == "fsdp":  # sharded: a directory of shards, the frozen teacher's weights left out
        from torch.distributed.checkpoint import FileSystemReader

        stored = FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
        assert checkpoint.is_dir() and any(k.startswith("state_dict.student.") for k in stored)
        assert not any(k.startswith("state_dict.teachers.") for k in stored)
