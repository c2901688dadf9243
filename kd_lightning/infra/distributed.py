"""Which process am I, and rank-aware seeding: the one place that answers both.

Before `torch.distributed` is initialised (e.g. while the config is checked, before Lightning
launches its processes) the launcher's environment variables are the only source; afterwards the
process group is. `RANK` is the global rank torchrun and Lightning set; `LOCAL_RANK` alone is only
trusted on a single node.
"""

from __future__ import annotations

import os

import torch

RANK_SEED_STRIDE = 1_000_003
"""Seed offset between ranks: a large prime, so per-rank streams never coincide for small seeds."""


def global_rank() -> int:
    """Global rank under torch.distributed, else the launcher's `RANK` (or `LOCAL_RANK`), else 0."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))


def is_global_zero() -> bool:
    return global_rank() == 0


def rank_seed(seed: int, rank: int | None = None) -> int:
    """The seed a rank uses for its own random draws (on-policy sampling, KA routing, weighting)."""
    return int(seed) + RANK_SEED_STRIDE * (global_rank() if rank is None else int(rank))


def rank_seeded_generator(seed: int, device: torch.device | str = "cpu", rank: int | None = None) -> torch.Generator:
    """A torch.Generator on `device` seeded with `rank_seed(seed)`: DDP ranks draw different (but
    reproducible) random numbers; Python's `random` is never used in a step."""
    generator = torch.Generator(device=device)
    generator.manual_seed(rank_seed(seed, rank))
    return generator


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return (torch.distributed.is_available() and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1)


def all_reduce_sums(values: list[float]) -> list[float]:
    """`values` summed elementwise over the default process group (themselves when not distributed),
    in float64 (exact for counts below 2**53). NCCL only reduces CUDA tensors, gloo CPU ones."""
    if not is_distributed():
        return [float(v) for v in values]
    device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
    total = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(total, op=torch.distributed.ReduceOp.SUM)
    return total.tolist()


__all__ = ["all_reduce_sums", "global_rank", "is_distributed", "is_global_zero", "rank_seed", "rank_seeded_generator"]
