"""Held-out evaluation where the models are: on 2 processes each rank scores its part of the split and
the counts are reduced, giving the single-process figures."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch.utils.data import DataLoader

from kd_lightning.data.base import DictDataset
from kd_lightning.data.resumable import RankShareSampler
from kd_lightning.evaluate import evaluate
from tests.dist_check import varied_tokens
from tests.helpers import tiny_lm

ROWS = 7  # uneven shares: 4 and 3 rows


def score(rank: int, world: int, port: int, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        data = DictDataset(**varied_tokens(n=ROWS))
        loader = DataLoader(data, batch_size=2, sampler=RankShareSampler(data, world, rank))
        result = evaluate(tiny_lm(0), loader, "causal_lm", reference=tiny_lm(1))
        torch.save(result, Path(out) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.dist
def test_two_ranks_report_the_single_process_figures(tmp_path: Path) -> None:
    data = DictDataset(**varied_tokens(n=ROWS))
    single = evaluate(tiny_lm(0), DataLoader(data, batch_size=2), "causal_lm", reference=tiny_lm(1))
    mp.spawn(score, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        both = torch.load(tmp_path / f"rank{rank}.pt")
        assert both["count"] == single["count"]
        for key in ("loss", "accuracy", "teacher_agreement", "ece"):
            assert abs(both[key] - single[key]) < 1e-6, (key, both[key], single[key])
