"""Cross-tokenizer runs end to end (issue #12): dual-tokenized data modules, the teacher reading its
own tokens, the refusals, nats per byte in the summary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig

from conftest import column, metrics_csv
from kd_lightning.data.bpe import train_bpe
from kd_lightning.data.text import TextFilesDataModule
from kd_lightning.data.tokenizer import byte_tokenizer
from kd_lightning.data.vocab_map import token_byte_lengths
from kd_lightning.evaluate import evaluate
from kd_lightning.models import build_causal_lm, save_model
from kd_lightning.module import DistillationModule
from kd_lightning.run.pipeline import run

CORPUS = ["def area(radius):\n    return 3.14 * radius ** 2  # café €\n", "print(area(2))  # naïve 😀\n",
          "class Point:\n    def __init__(self, x, y):\n        self.x, self.y = x, y\n"] * 20


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("bpe")
    train_bpe(CORPUS, 300).save_pretrained(directory)
    return directory


def tiny_lm(directory: Path, vocab_size: int, tokenizer=None) -> Path:
    config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, max_position_embeddings=256)
    model = build_causal_lm(config, vocab_size=vocab_size, tokenizer=byte_tokenizer(), seed=0)
    return save_model(model, directory, tokenizer)


@pytest.mark.parametrize("direction, loss", [("cross_tokenizer", "uld"), ("cross_tokenizer_reverse", "span_kl"),
                                             ("cross_tokenizer", "alm"), ("cross_tokenizer_reverse", "byte_kl"),
                                             ("cross_tokenizer", "xtoken_kl")])
def test_cross_tokenizer_experiment_runs_both_directions(make_cfg, direction: str, loss: str) -> None:
    # bpe:512 instead of the preset's 4096: the same code path, a smaller head for a 12-step test.
    bpe = "dataset.tokenizer=bpe:512" if direction == "cross_tokenizer" else "teacher.tokenizer=bpe:512"
    cfg = make_cfg(f"experiment={direction}", f"loss={loss}", bpe, "trainer.max_steps=12")
    summary = run(cfg)
    out = Path(cfg.paths.output_dir)
    models = summary["models"]
    student_vocab, teacher_vocab = (512, 259) if direction == "cross_tokenizer" else (259, 512)
    assert json.loads((out / "student" / "config.json").read_text())["vocab_size"] == student_vocab
    assert (out / "summary.json").is_file() and (out / "checkpoints" / "last.ckpt").is_file()
    # The teacher was built for (and pre-trained on) its own tokenization, and evaluated on it.
    teacher_row = models["teacher:moe"]
    assert teacher_row["params"] - 3_413_888 == 2 * 128 * (teacher_vocab - 259)
    for row in models.values():
        assert row["loss_per_byte"] > 0
    # Bytes: nats/byte == nats/token; a BPE token covers several bytes, so its per-byte figure is lower.
    byte_row = models["student (KD)"] if student_vocab == 259 else teacher_row
    assert byte_row["loss_per_byte"] == pytest.approx(byte_row["loss"], rel=1e-9)
    bpe_row = models["student (KD)"] if student_vocab == 512 else teacher_row
    assert bpe_row["loss_per_byte"] < bpe_row["loss"]
    assert "teacher_agreement" not in models["student (KD)"]  # positions of different tokenizations
    rows = metrics_csv(out)
    losses = column(rows, "train/loss")
    assert losses[-1] < losses[0]
    assert column(rows, "val/teacher_loss")
    if loss == "byte_kl":
        assert all(0 < value <= 1 for value in column(rows, "train/byte_kl_compared_fraction"))
    if loss == "alm":
        assert all(value >= 1 for value in column(rows, "train/alm_student_tokens_per_chunk"))
    if loss == "xtoken_kl":
        assert all(0.99 < value <= 1 + 1e-6 for value in column(rows, "train/xtoken_projected_mass"))
        assert all(0.5 < value <= 1 for value in column(rows, "train/xtoken_row_fraction"))
    if loss == "span_kl":
        exact = column(rows, "train/span_exact_fraction")
        assert exact and all(0 < value <= 1 for value in exact)


def test_teacher_tokenizer_differs_but_data_is_single_is_refused(make_cfg, tmp_path: Path, bpe_dir: Path) -> None:
    from transformers import AutoTokenizer

    teacher_dir = tiny_lm(tmp_path / "t", 300, AutoTokenizer.from_pretrained(bpe_dir))
    cfg = make_cfg("teacher=hf", f"teacher.model.pretrained={teacher_dir}", "loss=uld", "dataset.teacher_tokenizer=null")
    with pytest.raises(ValueError, match=r"teacher 'hf' uses tokenizer .* a teacher must read its own tokens.*loss=uld"):
        run(cfg)
    assert not (Path(cfg.paths.output_dir) / "checkpoints").exists()


def test_unknown_teacher_tokenizer_with_another_vocabulary_is_refused_even_for_uld(make_cfg, tmp_path: Path) -> None:
    teacher_dir = tiny_lm(tmp_path / "t", 300)  # no tokenizer saved next to it: unknown
    cfg = make_cfg("teacher=hf", f"teacher.model.pretrained={teacher_dir}", "loss=uld")
    with pytest.raises(ValueError, match=r"vocabulary size 300 but the student has 259; the data holds one "
                                         r"tokenization, so the teacher would read the student's ids"):
        run(cfg)


def test_vocabulary_mismatch_names_the_cross_tokenizer_options(make_cfg, tmp_path: Path) -> None:
    teacher_dir = tiny_lm(tmp_path / "t", 300)
    cfg = make_cfg("teacher=hf", f"teacher.model.pretrained={teacher_dir}", "loss=kl")
    with pytest.raises(ValueError, match=r"teacher.tokenizer=<path>.*loss=uld or loss=span_kl"):
        run(cfg)


def test_dual_teacher_with_a_same_tokenizer_loss_is_refused(make_cfg, tmp_path: Path, bpe_dir: Path) -> None:
    from transformers import AutoTokenizer

    teacher_dir = tiny_lm(tmp_path / "t", 300, AutoTokenizer.from_pretrained(bpe_dir))
    with pytest.raises(ValueError, match=r"reads its own tokenization \(dual data\).*loss=uld or loss=span_kl"):
        run(make_cfg("teacher=hf", f"teacher.model.pretrained={teacher_dir}", "loss=kl"))


@pytest.mark.parametrize("prompt", [False, True])
def test_text_files_batches_carry_both_tokenizations_of_the_same_text(tmp_path: Path, bpe_dir: Path,
                                                                     prompt: bool) -> None:
    data = tmp_path / "data.jsonl"
    records = [{"prompt": f"Q{i}: {text[:20]}", "response": text[20:], "text": text} for i, text in enumerate(CORPUS)]
    data.write_text("\n".join(json.dumps(r) for r in records))
    module = TextFilesDataModule(paths=[str(data)], teacher_tokenizer=str(bpe_dir), seq_len=128, batch_size=4,
                                 prompt_field="prompt" if prompt else None)
    assert module.dual and module.teacher_data().tokenizer.get_vocab() == module.teacher_tokenizer.get_vocab()
    batch = next(iter(module.train_dataloader()))
    assert batch["teacher_input_ids"].shape[1] != batch["input_ids"].shape[1]  # own lengths
    for row in range(batch["input_ids"].shape[0]):
        student = batch["input_ids"][row][batch["attention_mask"][row].bool()]
        teacher = batch["teacher_input_ids"][row][batch["teacher_attention_mask"][row].bool()]
        assert module.tokenizer.decode(student) == module.teacher_tokenizer.decode(teacher)
        # Counted (response) text is the same on both sides.
        s_labels, t_labels = batch["labels"][row], batch["teacher_labels"][row]
        assert module.tokenizer.decode(s_labels[s_labels >= 0]) == module.teacher_tokenizer.decode(t_labels[t_labels >= 0])
        if prompt:
            assert (s_labels[:2] == -100).all() and (t_labels[:2] == -100).all()


def test_same_tokenizer_for_the_teacher_keeps_single_data(tmp_path: Path) -> None:
    data = tmp_path / "a.txt"
    data.write_text("".join(CORPUS))
    module = TextFilesDataModule(paths=[str(data)], teacher_tokenizer="byte", seq_len=32, batch_size=2)
    assert not module.dual and module.teacher_data() is module


def test_token_byte_lengths_cover_the_text(bpe_dir: Path) -> None:
    from transformers import AutoTokenizer

    text = CORPUS[0] + CORPUS[1]
    bpe = AutoTokenizer.from_pretrained(bpe_dir)
    ids = bpe(text, add_special_tokens=False)["input_ids"] + [bpe.eos_token_id]
    assert int(token_byte_lengths(bpe)[ids].sum()) == len(text.encode("utf-8")) + 1  # EOS counts one
    byte_lengths = token_byte_lengths(byte_tokenizer())
    assert byte_lengths[3:].eq(1).all() and byte_lengths[1] == 1 and byte_lengths[0] == 0


def test_evaluate_loss_per_byte(bpe_dir: Path) -> None:
    from transformers import AutoTokenizer

    bpe = AutoTokenizer.from_pretrained(bpe_dir)
    model = build_causal_lm(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2), vocab_size=300, tokenizer=bpe, seed=0)
    ids = torch.tensor([bpe(CORPUS[0], add_special_tokens=False)["input_ids"]])
    result = evaluate(model, [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}], "causal_lm",
                      byte_lengths=token_byte_lengths(bpe))
    covered = len(bpe.decode(ids[0, 1:]).encode("utf-8"))
    assert result["loss_per_byte"] == pytest.approx(result["loss"] * result["count"] / covered)


def test_own_tokenization_needs_a_cross_tokenizer_loss() -> None:
    from functools import partial

    from kd_lightning.losses import forward_kl, uld

    config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2)
    student = build_causal_lm(config, vocab_size=259, tokenizer=byte_tokenizer(), seed=0)
    teacher = build_causal_lm(config, vocab_size=300, tokenizer=byte_tokenizer(), seed=1)
    with pytest.raises(ValueError, match="loss=uld or loss=span_kl"):
        DistillationModule(student, teacher, partial(forward_kl), teacher_tokenization="own")
    with pytest.raises(ValueError, match="loss.chunk_size=8"):
        DistillationModule(student, teacher, partial(uld), teacher_tokenization="own", chunk_size=8)
    assert type(DistillationModule(student, teacher, partial(uld), teacher_tokenization="own").kd_path).__name__ \
        == "CrossTokenizerKD"


def test_embedded_tokenizer_spec_is_checked(tmp_path: Path) -> None:
    from kd_lightning.data.stdlib import StdlibDataModule

    with pytest.raises(ValueError, match=r"dataset.teacher_tokenizer='bpe:4k': expected bpe:<vocabulary size>"):
        StdlibDataModule(teacher_tokenizer="bpe:4k", cache_dir=str(tmp_path))
