"""Data modules: byte tokenizer, packing rules, the embedded stdlib corpus, digits, dataset configs."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from kd_lightning.data import DigitsDataModule, StdlibDataModule, byte_tokenizer, encode_bytes, load_tokenizer
from kd_lightning.data.packing import IGNORE_INDEX, encode_pairs, pack_documents
from kd_lightning.data.stdlib import corpus_files

CONF = Path(__file__).resolve().parents[1] / "conf" / "dataset"
SAMPLE = "héllo wörld — 𝄞 € ü\n\tdef f(x):\n    return x  # ok"


def batches_equal(first: list[dict[str, torch.Tensor]], second: list[dict[str, torch.Tensor]]) -> bool:
    return len(first) == len(second) and all(
        a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a) for a, b in zip(first, second)
    )


def write_corpus(root: Path, count: int = 12) -> Path:
    """A small stdlib-like tree with files that must be excluded."""
    for index in range(count):
        package = root / f"pkg{index % 3}"
        package.mkdir(parents=True, exist_ok=True)
        (package / f"mod{index}.py").write_text(f"# module {index}\n" + f"value_{index} = {index}\n" * (5 + index))
    (root / "pkg0" / "__init__.py").write_text("")  # empty: skipped
    for excluded in ("test", "tests", "__pycache__", "site-packages", "idlelib/idle_test"):
        (root / excluded).mkdir(parents=True, exist_ok=True)
        (root / excluded / "excluded.py").write_text("EXCLUDED = True\n")
    (root / "notes.txt").write_text("plain text is included when a root is given\n")
    return root


@pytest.fixture(scope="module")
def stdlib() -> StdlibDataModule:
    module = StdlibDataModule()
    start = time.perf_counter()
    module.setup()
    module.setup_seconds = time.perf_counter() - start
    return module


# --- tokenizer ---------------------------------------------------------------------------------


def test_encode_bytes_equals_byt5_ids() -> None:
    tokenizer = byte_tokenizer()
    expected = tokenizer(SAMPLE, add_special_tokens=False)["input_ids"]
    assert encode_bytes(SAMPLE.encode("utf-8")).tolist() == expected
    assert len(expected) > len(SAMPLE)  # multi-byte characters really were in the sample
    assert tokenizer(SAMPLE)["input_ids"][-1] == tokenizer.eos_token_id == 1
    assert (len(tokenizer), tokenizer.pad_token_id, tokenizer.unk_token_id) == (259, 0, 2)


def test_byte_tokenizer_round_trips_through_save_pretrained(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    byte_tokenizer().save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert len(reloaded) == 259
    assert reloaded(SAMPLE, add_special_tokens=False)["input_ids"] == encode_bytes(SAMPLE.encode()).tolist()


def test_load_tokenizer_byte_and_missing_path(tmp_path: Path) -> None:
    assert len(load_tokenizer(None)) == len(load_tokenizer("byte")) == 259
    with pytest.raises(FileNotFoundError, match=r"dataset\.tokenizer=.*does not exist"):
        load_tokenizer(str(tmp_path / "missing"))


# --- packing rules -----------------------------------------------------------------------------


def test_pack_documents_joins_with_eos_and_masks_the_padded_tail() -> None:
    documents = [np.arange(10, 15), np.arange(20, 23)]  # 5 + 1 + 3 + 1 = 10 tokens
    dataset = pack_documents(documents, eos_id=1, pad_id=0, seq_len=4)
    assert len(dataset) == 3
    rows = [dataset[i] for i in range(3)]
    stream = torch.cat([row["input_ids"] for row in rows]).tolist()
    assert stream == [10, 11, 12, 13, 14, 1, 20, 21, 22, 1, 0, 0]
    assert rows[0]["labels"].tolist() == rows[0]["input_ids"].tolist()  # unshifted
    assert rows[0]["attention_mask"].tolist() == [1, 1, 1, 1]
    assert rows[2]["attention_mask"].tolist() == [1, 1, 0, 0]
    assert rows[2]["labels"].tolist() == [22, 1, IGNORE_INDEX, IGNORE_INDEX]
    assert all(row["input_ids"].dtype == torch.long and int(row["prompt_lengths"]) == 0 for row in rows)
    capped = pack_documents(documents, eos_id=1, pad_id=0, seq_len=4, max_tokens=8)
    assert capped.num_tokens() == 8 and len(capped) == 2


@pytest.mark.parametrize(
    ("prompt_len", "response_len", "kept_prompt", "kept_response"),
    [
        (3, 2, 3, 3),  # fits: prompt + response + EOS
        (20, 2, 5, 3),  # long prompt: cut from the left, response + EOS kept
        (3, 20, 3, 5),  # long response: prompt kept, response cut at the end
        (20, 20, 4, 4),  # both long: response keeps seq_len // 2
    ],
)
def test_encode_pairs_truncation_and_masks(
    prompt_len: int, response_len: int, kept_prompt: int, kept_response: int
) -> None:
    seq_len = 8
    prompt, response = np.arange(100, 100 + prompt_len), np.arange(200, 200 + response_len)
    row = encode_pairs([prompt], [response], eos_id=1, pad_id=0, seq_len=seq_len)[0]
    target = np.append(response, 1)[:kept_response].tolist()
    assert row["input_ids"][:kept_prompt].tolist() == prompt[prompt_len - kept_prompt :].tolist()
    assert row["input_ids"][kept_prompt : kept_prompt + kept_response].tolist() == target
    length = kept_prompt + kept_response
    assert row["labels"].tolist() == [IGNORE_INDEX] * kept_prompt + target + [IGNORE_INDEX] * (seq_len - length)
    assert row["attention_mask"].tolist() == [1] * length + [0] * (seq_len - length)
    assert row["input_ids"][length:].tolist() == [0] * (seq_len - length)
    assert int(row["prompt_lengths"]) == kept_prompt


# --- stdlib ------------------------------------------------------------------------------------


def test_stdlib_attributes_before_setup_and_batches(stdlib: StdlibDataModule) -> None:
    fresh = StdlibDataModule(seq_len=64)
    assert fresh.datasets is None  # nothing read yet
    assert (fresh.task, fresh.vocab_size, fresh.seq_len, len(fresh.tokenizer)) == ("causal_lm", 259, 64, 259)
    assert stdlib.setup_seconds < 2.0
    excluded = [f"{os.sep}{name}{os.sep}" for name in ("test", "tests", "idle_test")]
    assert not any(part in path for path in stdlib.files for part in excluded)
    assert all(path.endswith(".py") for path in stdlib.files)
    assert stdlib.datasets["train"].num_tokens() == 4_000_000
    assert len(stdlib.datasets["val"]) == len(stdlib.datasets["test"]) == 131_072 // 128
    batch = next(iter(stdlib.train_dataloader()))
    for key in ("input_ids", "attention_mask", "labels"):
        assert batch[key].shape == (16, 128) and batch[key].dtype == torch.long
    assert torch.equal(batch["labels"], batch["input_ids"])
    assert bool((batch["attention_mask"] == 1).all())
    assert int(batch["input_ids"].max()) < 259
    eval_batch = next(iter(stdlib.val_dataloader()))
    assert torch.equal(eval_batch["input_ids"], stdlib.datasets["val"].input_ids[:16].long())  # not shuffled


def test_stdlib_split_is_by_file_without_overlap(stdlib: StdlibDataModule) -> None:
    splits = stdlib._split_files()
    sets = {name: set(files) for name, files in splits.items()}
    assert not (sets["train"] & sets["val"]) and not (sets["train"] & sets["test"]) and not (sets["val"] & sets["test"])
    assert set().union(*sets.values()) == set(stdlib.files)
    assert len(sets["val"]) == round(0.05 * len(stdlib.files))
    # Random by file: validation files come from many packages, not one directory.
    assert len({os.path.dirname(path) for path in splits["val"]}) > 3


def test_stdlib_root_excludes_tests_and_is_deterministic(tmp_path: Path) -> None:
    root = write_corpus(tmp_path / "corpus")
    module = StdlibDataModule(root=str(root), seq_len=16, batch_size=4, val_fraction=0.2, test_fraction=0.2)
    names = {os.path.relpath(path, root) for path in module.files}
    assert "notes.txt" in names and not any("excluded" in name for name in names)
    assert os.path.join("pkg0", "__init__.py") not in names
    again = StdlibDataModule(root=str(root), seq_len=16, batch_size=4, val_fraction=0.2, test_fraction=0.2)
    for dm in (module, again):
        dm.setup()
    assert module._split_files() == again._split_files()
    assert batches_equal(list(module.train_dataloader()), list(again.train_dataloader()))
    assert not batches_equal(list(module.train_dataloader()), list(module.val_dataloader()))
    other_seed = StdlibDataModule(root=str(root), seq_len=16, val_fraction=0.2, test_fraction=0.2, seed=1)
    assert other_seed._split_files()["val"] != module._split_files()["val"]


def test_stdlib_fingerprint_stable_and_sensitive(tmp_path: Path) -> None:
    root = write_corpus(tmp_path / "corpus")
    base = StdlibDataModule(root=str(root)).fingerprint()
    assert len(base) == 16 and int(base, 16) >= 0
    assert StdlibDataModule(root=str(root)).fingerprint() == base
    copy = shutil.copytree(root, tmp_path / "moved")
    assert StdlibDataModule(root=str(copy)).fingerprint() == base  # content identity, not location
    changes = [{"seed": 1}, {"seq_len": 64}, {"val_fraction": 0.1}, {"max_train_tokens": 1000}]
    changes.append({"max_eval_tokens": 512})
    prints = {StdlibDataModule(root=str(root), **change).fingerprint() for change in changes}
    assert len(prints) == len(changes) and base not in prints
    target = copy / "pkg1" / "mod1.py"
    text = target.read_text()
    target.write_text(text.replace("value_1", "value_9"))  # same size, other content
    assert StdlibDataModule(root=str(copy)).fingerprint() != base


def test_stdlib_errors_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"dataset\.root=.*missing.*does not exist"):
        StdlibDataModule(root=str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"dataset\.root=.*no non-empty \.py/\.txt files"):
        StdlibDataModule(root=str(tmp_path / "empty"))
    (tmp_path / "two").mkdir()
    for name in ("a.py", "b.py"):
        (tmp_path / "two" / name).write_text("x = 1\n")
    with pytest.raises(ValueError, match=r"found 2 files.*need at least 3"):
        StdlibDataModule(root=str(tmp_path / "two")).setup()
    with pytest.raises(ValueError, match=r"dataset\.seq_len=0: must be a positive integer"):
        StdlibDataModule(seq_len=0)
    with pytest.raises(ValueError, match=r"dataset\.val_fraction=0\.6 \+ dataset\.test_fraction=0\.5"):
        StdlibDataModule(val_fraction=0.6, test_fraction=0.5)
    with pytest.raises(ValueError, match=r"dataset\.batch_size=-1"):
        StdlibDataModule(batch_size=-1)


def test_corpus_files_skips_idlelib_tests(tmp_path: Path) -> None:
    (tmp_path / "idlelib" / "test_extra").mkdir(parents=True)
    (tmp_path / "idlelib" / "test_extra" / "t.py").write_text("x = 1\n")
    (tmp_path / "idlelib" / "editor.py").write_text("x = 2\n")
    assert [os.path.basename(path) for path in corpus_files(str(tmp_path), (".py",))] == ["editor.py"]


# --- digits ------------------------------------------------------------------------------------


def test_digits_shapes_split_sizes_and_determinism() -> None:
    module = DigitsDataModule()
    assert (module.task, module.num_features, module.num_classes, module.tokenizer) == ("classification", 64, 10, None)
    module.setup()
    sizes = {split: len(dataset) for split, dataset in module.datasets.items()}
    assert sizes == {"train": 1437, "val": 180, "test": 180}
    batch = next(iter(module.train_dataloader()))
    assert batch["inputs"].shape == (64, 64) and batch["inputs"].dtype == torch.float32
    assert batch["labels"].shape == (64,) and batch["labels"].dtype == torch.long
    everything = torch.cat([module.datasets[s].tensors["inputs"] for s in ("train", "val", "test")])
    assert float(everything.min()) == 0.0 and float(everything.max()) == 1.0
    val_counts = torch.bincount(module.datasets["val"].tensors["labels"], minlength=10)
    assert int(val_counts.max() - val_counts.min()) <= 2  # stratified: about 18 of each class
    again = DigitsDataModule()
    again.setup()
    assert batches_equal(list(module.train_dataloader()), list(again.train_dataloader()))
    other = DigitsDataModule(seed=1)
    other.setup()
    assert not torch.equal(other.datasets["val"].tensors["inputs"], module.datasets["val"].tensors["inputs"])
    assert module.fingerprint() == again.fingerprint() != other.fingerprint()


# --- configs -----------------------------------------------------------------------------------


def test_every_dataset_config_instantiates(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    for index in range(4):
        (tmp_path / "docs" / f"{index}.txt").write_text(f"document {index}\n")
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("".join(f'{{"text": "row {i}"}}\n' for i in range(5)))
    fill = {
        "text_files.yaml": {"paths": [str(tmp_path / "docs")]},
        "hf.yaml": {"path": str(jsonl), "cache_dir": str(tmp_path / "hf")},
        "prose.yaml": {"sources": ["topics"], "seq_len": 32},  # bytes without a teacher's tokenizer
    }
    files = sorted(path.name for path in CONF.glob("*.yaml"))
    assert files == ["digits.yaml", "hf.yaml", "prose.yaml", "stdlib.yaml", "text_files.yaml"]
    for name in files:
        node = OmegaConf.load(CONF / name)
        node.merge_with(fill.get(name, {}))
        root = OmegaConf.create({"seed": 7, "dataset": node})
        module = instantiate(root.dataset)
        assert module.seed == 7, name
        assert module.task in ("causal_lm", "classification")
        module.setup()
        assert len(next(iter(module.train_dataloader()))["labels"]) > 0
