"""A teacher-store part checks what it holds: a checksum per tensor, and ids within the vocabulary.

A part that safetensors can still parse may hold wrong bytes (a disk or copy error, a part overwritten
in place): before, such a part trained with exit 0 and no warning (counts overwritten with random
bytes), or ended in an indexing error deep in the loss (ids out of range). Every part written now
carries, in its safetensors metadata, the blake2b digest of each tensor's bytes (`checksum`); a part
is verified once, when the store opens it (`TeacherOutputStore.scan`), and a part that fails is
damaged: named, removed and recomputed (or, for `teacher=cached`, an error naming the file and the
fix), as a truncated part is. Parts written before checksums (store format 2 as released) stay
readable; their ids are still range-checked.

Cost: one sequential read of every part when a process first opens it (blake2b runs at about
1 GB/s on one core), instead of reading only the rows a run asks for.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
from torch import Tensor

CHECKSUM_KEY = "checksum"


def _digest(tensor: Tensor) -> str:
    data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
    return hashlib.blake2b(data.tobytes(), digest_size=16).hexdigest()


def part_checksum(tensors: dict[str, Tensor]) -> str:
    """The metadata value to store with a part: {tensor name: digest of its bytes} as JSON."""
    return json.dumps({name: _digest(t) for name, t in sorted(tensors.items())}, sort_keys=True)


def part_problem(handle: Any, metadata: dict[str, str], vocab_size: int) -> str | None:
    """Why an opened part (`safetensors.safe_open` handle) cannot be trusted, or None.

    Checks the digests when the part has them, and that every id lies in [0, vocab_size)."""
    names = list(handle.keys())
    stored = metadata.get(CHECKSUM_KEY)
    if stored is not None:
        try:
            expected = json.loads(stored)
        except ValueError:
            return "its checksum metadata is not readable"
        if sorted(expected) != sorted(names):
            return f"it holds tensors {sorted(names)} but its checksum covers {sorted(expected)}"
        for name in names:
            if _digest(handle.get_tensor(name)) != expected[name]:
                return f"tensor '{name}' does not match its checksum (the bytes changed after it was written)"
    if "ids" in names:
        ids = handle.get_tensor("ids")
        if ids.numel():
            ids = ids.to(torch.int64)
            low, high = int(ids.min()), int(ids.max())
            if low < 0 or high >= vocab_size:
                return f"it holds token ids in [{low}, {high}], outside the vocabulary [0, {vocab_size})"
    return None
