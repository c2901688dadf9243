"""text_files and hf data modules: reading, splitting, prompt/response masking, fingerprints, errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # before datasets is imported: never the network

from kd_lightning.data import HFDataModule, TextFilesDataModule  # noqa: E402
from kd_lightning.data.packing import IGNORE_INDEX  # noqa: E402

PAIRS = [{"prompt": f"Q{i}: what is {i}+{i}?", "response": f"{2 * i}", "id": i} for i in range(10)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def write_docs(directory: Path, count: int = 20) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        (directory / f"doc{index:02d}.txt").write_text(f"Document number {index}. " * (index + 1))
    return directory


def word_tokenizer(path: Path) -> str:
    """A tiny word-level fast tokenizer saved to ``path`` (a non-byte tokenizer, offline)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<eos>", "<unk>", "Document", "number", "."] + [str(i) for i in range(20)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    special = {"pad_token": "<pad>", "eos_token": "<eos>", "unk_token": "<unk>"}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **special)
    tokenizer.save_pretrained(path)
    return str(path)


def all_batches(loader: torch.utils.data.DataLoader) -> list[dict[str, torch.Tensor]]:
    return list(loader)


def split_texts(module: TextFilesDataModule, split: str) -> bytes:
    ids = module.datasets[split].input_ids.flatten().tolist()
    return bytes(i - 3 for i in ids if i >= 3)


# --- text_files --------------------------------------------------------------------------------


def test_text_files_splits_by_document_deterministically(tmp_path: Path) -> None:
    docs = write_docs(tmp_path / "docs")
    module = TextFilesDataModule(paths=str(docs), seq_len=32, batch_size=4, seed=0)
    assert module.datasets is None and module.vocab_size == 259 and module.task == "causal_lm"
    module.setup()
    texts = {split: split_texts(module, split) for split in ("train", "val", "test")}
    for split in ("val", "test"):
        numbers = {int(part.split(b".")[0]) for part in texts[split].split(b"Document number ")[1:]}
        assert len(numbers) == 1  # one whole document: 5% of 20
        assert f"number {numbers.pop()}.".encode() not in texts["train"]
    batch = next(iter(module.train_dataloader()))
    assert batch["input_ids"].shape == (4, 32) and batch["labels"].dtype == torch.long
    assert int((module.datasets["train"].input_ids == 1).sum()) == 18  # EOS between the 18 train docs
    again = TextFilesDataModule(paths=[str(docs)], seq_len=32, batch_size=4, seed=0)
    again.setup()
    first, second = all_batches(module.train_dataloader()), all_batches(again.train_dataloader())
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(first, second, strict=True))
    other = TextFilesDataModule(paths=str(docs), seq_len=32, seed=3)
    other.setup()
    assert split_texts(other, "val") != texts["val"]
    assert module.fingerprint() == again.fingerprint() != other.fingerprint()


