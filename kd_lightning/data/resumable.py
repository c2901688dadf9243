"""A training DataLoader that resumes in the middle of an epoch exactly where it stopped.

Lightning saves the `state_dict()` of a stateful train loader in checkpoints and calls
`load_state_dict()` before iterating again. The order of epoch e is a permutation drawn from a
generator seeded with (seed, e), so it does not depend on how many epochs this process has seen;
on resume the batches the interrupted run already trained on are skipped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class EpochSeededSampler(Sampler[int]):
    """Random order from `seed` and the epoch (`set_epoch`, called by Lightning every epoch)."""

    def __init__(self, num_samples: int, seed: int) -> None:
        self.num_samples = num_samples
        self.seed = seed
        self.epoch = 0
        self.skip = 0  # samples to skip once, on resume

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.num_samples, generator=generator)[self.skip:]
        self.skip = 0
        return iter(order.tolist())

    def __len__(self) -> int:
        return self.num_samples


class ResumableDataLoader(DataLoader):
    """`DataLoader` over an `EpochSeededSampler` whose state is (epoch, batches trained on).

    `progress()` returns that pair from the trainer (the loader itself cannot count: Lightning
    prefetches one batch ahead of training)."""

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, progress: Callable[[], tuple[int, int]],
                 **kwargs: Any) -> None:
        self.resumable_sampler = EpochSeededSampler(len(dataset), seed)  # type: ignore[arg-type]
        super().__init__(dataset, batch_size=batch_size, sampler=self.resumable_sampler, **kwargs)
        self.progress = progress

    def state_dict(self) -> dict[str, int]:
        epoch, batches = self.progress()
        return {"epoch": int(epoch), "batches": int(batches)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.resumable_sampler.set_epoch(state["epoch"])
        self.resumable_sampler.skip = state["batches"] * int(self.batch_size or 1)
