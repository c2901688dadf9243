"""Teacher outputs computed once per sweep (`teacher_outputs.reuse`, kd_lightning/teachers/teacher_outputs.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kd_lightning.losses import forward_kl, reverse_kl, skew_kl
from kd_lightning.teachers.encodings import Encoding
from kd_lightning.teachers.store import TeacherOutputStore, store_identity
from kd_lightning.teachers.teacher_outputs import MemoizedTeacher, row_keys
from kd_lightning.run.pipeline import run

V = 37


def make_store(directory: Path, vocab: int = V, encoding: str = "full", dtype: str = "float32", k: int = 32,
               **kwargs) -> TeacherOutputStore:
    identity = store_identity(weights="w", model_config=None, precision="32-true", accelerator="cpu",
                              vocab_size=vocab, encoding=Encoding(encoding, dtype, k=k))
    return TeacherOutputStore(directory, identity, **kwargs)


def tiny_lm(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def batch(seed: int, rows: int = 3, length: int = 9) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, V, (rows, length), generator=g), "attention_mask": torch.ones(rows, length, dtype=torch.long)}


def test_row_keys_depend_on_ids_mask_and_length():
    b = batch(0)
    keys = row_keys(b["input_ids"], b["attention_mask"])
    assert len(set(keys)) == 3 and all(len(k) == 16 for k in keys)
    assert row_keys(b["input_ids"], b["attention_mask"]) == keys  # deterministic
    mask = b["attention_mask"].clone()
    mask[0, -1] = 0
    assert row_keys(b["input_ids"], mask)[0] != keys[0] and row_keys(b["input_ids"], mask)[1] == keys[1]
    assert row_keys(b["input_ids"][:, :-1], b["attention_mask"][:, :-1])[0] != keys[0]


def test_float32_store_is_exact_and_survives_a_new_process_view(tmp_path: Path):
    teacher = tiny_lm()
    memo = MemoizedTeacher(teacher, make_store(tmp_path, flush_rows=4))
    b = batch(1)
    first = memo(**b).logits                      # computed
    again = memo(**b).logits                      # read from the in-memory buffer
    reference = torch.log_softmax(teacher(**b).logits.float(), -1)
    assert torch.equal(again, reference)
    assert torch.allclose(first.log_softmax(-1), reference, atol=1e-6)
    assert memo.store.stats["hit_rows"] == 3 and memo.store.stats["computed_rows"] == 3
    memo.store.flush()
    assert len(list(tmp_path.glob("part-*.safetensors"))) == 1 and not list(tmp_path.glob(".*tmp"))
    # a later run (a new store over the same directory) reads it from disk without the teacher
    fresh = MemoizedTeacher(teacher, make_store(tmp_path))
    calls = []
    fresh.model.register_forward_hook(lambda *_: calls.append(1))
    assert torch.equal(fresh(**b).logits, reference) and calls == []
    assert fresh.store.stats["hit_rows"] == 3 and fresh.store.stats["saved_seconds"] > 0
    # a batch with one new row runs the teacher for the whole batch and stores only the new row
    mixed = {k: torch.cat([v[:2], batch(2)[k][:1]]) for k, v in b.items()}
    out = fresh(**mixed).logits
    assert calls == [1] and torch.allclose(out.log_softmax(-1), torch.log_softmax(teacher(**mixed).logits, -1), atol=1e-6)
    fresh.store.flush()
    assert fresh.store.stats["stored_rows"] == 1 and len(fresh.store) == 4


def test_float16_store_gives_the_same_losses_within_tolerance(tmp_path: Path):
    teacher = tiny_lm()
    b = batch(3, rows=4, length=12)
    memo = MemoizedTeacher(teacher, make_store(tmp_path, dtype="float16"))
    memo(**b)
    stored = memo(**b).logits
    assert memo.store.stats["hit_rows"] == 4
    student = tiny_lm(seed=5)(**b).logits
    logits = teacher(**b).logits
    mask = torch.ones(b["input_ids"].shape, dtype=torch.bool)
    for fn in (forward_kl, reverse_kl, skew_kl):
        for T in (1.0, 2.0):
            exact = fn(student, logits, mask, temperature=T)
            approx = fn(student, stored, mask, temperature=T)
            assert torch.allclose(exact, approx, rtol=2e-3, atol=1e-4), (fn.__name__, T, exact, approx)


def test_topk_store_spreads_the_rest_uniformly(tmp_path: Path):
    teacher = tiny_lm()
    b = batch(4)
    memo = MemoizedTeacher(teacher, make_store(tmp_path, encoding="topk", k=5))
    memo(**b)
    stored = memo(**b).logits
    exact = torch.log_softmax(teacher(**b).logits, -1)
    assert torch.allclose(stored.exp().sum(-1), torch.ones(3, 9), atol=1e-5)  # a distribution
    top, ids = exact.topk(5, dim=-1)
    assert torch.allclose(stored.gather(-1, ids), top, atol=1e-3)  # tail mass kept in float16
    rest = (1 - top.exp().sum(-1, keepdim=True)) / (V - 5)
    others = torch.ones_like(exact, dtype=torch.bool).scatter_(-1, ids, False)
    assert torch.allclose(stored[others].exp(), rest.expand_as(exact)[others], rtol=2e-3)


def test_bad_options_and_mismatched_directory_fail_clearly(tmp_path: Path):
    with pytest.raises(ValueError, match="dtype='int8' for encoding=full"):
        make_store(tmp_path, dtype="int8")
    with pytest.raises(ValueError, match="k=0: must be >= 1"):
        make_store(tmp_path, encoding="topk", k=0)
    store = make_store(tmp_path)
    MemoizedTeacher(tiny_lm(), store)(**batch(0))
    store.flush()
    with pytest.raises(ValueError, match=r"other settings \(vocab_size: stored 37, this run 38\)"):
        make_store(tmp_path, V + 1)


def test_max_gb_stops_storing_but_keeps_reading(tmp_path: Path, caplog):
    store = make_store(tmp_path, max_gb=1e-9)
    memo = MemoizedTeacher(tiny_lm(), store)
    memo(**batch(0))
    with caplog.at_level("WARNING", logger="kd_lightning"):
        store.flush()
    assert "max_gb" in caplog.text and not list(tmp_path.glob("part-*"))
    memo(**batch(0))
    assert store.stats["computed_rows"] == 6 and store.stats["hit_rows"] == 0


def test_second_run_of_a_sweep_reads_the_teacher_outputs(make_cfg, tmp_path: Path):
    """Two runs with the same teacher and data and different losses: the second never runs the
    teacher on training or evaluation batches, and its summary says how much time it saved."""
    common = ("teacher_outputs.reuse=true", "baseline=false", f"teacher_outputs.dir={tmp_path / 'store'}")
    first = run(make_cfg(*common, "loss=kl", output_dir=tmp_path / "a"))
    second = run(make_cfg(*common, "loss=reverse_kl", output_dir=tmp_path / "b"))
    a, b = first["teacher_outputs"], second["teacher_outputs"]
    assert 0 < a["stored_rows"] <= a["computed_rows"]
    assert b["computed_rows"] == 0 and b["hit_rows"] >= a["stored_rows"] > 0
    assert b["saved_seconds"] > 0 and a["directories"] == b["directories"]
    # the teacher's held-out loss is the same whether computed or read
    ta, tb = first["models"]["teacher:moe"]["loss"], second["models"]["teacher:moe"]["loss"]
    assert abs(ta - tb) < 1e-5
    saved = json.loads((tmp_path / "b" / "summary.json").read_text())["teacher_outputs"]
    assert saved["hit_rows"] == b["hit_rows"]


def test_reuse_gives_the_same_student_as_running_the_teacher(make_cfg, tmp_path: Path):
    """float32 store: the student trained from stored outputs equals the one trained online."""
    online = run(make_cfg("baseline=false", output_dir=tmp_path / "online"))
    opts = ("teacher_outputs.reuse=true", "teacher_outputs.dtype=float32", "baseline=false",
            f"teacher_outputs.dir={tmp_path / 'store'}")
    run(make_cfg(*opts, output_dir=tmp_path / "fill"))
    reread = run(make_cfg(*opts, output_dir=tmp_path / "read"))
    assert reread["teacher_outputs"]["computed_rows"] == 0
    s_online, s_read = online["models"]["student (KD)"]["loss"], reread["models"]["student (KD)"]["loss"]
    assert abs(s_online - s_read) < 1e-4, (s_online, s_read)


@pytest.mark.parametrize("override, reason", [("teacher=moe_ka", "stochastic"), ("callbacks=sar", "changes the teacher"),
                                              ("loss.chunk_size=32", "chunked path")])
def test_reuse_is_skipped_where_outputs_change(make_cfg, tmp_path: Path, caplog, override: str, reason: str):
    from hydra.utils import instantiate

    from kd_lightning.run.builders import obtain_teacher
    from kd_lightning.run.settings import (method_callbacks, teacher_configs, teacher_model_configs,
                                           teacher_output_context, teacher_output_options)
    from kd_lightning.teachers.teacher_outputs import memoize_teachers

    cfg = make_cfg("teacher_outputs.reuse=true", override)
    datamodule = instantiate(cfg.dataset)
    teachers = {str(t.name): obtain_teacher(cfg, t, datamodule) for t in teacher_configs(cfg)}
    with caplog.at_level("INFO", logger="kd_lightning"):
        wrapped = memoize_teachers(teacher_output_options(cfg), teachers, teacher_model_configs(cfg),
                                   teacher_output_context(cfg, datamodule.task), method_callbacks(cfg))
    assert wrapped == teachers and reason in caplog.text


def test_store_directory_separates_teachers_precisions_and_formats(make_cfg):
    from kd_lightning.run.settings import teacher_model_configs, teacher_output_options
    from kd_lightning.teachers.identity import teacher_store_location

    def directory(cfg, teacher):
        opts = teacher_output_options(cfg)
        return teacher_store_location(opts.store, str(cfg.teacher.name), teacher, teacher_model_configs(cfg)["moe"])[0]

    cfg = make_cfg("teacher_outputs.reuse=true")
    teacher = tiny_lm()
    base = directory(cfg, teacher)
    assert base == directory(cfg, tiny_lm())  # same weights, same store
    assert base != directory(cfg, tiny_lm(seed=1))  # other weights
    for override in ("strategy=bf16", "teacher_outputs.dtype=float16", "teacher_outputs.encoding=topk",
                     "teacher_outputs.encoding=sample"):
        other = make_cfg("teacher_outputs.reuse=true", override)
        assert directory(other, teacher) != base, override


def test_topk_and_flush_rows_reach_the_store_from_the_config(make_cfg, tmp_path: Path):
    """`teacher_outputs.encoding=topk`, `.k` and `.flush_rows` from the command line shape what is written, and a
    second run reads the top-k store without running the teacher."""
    from safetensors import safe_open

    opts = ("teacher_outputs.reuse=true", "teacher_outputs.encoding=topk", "teacher_outputs.k=8",
            "teacher_outputs.dtype=uint8", "teacher_outputs.flush_rows=16", "baseline=false",
            f"teacher_outputs.dir={tmp_path / 'store'}")
    first = run(make_cfg(*opts, output_dir=tmp_path / "a"))["teacher_outputs"]
    parts = sorted((tmp_path / "store").rglob("part-*.safetensors"))
    assert len(parts) >= 2  # 6 steps x 8 rows + evaluation rows, flushed every 16
    with safe_open(str(parts[0]), framework="pt") as f:
        assert set(f.keys()) == {"keys", "head", "steps", "ids", "tail"} and f.get_tensor("steps").shape[-1] == 8
        assert f.get_tensor("ids").dtype == torch.uint16 and f.get_tensor("steps").dtype == torch.uint8
    second = run(make_cfg(*opts, "loss=js", output_dir=tmp_path / "b"))["teacher_outputs"]
    assert second["computed_rows"] == 0 and second["hit_rows"] >= first["stored_rows"] > 0
