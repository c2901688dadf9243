"""What every data module shares: seeded splits, dataloaders, argument checks and fingerprints.

Contract with the training module (kd_lightning/module.py relies on it):
- right after ``__init__`` (without reading the corpus): ``task`` ("causal_lm" or "classification");
  for LM ``vocab_size``, ``tokenizer``, ``seq_len``; for classification ``num_features``,
  ``num_classes`` and ``tokenizer = None``;
- ``setup()`` loads and splits once (idempotent, seeded by ``seed``);
- ``fingerprint()`` is a short hash of the data identity, used as a teacher-cache key;
- for LM, ``dual`` / ``teacher_tokenizer`` / ``teacher_data()``: whether batches also carry the
  teacher's own tokenization (``kd_lightning.data.dual``), and the same data in that tokenization.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

from kd_lightning.data.dual import DualCollator
from kd_lightning.data.resumable import RankShareSampler, ResumableDataLoader
from kd_lightning.data.tokenizer import eos_id, load_tokenizer, pad_id, teacher_side_tokenizer, tokenizer_identity
from kd_lightning.tasks import task_named

SPLITS = ("train", "val", "test")


class DictDataset(Dataset):
    """Rows of equally long tensors, returned as ``{name: tensor[i]}`` (default collate stacks them)."""

    def __init__(self, **tensors: torch.Tensor) -> None:
        lengths = {len(tensor) for tensor in tensors.values()}
        if len(lengths) != 1:
            raise ValueError(f"DictDataset: tensors of different lengths {sorted(lengths)}")
        self.tensors = tensors

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    @override
    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {name: tensor[index] for name, tensor in self.tensors.items()}


def check_positive(key: str, value: Any) -> None:
    """A clear error unless ``value`` is a positive integer; ``key`` is the config key."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"dataset.{key}={value!r}: must be a positive integer")


def check_fractions(val_fraction: float, test_fraction: float) -> None:
    """Both fractions in [0, 1) and leaving something to train on."""
    for key, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= float(value) < 1.0:
            raise ValueError(f"dataset.{key}={value!r}: must be in [0, 1)")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(
            f"dataset.val_fraction={val_fraction!r} + dataset.test_fraction={test_fraction!r}: "
            "must sum to less than 1"
        )


def split_indices(
    num_items: int, fractions: dict[str, float], seed: int, what: str = "documents"
) -> dict[str, list[int]]:
    """A seeded random split of ``range(num_items)`` into ``train`` plus the splits in ``fractions``.

    Each split with a positive fraction gets ``round(fraction * num_items)`` items and at least
    one; the order inside each split is the random order (so caps take a random subset).
    """
    carved = {name: fraction for name, fraction in fractions.items() if fraction > 0}
    if num_items < len(carved) + 1:
        raise ValueError(
            f"dataset: found {num_items} {what}, need at least {len(carved) + 1} to split into "
            f"train + {' + '.join(carved)} (fractions {carved}); add data or give explicit splits"
        )
    order = torch.randperm(num_items, generator=torch.Generator().manual_seed(seed)).tolist()
    splits: dict[str, list[int]] = {name: [] for name in fractions}
    start = 0
    for name, fraction in carved.items():
        count = min(max(1, round(fraction * num_items)), num_items - start - 1)
        splits[name] = order[start : start + count]
        start += count
    splits["train"] = order[start:]
    return splits


