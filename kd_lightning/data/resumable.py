"""A training DataLoader that resumes in the middle of an epoch exactly where it stopped, per rank.

Lightning saves the `state_dict()` of a stateful train loader in checkpoints and calls
`load_state_dict()` before iterating again. The order of epoch e is a permutation drawn from a
generator seeded with (seed, e), so it does not depend on how many epochs this process has seen;
under data parallelism every rank draws the same permutation and takes every `num_replicas`-th
sample from its `rank` on (padded to equal length, as `DistributedSampler` does). On resume the
batches the interrupted run already trained on are skipped on every rank. Each batch carries its
optimizer step's token count (`kd_lightning.data.step_tokens`).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from typing_extensions import override

from kd_lightning.data.step_tokens import stamp_step_tokens


class EpochSeededSampler(DistributedSampler):
    """Random order from `seed` and the epoch (`set_epoch`, called by Lightning every epoch), this
    rank's share of it. A `DistributedSampler`, so Lightning does not replace it under DDP/FSDP."""

    def __init__(self, dataset: Dataset, seed: int, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)
        self.skip = 0  # samples of this rank to skip once, on resume

    @override
    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(len(self.dataset), generator=generator)  # type: ignore[arg-type]
        if self.total_size > len(order):  # pad by repeating the start, so every rank has num_samples
            order = order.repeat(math.ceil(self.total_size / len(order)))[: self.total_size]
        mine = order[self.rank : self.total_size : self.num_replicas][self.skip :]
        self.skip = 0
        return iter(mine.tolist())


class RankShareSampler(DistributedSampler):
    """Every `num_replicas`-th sample from `rank` on, in order, without padding: held-out scoring where
    each rank scores its part of the split once and the summed counts are reduced."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self.num_samples = len(range(rank, len(dataset), num_replicas))  # type: ignore[arg-type]

    @override
    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, len(self.dataset), self.num_replicas))  # type: ignore[arg-type]


def read_ahead(batches: Iterator[Any], depth: int, observe: Callable[[Any], None]) -> Iterator[Any]:
    """`batches` unchanged, each shown to `observe` `depth` batches before it is yielded (a served
    teacher sends its requests then, so they are answered by the batch's step)."""
    waiting: deque[Any] = deque()
    for batch in batches:
        observe(batch)
        waiting.append(batch)
        if len(waiting) > depth:
            yield waiting.popleft()
    yield from waiting


class ResumableDataLoader(DataLoader):
    """`DataLoader` over an `EpochSeededSampler` whose state is (epoch, batches trained on).

    `progress()` returns that pair from the trainer (the loader itself cannot count: Lightning
    prefetches one batch ahead of training). `accumulate()` is the trainer's current
    `accumulate_grad_batches` and `count(batch)` a batch's counted tokens: each batch is stamped with
    its optimizer step's count over all ranks. `ahead`: (depth, observe) shows each batch to
    `observe` depth batches before it is trained on (`read_ahead`)."""

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, progress: Callable[[], tuple[int, int]], *,
                 count: Callable[[dict[str, Any]], int], accumulate: Callable[[], int] = lambda: 1,
                 num_replicas: int = 1, rank: int = 0, ahead: tuple[int, Callable[[Any], None]] | None = None,
                 **kwargs: Any) -> None:
        self.resumable_sampler = EpochSeededSampler(dataset, seed, num_replicas, rank)
        super().__init__(dataset, batch_size=batch_size, sampler=self.resumable_sampler, **kwargs)
        self.progress, self.count, self.accumulate = progress, count, accumulate
        self.skipped_batches = 0
        self.ahead = ahead

    @override
    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        done, self.skipped_batches = self.skipped_batches, 0
        batches = stamp_step_tokens(super().__iter__(), self.accumulate(), self.count, already_done=done)
        return batches if self.ahead is None else read_ahead(batches, *self.ahead)

    def state_dict(self) -> dict[str, int]:
        epoch, batches = self.progress()
        return {"epoch": int(epoch), "batches": int(batches)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.resumable_sampler.set_epoch(state["epoch"])
        self.resumable_sampler.skip = state["batches"] * int(self.batch_size or 1)
        self.skipped_batches = state["batches"]
