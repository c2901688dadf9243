"""Causal-LM data from your own text: local files (``text_files``) or Hugging Face datasets (``hf``).

Both read records (see ``records.py``) and share the encoding:
- plain text (``text_field``): documents joined with EOS and packed into ``seq_len`` windows;
- ``prompt_field`` + ``response_field``: one sample per pair, loss on the response only.
Splits that are not given explicitly are carved out of the training records, seeded.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from typing import Any

from typing_extensions import override

from kd_lightning.data.checks import check_training_text, learnable_token_counts
from kd_lightning.data.base import SPLITS, LMDataModule, check_fractions, hash_files, split_indices
from kd_lightning.data.dual import DualTextDataset
from kd_lightning.data.packing import LMDataset, encode_pairs, pack_documents
from kd_lightning.data.records import (
    Fields,
    Record,
    check_text,
    field_error,
    plain,
    read_records,
    resolve_paths,
)
from kd_lightning.data.tokenizer import encode_texts

# Single data files given as ``path`` are read with the matching packaged datasets builder.
HF_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}


class TextLMDataModule(LMDataModule):
    """Field options, seeded carving of missing splits and encoding, shared by text_files and hf."""

    def __init__(
        self,
        text_field: str,
        prompt_field: str | None,
        response_field: str,
        tokenizer: str | None,
        seq_len: int,
        val_fraction: float,
        test_fraction: float,
        batch_size: int,
        eval_batch_size: int | None,
        num_workers: int,
        seed: int,
        teacher_tokenizer: str | None = None,
    ) -> None:
        super().__init__(tokenizer, seq_len, batch_size, eval_batch_size, num_workers, seed, teacher_tokenizer)
        check_fractions(val_fraction, test_fraction)
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.fields: Fields = (
            [("text_field", text_field)]
            if prompt_field is None
            else [("prompt_field", prompt_field), ("response_field", response_field)]
        )

    def data_key(self) -> str:
        """The config key and value that name this data in messages (`dataset.paths=[...]`)."""
        raise NotImplementedError

    def _encode(self, records: Sequence[Record], split: str = "train") -> LMDataset | DualTextDataset:
        if self.teacher_tokenizer is not None:
            texts = [record[0] if len(self.fields) == 1 else (record[0], record[1]) for record in records]
            return DualTextDataset(texts, self.tokenizer, self.teacher_tokenizer, self.seq_len)
        columns = [encode_texts(self.tokenizer, [record[i] for record in records]) for i in range(len(self.fields))]
        if split == "train":  # the learnable field: the text, or the response in prompt/response mode
            (field_key, field), texts = self.fields[-1], [record[-1] for record in records]
            check_training_text(f"{self.data_key()} (dataset.{field_key}={field!r})",
                                learnable_token_counts(texts, columns[-1]), split=split)
        if len(columns) == 1:
            return pack_documents(columns[0], self.eos_token_id, self.pad_token_id, self.seq_len)
        return encode_pairs(columns[0], columns[1], self.eos_token_id, self.pad_token_id, self.seq_len)

    def _assemble(self, records: dict[str, list[Record] | None]) -> dict[str, LMDataset]:
        """Carve the splits that are ``None`` out of ``records["train"]``, then encode all three."""
        fractions = {split: getattr(self, f"{split}_fraction") for split in ("val", "test") if records[split] is None}
        train = records["train"]
        assert train is not None
        if fractions:
            indices = split_indices(len(train), fractions, self.seed, what="training records")
            records = {**records, **{split: [train[i] for i in order] for split, order in indices.items()}}
        return {split: self._encode(records[split] or [], split) for split in SPLITS}

    def _split_identity(self) -> dict[str, Any]:
        return {
            "fields": self.fields,
            "val_fraction": self.val_fraction,
            "test_fraction": self.test_fraction,
            **self._token_identity(),
        }


class TextFilesDataModule(TextLMDataModule):
    """Causal-LM samples from local ``.txt`` (one document each) and ``.jsonl`` (one record per line) files.

    Args:
        paths: files, directories (searched recursively for .txt/.jsonl) or globs.
        val_paths, test_paths: optional explicit held-out files; otherwise carved from ``paths``.
        text_field: JSONL key of the text (plain-text mode).
        prompt_field, response_field: when ``prompt_field`` is set, JSONL keys of prompt/response.
        tokenizer: ``None``/``"byte"`` for bytes, else a name or path for ``AutoTokenizer``.
        teacher_tokenizer: the teacher's tokenizer (name or path; ``teacher.tokenizer`` by default):
            when it tokenizes differently, every sample carries both tokenizations of its text.
        seq_len: tokens per sample (with a teacher tokenizer: on each side).
        val_fraction, test_fraction: share of records carved out (at least one each when > 0).
        batch_size, eval_batch_size, num_workers, seed: see ``BaseDataModule``.
    """

    def __init__(
        self,
        paths: str | Sequence[str],
        val_paths: str | Sequence[str] | None = None,
        test_paths: str | Sequence[str] | None = None,
        text_field: str = "text",
        prompt_field: str | None = None,
        response_field: str = "response",
        tokenizer: str | None = None,
        teacher_tokenizer: str | None = None,
        seq_len: int = 128,
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(
            text_field, prompt_field, response_field, tokenizer, seq_len,
            val_fraction, test_fraction, batch_size, eval_batch_size, num_workers, seed, teacher_tokenizer,
        )  # fmt: skip
        self.save_hyperparameters()
        given = {"train": paths, "val": val_paths, "test": test_paths}
        self.files: dict[str, list[str] | None] = {
            split: None if value is None else resolve_paths("paths" if split == "train" else f"{split}_paths", value)
            for split, value in given.items()
        }

    @override
    def data_key(self) -> str:
        return f"dataset.paths={list(self.hparams.paths) if not isinstance(self.hparams.paths, str) else self.hparams.paths}"

    @override
    def _load(self) -> dict[str, LMDataset]:
        # Everything is read and checked before anything is tokenized.
        records = {
            split: None
            if files is None
            else [
                record
                for path in files
                for record in read_records("paths" if split == "train" else f"{split}_paths", path, self.fields)
            ]
            for split, files in self.files.items()
        }
        return self._assemble(records)

    @override
    def _identity(self) -> dict[str, Any]:
        files = {split: None if paths is None else hash_files(paths) for split, paths in self.files.items()}
        return {"files": files, **self._split_identity()}


class HFDataModule(TextLMDataModule):
    """Causal-LM samples from a Hugging Face dataset: a ``load_dataset`` name, a local data
    file/directory, or a directory written by ``save_to_disk``.

    Args:
        path: dataset name, local data file or directory, or a ``save_to_disk`` directory.
        name: dataset configuration name.
        data_files: passed to ``load_dataset``.
        split: training split (slicing like ``"train[:10%]"`` works with ``load_dataset``).
        val_split, test_split: explicit held-out splits; otherwise carved from ``split``.
        cache_dir: datasets cache folder (``None``: the library default).
        Others as for ``TextFilesDataModule``.
    """

    def __init__(
        self,
        path: str,
        name: str | None = None,
        data_files: Any = None,
        split: str = "train",
        val_split: str | None = None,
        test_split: str | None = None,
        text_field: str = "text",
        prompt_field: str | None = None,
        response_field: str = "response",
        tokenizer: str | None = None,
        teacher_tokenizer: str | None = None,
        seq_len: int = 128,
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        cache_dir: str | None = None,
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(
            text_field, prompt_field, response_field, tokenizer, seq_len,
            val_fraction, test_fraction, batch_size, eval_batch_size, num_workers, seed, teacher_tokenizer,
        )  # fmt: skip
        self.save_hyperparameters()
        self.path = os.path.expanduser(str(path))
        looks_local = os.path.isabs(self.path) or self.path.startswith(".") or self.path.endswith(tuple(HF_BUILDERS))
        if looks_local and not os.path.exists(self.path):
            raise FileNotFoundError(f"dataset.path={path!r}: does not exist")
        self.name, self.data_files, self.cache_dir = name, plain(data_files), cache_dir
        self.splits = {"split": split, "val_split": val_split, "test_split": test_split}
        self.saved_to_disk = os.path.isdir(self.path) and any(
            os.path.exists(os.path.join(self.path, marker)) for marker in ("dataset_dict.json", "state.json")
        )

    @override
    def data_key(self) -> str:
        return f"dataset.path={self.hparams.path!r} (dataset.split={self.splits['split']!r})"

    def _load_split(self, key: str) -> Any:
        import datasets

        split = self.splits[key]
        if self.saved_to_disk:
            loaded = datasets.load_from_disk(self.path)
            if not isinstance(loaded, datasets.DatasetDict):
                if key != "split":
                    raise ValueError(f"dataset.{key}={split!r}: {self.path!r} holds one Dataset, not a DatasetDict")
                return loaded
            if split not in loaded:
                raise ValueError(f"dataset.{key}={split!r}: not in {self.path!r}; available splits: {list(loaded)}")
            return loaded[split]
        builder, data_files = self.path, self.data_files
        if os.path.isfile(self.path):
            builder, data_files = HF_BUILDERS[os.path.splitext(self.path)[1]], self.path
        try:
            return datasets.load_dataset(
                builder, self.name, data_files=data_files, split=split, cache_dir=self.cache_dir
            )
        except Exception as error:  # any loader failure is reported as a config error, chained
            reason = (str(error).strip().splitlines() or [""])[0]
            raise ValueError(
                f"dataset.path={self.path!r} (name={self.name!r}, {key}={split!r}): "
                f"load_dataset failed: {type(error).__name__}: {reason}"
            ) from error

    def _records(self, key: str) -> list[Record]:
        table = self._load_split(key)
        where = f"{self.path} {key}={self.splits[key]!r}"
        for _, field in self.fields:
            if field not in table.column_names:
                raise field_error(self.fields, field, where, table.column_names)
        columns = [table[field] for _, field in self.fields]
        for (_, field), column in zip(self.fields, columns):
            for row, value in enumerate(column):
                check_text(self.fields, field, value, f"{where} row {row}")
        if not columns[0]:
            raise ValueError(f"dataset.{key}={self.splits[key]!r}: split of {self.path!r} is empty")
        return list(zip(*columns))

    @override
    def _load(self) -> dict[str, LMDataset]:
        keys = {"train": "split", "val": "val_split", "test": "test_split"}
        return self._assemble(
            {split: None if self.splits[key] is None else self._records(key) for split, key in keys.items()}
        )

    def _local_files(self) -> list[str]:
        if os.path.isfile(self.path):
            return [self.path]
        if os.path.isdir(self.path):
            return sorted(
                os.path.join(parent, name)
                for parent, _, names in os.walk(self.path)
                for name in names
                if not name.startswith(".")
            )
        values = self.data_files.values() if isinstance(self.data_files, dict) else [self.data_files]
        patterns = [item for value in values for item in (value if isinstance(value, list) else [value])]
        matches = {match for item in patterns if isinstance(item, str) for match in glob.glob(os.path.expanduser(item))}
        return sorted(match for match in matches if os.path.isfile(match))

    @override
    def _identity(self) -> dict[str, Any]:
        local = self._local_files()
        # Local data is identified by content (moving it keeps the hash); a hub dataset by its name.
        source = {"files": hash_files(local)} if local else {"path": self.path, "data_files": self.data_files}
        return {**source, "name": self.name, **self.splits, **self._split_identity()}
