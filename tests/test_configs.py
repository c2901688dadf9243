"""Every option of every config group composes and its objects instantiate."""

from __future__ import annotations

from pathlib import Path

import hydra
import pytest
import torch
from lightning import Trainer
from omegaconf import OmegaConf, open_dict

from kd_lightning.models import build_causal_lm, output_size, save_model
from kd_lightning.run.builders import build_model
from tests.conftest import CONF


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.fixture(scope="module")
def lm_data():
    from kd_lightning.data import StdlibDataModule

    return StdlibDataModule(max_train_tokens=10_000, max_eval_tokens=2_048, seq_len=32, batch_size=4)


@pytest.fixture(scope="module")
def local_lm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import LlamaConfig

    from kd_lightning.data import byte_tokenizer

    config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, max_position_embeddings=64)
    model = build_causal_lm(config, vocab_size=259, tokenizer=byte_tokenizer(), seed=0)
    return save_model(model, tmp_path_factory.mktemp("hf_model"), byte_tokenizer())


@pytest.mark.parametrize("option", options("loss"))
def test_loss_options_instantiate_and_compute(make_cfg, option: str) -> None:
    cfg = make_cfg(f"loss={option}")
    fn = hydra.utils.instantiate(cfg.loss.fn)
    assert callable(fn) and cfg.loss.name
    if option in ("alm", "byte_kl", "xtoken_kl"):  # they compare two tokenizations: computed in test_losses_configs with targets
        return
    g = torch.Generator().manual_seed(0)
    student = torch.randn(6, 11, generator=g, requires_grad=True)
    teacher = torch.randn(6, 11, generator=g)
    params = {"interpolation": 0.5} if option == "taid" else {}
    value = fn(student, teacher, torch.ones(6, dtype=torch.bool), temperature=1.0, **params)
    value.backward()
    assert value.dim() == 0 and torch.isfinite(value) and value > 0
    assert torch.isfinite(student.grad).all()
    if option != "sparse_kl":  # a sampled sparse target differs from p even when q = p
        assert fn(teacher.clone(), teacher, None, **params).abs() < 1e-5  # zero at equality (KL forms)


@pytest.mark.parametrize("option", options("teacher") + [f"student:{o}" for o in options("student")])
def test_model_options_build(make_cfg, option: str, lm_data, local_lm_dir: Path) -> None:
    group, name = option.split(":") if ":" in option else ("teacher", option)
    cfg = make_cfg(f"{group}={name}")
    node = cfg[group]
    entries = list(node.teachers) if node.get("teachers") else [node]
    for entry in entries:
        raw = OmegaConf.to_container(entry.model, resolve=False) if entry.get("model") is not None else {}
        if "kd_packaged_gguf" in str(raw.get("pretrained")):  # a real model from a package: the slow tier builds it
            pytest.skip(f"teacher={name} is converted from an installed package; tests/test_real_teacher.py runs it")
        if str(raw.get("_target_", "")).endswith(".from_teacher"):  # cut from a saved teacher (any decoder with model.layers)
            with open_dict(entry):
                entry.model.teacher = str(local_lm_dir)
        if entry.get("cached") or entry.get("served"):  # sparse targets, no model here (test_teacher_cache, test_served_teacher)
            assert entry.model is None
            continue
        with open_dict(entry):
            if OmegaConf.is_missing(entry.model, "pretrained"):
                entry.model.pretrained = str(local_lm_dir)
        if "mlp" in str(entry.model._target_):
            data = type("Digits", (), {"task": "classification", "num_features": 64, "num_classes": 10})()
            model = build_model(entry.model, data, 0)
            assert output_size(model) == 10
        else:
            model = build_model(entry.model, lm_data, 0)
            assert output_size(model) == 259


@pytest.mark.parametrize("option", options("strategy"))
def test_strategy_options_compose(make_cfg, option: str) -> None:
    cfg = make_cfg(f"strategy={option}")
    assert {"accelerator", "devices", "strategy", "precision"} <= set(cfg.trainer)
    if cfg.trainer.accelerator == "gpu" and not torch.cuda.is_available():
        pytest.skip(f"strategy={option} needs a GPU; without one it is refused before any compute (tests/test_train.py)")
    trainer = hydra.utils.instantiate(cfg.trainer, logger=False, enable_checkpointing=False, callbacks=[])
    assert isinstance(trainer, Trainer)


@pytest.mark.parametrize("option", options("logger"))
def test_logger_options_instantiate(make_cfg, option: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = make_cfg(f"logger={option}")
    loggers = [hydra.utils.instantiate(c) for c in cfg.logger.values()]
    assert loggers and all(hasattr(lg, "log_metrics") for lg in loggers)


@pytest.mark.parametrize("group", ["temperature", "callbacks", "experiment", "dataset"])
def test_other_groups_compose(make_cfg, group: str) -> None:
    for option in options(group):
        cfg = make_cfg(f"{group}={option}", tiny=False)
        assert cfg.stage in ("distill", "teacher", "takd")
        if group == "temperature":
            assert float(cfg.temperature.initial) > 0
            if cfg.temperature.callback is not None:
                hydra.utils.instantiate(cfg.temperature.callback)
        if group == "callbacks":
            for node in (cfg.callbacks or {}).values():
                hydra.utils.instantiate(node)


def test_fsdp_options_reach_the_strategy_and_the_sharding(make_cfg, monkeypatch: pytest.MonkeyPatch) -> None:
    """`trainer.strategy.student_reshard_after_forward`, `student_activation_checkpointing` and `mixed_precision`
    (conf/strategy/fsdp.yaml) reach ShardedDataParallel, and configure_model passes the student's settings
    and the device to materialise on to the sharding."""
    import kd_lightning.module as module_py
    from kd_lightning.losses import forward_kl
    from kd_lightning.module import DistillationModule
    from kd_lightning.infra.sharding import ShardedDataParallel
    from tests.helpers import tiny_lm

    cfg = make_cfg("strategy=fsdp", "trainer.strategy.student_reshard_after_forward=false",
                   "trainer.strategy.mixed_precision=fp32", "trainer.strategy.student_activation_checkpointing=true")
    strategy = hydra.utils.instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, ShardedDataParallel)
    assert strategy.student_reshard_after_forward is False and strategy.mixed_precision == "fp32"
    assert strategy.student_activation_checkpointing is True
    assert hydra.utils.instantiate(make_cfg("strategy=fsdp").trainer.strategy).student_activation_checkpointing is False
    assert hydra.utils.instantiate(make_cfg("strategy=fsdp").trainer.strategy).student_reshard_after_forward is True
    seen = {}
    monkeypatch.setattr(module_py, "shard_distillation", lambda module, mesh, policy, **kw: seen.update(kw))
    monkeypatch.setattr(ShardedDataParallel, "data_parallel_mesh", property(lambda self: None))
    monkeypatch.setattr(ShardedDataParallel, "root_device", property(lambda self: torch.device("cpu")))
    module = DistillationModule(tiny_lm(0), tiny_lm(1), forward_kl)
    module._trainer = type("T", (), {"strategy": strategy})()
    module.configure_model()
    assert seen == {"student_reshard_after_forward": False, "device": torch.device("cpu"),
                    "student_activation_checkpointing": True}
