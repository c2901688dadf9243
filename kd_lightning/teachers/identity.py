"""What a teacher store is keyed by, and where it lives: built here once for every front-end.

`teacher_outputs.reuse` (online, `kd_lightning.teachers.teacher_outputs`), `stage=cache_teacher` and
`teacher=cached` (offline, `kd_lightning.teachers.teacher_cache`) all find a teacher's store with
`teacher_store_location`, so a sweep reads what `stage=cache_teacher` stored with the same encoding,
and the reverse.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kd_lightning.infra.model_cache import config_key
from kd_lightning.models import output_size
from kd_lightning.teachers.encodings import Encoding

FORMAT_VERSION = 2


@dataclass(frozen=True)
class StoreOptions:
    """Where teacher stores live and what, besides the teacher itself, decides their contents.

    Args:
        root: the folder of hashed store directories (`teacher_outputs.dir`, by default
            `<paths.cache_dir>/teacher_outputs`).
        encoding: how each position's distribution is written (`kd_lightning.teachers.encodings`).
        precision: the trainer's precision, which changes the teacher's numbers.
        accelerator: the trainer's accelerator (`cpu` keeps the teacher on the CPU), likewise.
    """

    root: str = "~/.cache/kd_lightning/teacher_outputs"
    encoding: Encoding = Encoding()
    precision: str = "32-true"
    accelerator: str = "cpu"


def weights_hash(model: nn.Module) -> str:
    """sha256[:16] of the teacher's parameters and buffers (names, shapes, dtypes, bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        data = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(data.shape)}:{data.dtype}\0".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()[:16]


def store_identity(*, weights: str, model_config: Any, precision: str, accelerator: str, vocab_size: int,
                   encoding: Encoding) -> dict[str, Any]:
    """Everything that changes the stored outputs (the store's key and manifest)."""
    return {"format_version": FORMAT_VERSION, "weights": weights, "config": model_config, "precision": precision,
            "accelerator": accelerator, "vocab_size": int(vocab_size), "encoding": encoding.identity()}


def store_directory(root: str | os.PathLike[str], name: str, identity: dict[str, Any]) -> Path:
    """`<root>/<name>-<hash of the identity>`."""
    return Path(os.path.expanduser(str(root))) / f"{name}-{config_key(identity)}"


def teacher_store_location(options: StoreOptions, name: str, teacher: nn.Module,
                           model_config: Any) -> tuple[Path, dict[str, Any]]:
    """(directory, identity) of teacher `name`'s store: the identity hashes the teacher's weights (a
    served teacher's `store_weights`: its model id), its
    resolved model config, `options`' precision, accelerator and encoding, and its vocabulary size;
    the directory is `<options.root>/<name>-<hash of the identity>`."""
    weights = getattr(teacher, "store_weights", None) or weights_hash(teacher)  # a served teacher: its model id
    identity = store_identity(weights=weights, model_config=model_config, precision=options.precision,
                              accelerator=options.accelerator, vocab_size=output_size(teacher),
                              encoding=options.encoding)
    return store_directory(options.root, name, identity), identity


__all__ = ["FORMAT_VERSION", "StoreOptions", "store_directory", "store_identity", "teacher_store_location",
           "weights_hash"]