def test_text_files_prompt_response_masks(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    module = TextFilesDataModule(
        paths=str(data), prompt_field="prompt", response_field="response", seq_len=24, batch_size=8
    )
    module.setup()
    assert sum(len(module.datasets[s]) for s in ("train", "val", "test")) == len(PAIRS)
    batch = next(iter(module.val_dataloader()))
    row = {key: value[0] for key, value in batch.items()}
    prompt_length, length = int(row["prompt_lengths"]), int(row["attention_mask"].sum())
    prompt = bytes(i - 3 for i in row["input_ids"][:prompt_length].tolist()).decode()
    response = bytes(i - 3 for i in row["input_ids"][prompt_length : length - 1].tolist()).decode()
    index = int(prompt.split(":")[0][1:])
    assert prompt == PAIRS[index]["prompt"] and response == PAIRS[index]["response"]
    assert int(row["input_ids"][length - 1]) == 1  # EOS ends the response
    assert row["labels"][:prompt_length].tolist() == [IGNORE_INDEX] * prompt_length
    assert torch.equal(row["labels"][prompt_length:length], row["input_ids"][prompt_length:length])
    assert row["labels"][length:].tolist() == [IGNORE_INDEX] * (24 - length)
    assert row["attention_mask"].tolist() == [1] * length + [0] * (24 - length)
    assert row["input_ids"][length:].tolist() == [0] * (24 - length)  # right-padded with pad id


def test_text_files_globs_explicit_splits_and_fingerprint(tmp_path: Path) -> None:
    docs = write_docs(tmp_path / "docs", count=4)
    held_out = write_docs(tmp_path / "held", count=2)
    one = TextFilesDataModule(
        paths=str(docs / "doc00.txt"), val_paths=str(held_out / "doc00.txt"), test_paths=str(held_out / "doc01.txt")
    )
    one.setup()  # a single training document is fine when held-out files are given
    assert split_texts(one, "val") == (held_out / "doc00.txt").read_bytes()
    mixed = TextFilesDataModule(paths=str(docs), val_paths=str(held_out / "doc01.txt"), test_fraction=0.25)
    mixed.setup()  # explicit validation, test carved out of the 4 training documents
    assert split_texts(mixed, "val") == (held_out / "doc01.txt").read_bytes()
    assert int((mixed.datasets["test"].input_ids == 1).sum()) == 1  # one carved document
    assert int((mixed.datasets["train"].input_ids == 1).sum()) == 3
    globbed = TextFilesDataModule(paths=str(docs / "doc0[0-2].txt"), val_fraction=0.3, test_fraction=0.3)
    assert [Path(p).name for p in globbed.files["train"]] == ["doc00.txt", "doc01.txt", "doc02.txt"]
    base = globbed.fingerprint()

    def fingerprint(**overrides: object) -> str:
        args = {"paths": str(docs / "doc0[0-2].txt"), "val_fraction": 0.3, "test_fraction": 0.3, **overrides}
        return TextFilesDataModule(**args).fingerprint()

    assert fingerprint() == base
    assert fingerprint(text_field="body") != base
    assert fingerprint(test_fraction=0.2) != base
    (docs / "doc01.txt").write_text((docs / "doc01.txt").read_text().replace("1", "7"))
    assert fingerprint() != base


def test_text_files_with_a_word_tokenizer(tmp_path: Path) -> None:
    docs = write_docs(tmp_path / "docs", count=5)
    tokenizer = word_tokenizer(tmp_path / "tok")
    module = TextFilesDataModule(paths=str(docs), tokenizer=tokenizer, seq_len=8, batch_size=2)
    assert module.vocab_size == 26 and module.eos_token_id == 1
    module.setup()
    ids = module.datasets["train"].input_ids.flatten().tolist()
    assert set(ids) <= set(range(26)) and 2 not in ids  # every word known: no <unk>
    assert module.fingerprint() != TextFilesDataModule(paths=str(docs), seq_len=8).fingerprint()


def test_text_files_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"dataset\.paths: '.*nope\.txt' does not exist"):
        TextFilesDataModule(paths=str(tmp_path / "nope.txt"))
    with pytest.raises(FileNotFoundError, match=r"dataset\.paths: glob .* matches no file"):
        TextFilesDataModule(paths=str(tmp_path / "*.jsonl"))
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(ValueError, match=r"dataset\.paths: directory .*emptydir.* has no \.txt/\.jsonl files"):
        TextFilesDataModule(paths=str(tmp_path / "emptydir"))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match=r"dataset\.paths: file .*empty\.txt' is empty"):
        TextFilesDataModule(paths=str(tmp_path / "empty.txt"))
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00 not utf-8")
    with pytest.raises(ValueError, match=r"dataset\.paths: cannot read .*binary\.txt"):
        TextFilesDataModule(paths=str(tmp_path / "binary.txt"), val_fraction=0, test_fraction=0).setup()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n\n{"text": broken}\n')
    with pytest.raises(ValueError, match=r"dataset\.paths: .*bad\.jsonl:3 is not valid JSON"):
        TextFilesDataModule(paths=str(bad)).setup()
    rows = write_jsonl(tmp_path / "rows.jsonl", [{"text": "a"}, {"body": "b", "id": 2}, {"text": "c"}])
    missing = r"dataset\.text_field='text': no such field in .*rows\.jsonl:2; available keys: \['body', 'id'\]"
    with pytest.raises(ValueError, match=missing):
        TextFilesDataModule(paths=str(rows)).setup()
    pairs = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    missing = r"dataset\.response_field='answer': no such field .*available keys: \['id', 'prompt', 'response'\]"
    with pytest.raises(ValueError, match=missing):
        TextFilesDataModule(paths=str(pairs), prompt_field="prompt", response_field="answer").setup()
    with pytest.raises(ValueError, match=r"dataset\.text_field='id': in .*pairs\.jsonl:1 the value is int"):
        TextFilesDataModule(paths=str(pairs), text_field="id").setup()
    docs = write_docs(tmp_path / "two", count=2)
    with pytest.raises(ValueError, match=r"found 2 training records, need at least 3"):
        TextFilesDataModule(paths=str(docs)).setup()
    with pytest.raises(ValueError, match=r"dataset\.prompt_field='prompt': .*doc00\.txt' is a plain-text file"):
        TextFilesDataModule(paths=str(docs), prompt_field="prompt", val_fraction=0, test_fraction=0).setup()