def hash_files(paths: Sequence[str]) -> str:
    """sha256 of the files' names (relative to their common folder), sizes and contents."""
    digest = hashlib.sha256()
    if not paths:
        return digest.hexdigest()
    root = os.path.commonpath([os.path.dirname(os.path.abspath(path)) for path in paths])
    for path in paths:
        digest.update(os.path.relpath(os.path.abspath(path), root).encode("utf-8") + b"\0")
        digest.update(str(os.path.getsize(path)).encode("ascii") + b"\0")
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def fingerprint_of(identity: dict[str, Any]) -> str:
    """First 16 hex digits of the sha256 of ``identity`` serialised as sorted JSON."""
    text = json.dumps(identity, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


class BaseDataModule(L.LightningDataModule):
    """Seeded splits held in ``self.datasets``; subclasses implement ``_load`` and ``_identity``."""

    task: str
    collate_fn: Callable[[list[Any]], Any] | None = None  # None: torch's default (stack equal shapes)
    ahead: tuple[int, Callable[[Any], None]] | None = None  # `read_ahead`

    def __init__(
        self, batch_size: int, eval_batch_size: int | None, num_workers: int, seed: int
    ) -> None:
        super().__init__()
        check_positive("batch_size", batch_size)
        if eval_batch_size is not None:
            check_positive("eval_batch_size", eval_batch_size)
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"dataset.num_workers={num_workers!r}: must be a non-negative integer")
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size if eval_batch_size is not None else batch_size
        self.num_workers = num_workers
        self.seed = int(seed)
        self.datasets: dict[str, Dataset] | None = None
        self._fingerprint: str | None = None

    def _load(self) -> dict[str, Dataset]:
        """Read, split and encode the data: ``{"train": ..., "val": ..., "test": ...}``."""
        raise NotImplementedError

    def _identity(self) -> dict[str, Any]:
        """Everything that decides the samples (data content, tokenizer, split params, seed)."""
        raise NotImplementedError

    @override
    def setup(self, stage: str | None = None) -> None:
        if self.datasets is None:
            self.datasets = self._load()

    def fingerprint(self) -> str:
        """Short stable hash (sha256[:16]) of the data identity; computed once."""
        if self._fingerprint is None:
            self._fingerprint = fingerprint_of({"class": type(self).__name__, **self._identity()})
        return self._fingerprint

    def _dataset(self, split: str) -> Dataset:
        self.setup()
        assert self.datasets is not None
        return self.datasets[split]

    def _loader(self, split: str, batch_size: int, generator: torch.Generator | None) -> DataLoader:
        return DataLoader(
            self._dataset(split),
            batch_size=batch_size,
            shuffle=generator is not None,
            generator=generator,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=self.collate_fn,
        )

    @override
    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        if trainer is None:  # outside a Trainer
            return self._loader("train", self.batch_size, torch.Generator().manual_seed(self.seed))

        def progress() -> tuple[int, int]:
            return trainer.current_epoch, trainer.fit_loop.epoch_loop.batch_progress.current.processed

        task = task_named(self.task)
        # The data-parallel share of this rank (under DDP/FSDP Lightning keeps this sampler).
        return ResumableDataLoader(self._dataset("train"), self.batch_size, self.seed, progress,
                                   count=lambda batch: int(task.mask(task.labels(batch)).sum()),
                                   accumulate=lambda: int(trainer.accumulate_grad_batches),
                                   num_replicas=trainer.world_size, rank=trainer.global_rank,
                                   num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                                   collate_fn=self.collate_fn, ahead=self.ahead)

    def read_ahead(self, depth: int, observe: Callable[[Any], None]) -> None:
        """Show every training batch to `observe` `depth` batches before it is trained on (a served
        teacher's prefetch, `kd_lightning.teachers.served`)."""
        self.ahead = (int(depth), observe)

    @override
    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.eval_batch_size, None)

    @override
    def test_dataloader(self) -> DataLoader:
        trainer = self.trainer
        if trainer is None or trainer.world_size == 1:
            return self._loader("test", self.eval_batch_size, None)
        # each rank scores its own part of the held-out split (kd_lightning.evaluate reduces the sums)
        dataset = self._dataset("test")
        return DataLoader(dataset, batch_size=self.eval_batch_size, num_workers=self.num_workers,
                          sampler=RankShareSampler(dataset, trainer.world_size, trainer.global_rank),
                          collate_fn=self.collate_fn)


class LMDataModule(BaseDataModule):
    """A causal-LM data module: a tokenizer, windows of ``seq_len`` tokens, ``vocab_size``.

    With a ``teacher_tokenizer`` that tokenizes differently from ``tokenizer`` the module is *dual*
    (``self.teacher_tokenizer`` set): every sample carries both tokenizations of the same text
    (``kd_lightning.data.dual``) and ``teacher_data()`` is the same data in the teacher's tokens.
    """

    task = "causal_lm"

    def __init__(
        self,
        tokenizer: Any,
        seq_len: int,
        batch_size: int,
        eval_batch_size: int | None,
        num_workers: int,
        seed: int,
        teacher_tokenizer: Any = None,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, seed)
        check_positive("seq_len", seq_len)
        self.seq_len = seq_len
        self.tokenizer = load_tokenizer(tokenizer) if tokenizer is None or isinstance(tokenizer, str) else tokenizer
        self.teacher_tokenizer = teacher_side_tokenizer(teacher_tokenizer, self.tokenizer)
        if self.teacher_tokenizer is not None:
            self.collate_fn = DualCollator.for_tokenizers(self.tokenizer, self.teacher_tokenizer)
        self._teacher_data: LMDataModule | None = None
        # len() counts added special tokens; tokenizer.vocab_size does not (256 for bytes).
        self.vocab_size = len(self.tokenizer)
        self.eos_token_id = eos_id(self.tokenizer)
        self.pad_token_id = pad_id(self.tokenizer)

    def _token_identity(self) -> dict[str, Any]:
        identity = {"tokenizer": tokenizer_identity(self.tokenizer), "seq_len": self.seq_len, "seed": self.seed}
        if self.teacher_tokenizer is not None:
            identity["teacher_tokenizer"] = tokenizer_identity(self.teacher_tokenizer)
        return identity

    @property
    def dual(self) -> bool:
        """Whether batches carry the teacher's own tokenization (``teacher_input_ids`` ...)."""
        return self.teacher_tokenizer is not None

    def teacher_data(self) -> LMDataModule:
        """The same corpus, split and windows settings in the teacher's tokenization (single), for
        pre-training a teacher kd-lightning trains itself; ``self`` when the module is not dual."""
        if self.teacher_tokenizer is None:
            return self
        if self._teacher_data is None:
            # The teacher's tokenizer as configured (a path, "byte", "bpe:<size>"), from the saved arguments.
            args = {**self.hparams, "tokenizer": self.hparams["teacher_tokenizer"], "teacher_tokenizer": None}
            self._teacher_data = type(self)(**args)
        return self._teacher_data