def test_text_files_unreadable_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import kd_lightning.data.records as records

    locked = tmp_path / "locked.txt"
    locked.write_text("secret")

    def refuse(path: str, *args: object, **kwargs: object) -> None:  # tests run as root: chmod 0 is no barrier
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(records, "open", refuse, raising=False)
    with pytest.raises(ValueError, match=r"dataset\.paths: cannot read .*locked\.txt' \(Permission denied\)"):
        TextFilesDataModule(paths=str(locked), val_fraction=0, test_fraction=0).setup()


# --- hf ----------------------------------------------------------------------------------------


def test_hf_local_jsonl_dir_and_parquet_file(tmp_path: Path) -> None:
    import datasets

    folder = tmp_path / "jsonl"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", PAIRS)
    module = HFDataModule(path=str(folder), prompt_field="prompt", seq_len=24, cache_dir=str(tmp_path / "cache"))
    module.setup()
    assert sum(len(module.datasets[s]) for s in ("train", "val", "test")) == len(PAIRS)
    assert min(len(module.datasets[s]) for s in ("val", "test")) == 1
    parquet = tmp_path / "pairs.parquet"
    datasets.Dataset.from_list(PAIRS).to_parquet(str(parquet))
    from_parquet = HFDataModule(path=str(parquet), prompt_field="prompt", seq_len=24, cache_dir=str(tmp_path / "cache"))
    from_parquet.setup()
    for split in ("train", "val", "test"):  # same records, same seed -> same samples
        assert torch.equal(module.datasets[split].input_ids, from_parquet.datasets[split].input_ids)
    batch = next(iter(from_parquet.train_dataloader()))
    assert batch["prompt_lengths"].shape == (len(batch["input_ids"]),)
    assert bool((batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all())


def test_hf_save_to_disk_with_explicit_splits(tmp_path: Path) -> None:
    import datasets

    texts = [{"text": f"line {i} " * 5} for i in range(12)]
    dataset_dict = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(texts[:8]), "validation": datasets.Dataset.from_list(texts[8:10]),
         "test": datasets.Dataset.from_list(texts[10:])}
    )  # fmt: skip
    dataset_dict.save_to_disk(str(tmp_path / "saved"))
    module = HFDataModule(path=str(tmp_path / "saved"), val_split="validation", test_split="test", seq_len=16)
    module.setup()
    assert module.saved_to_disk
    assert b"line 8" in bytes(i - 3 for i in module.datasets["val"].input_ids.flatten().tolist() if i >= 3)
    assert module.datasets["train"].num_tokens() == sum(len(t["text"]) + 1 for t in texts[:8])  # nothing carved
    single = tmp_path / "single"
    datasets.Dataset.from_list(texts).save_to_disk(str(single))
    carved = HFDataModule(path=str(single), seq_len=16)
    carved.setup()
    assert carved.datasets["train"].num_tokens() == sum(len(t["text"]) + 1 for t in texts) - sum(
        carved.datasets[s].num_tokens() for s in ("val", "test")
    )
    missing = r"dataset\.val_split='dev': not in .*saved'; available splits: \['train', 'validation', 'test'\]"
    with pytest.raises(ValueError, match=missing):
        HFDataModule(path=str(tmp_path / "saved"), val_split="dev").setup()
    with pytest.raises(ValueError, match=r"dataset\.text_field='content': no such field in .*keys: \['text'\]"):
        HFDataModule(path=str(single), text_field="content").setup()
    assert HFDataModule(path=str(single)).fingerprint() != HFDataModule(path=str(tmp_path / "saved")).fingerprint()
    assert HFDataModule(path=str(single), seq_len=16).fingerprint() == carved.fingerprint()


def test_hf_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"dataset\.path='.*missing_dir': does not exist"):
        HFDataModule(path=str(tmp_path / "missing_dir"))
    with pytest.raises(FileNotFoundError, match=r"dataset\.path='data\.jsonl': does not exist"):
        HFDataModule(path="data.jsonl")
    data = write_jsonl(tmp_path / "rows.jsonl", [{"text": f"row {i}"} for i in range(5)])
    with pytest.raises(ValueError, match=r"dataset\.path=.*rows\.jsonl.*split='nope'.*load_dataset failed"):
        HFDataModule(path=str(data), split="nope", cache_dir=str(tmp_path / "cache")).setup()
    with pytest.raises(ValueError, match=r"dataset\.path='someorg/no-such-dataset'.*load_dataset failed"):
        HFDataModule(path="someorg/no-such-dataset", cache_dir=str(tmp_path / "cache")).setup()  # offline
