"""MoE teachers ("Every Expert Matters"): router discovery, Knowledge Augmentation, Student-Aware Router."""

from __future__ import annotations

import itertools
from functools import partial
from pathlib import Path

import pytest
import torch
from lightning import Trainer
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, LlamaConfig, MixtralConfig, Qwen2MoeConfig

from kd_lightning.callbacks.sar import StudentAwareRouter
from kd_lightning.losses import forward_kl
from kd_lightning.losses.common import kl_sum, log_probs
from kd_lightning.module import DistillationModule
from kd_lightning.run.builders import augment_teacher
from kd_lightning.teachers.moe import KnowledgeAugmentedMoE, find_router_gates

VOCAB, HIDDEN, EXPERTS = 40, 32, 4


def tiny_moe(kind: str, layers: int = 1, seed: int = 0) -> torch.nn.Module:
    common = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=layers,
                  num_attention_heads=2, num_key_value_heads=2, num_experts_per_tok=2, max_position_embeddings=64)
    if kind == "mixtral":
        config = MixtralConfig(num_local_experts=EXPERTS, **common)
    else:
        config = Qwen2MoeConfig(num_experts=EXPERTS, moe_intermediate_size=16, shared_expert_intermediate_size=16,
                                norm_topk_prob=True, **common)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # larger weights than the default init: sharp routers, and routing matters
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.3)
    return model


def tiny_dense(hidden: int = 16, seed: int = 1) -> torch.nn.Module:
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64))


def lm_batch(batch: int = 4, length: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_router_gates_found_and_ka_routes_differ_from_greedy(kind: str) -> None:
    model = tiny_moe(kind, layers=2)
    assert [name for name, _ in find_router_gates(model)] == ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]
    ids = lm_batch()["input_ids"]
    greedy = model(input_ids=ids).logits
    assert torch.equal(KnowledgeAugmentedMoE(model, sampling_prob=0.0)(input_ids=ids).logits, greedy)
    teacher = KnowledgeAugmentedMoE(model, num_samples=3, sampling_prob=1.0, seed=0)
    first, second = teacher(input_ids=ids).logits, teacher(input_ids=ids).logits
    changed = (first - greedy).abs().amax(-1) > 1e-6
    assert changed.any()  # sampled routes move some tokens
    assert ((first - second).abs().amax(-1) > 1e-6).any()    # and the draws differ from each other
    with teacher.greedy():
        assert torch.equal(teacher(input_ids=ids).logits, greedy)
    assert teacher.num_samples == 3 and teacher.config.vocab_size == VOCAB  # attributes pass through
    # Same seed, same draws (seeded torch generator).
    again = KnowledgeAugmentedMoE(tiny_moe(kind, layers=2), sampling_prob=1.0, seed=0)
    assert torch.equal(again(input_ids=ids).logits, first)


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_ka_average_matches_the_expected_mixture_of_expert_subsets(kind: str) -> None:
    """Monte Carlo mean of the experts' combined output over many per-token draws equals
    Σ_S P(S) Σ_{e∈S} (p_e / Σ_S p) f_e(x), with P(S) from sampling 2 of 4 experts without
    replacement from softmax(logits / τ) — computed here independently of the implementation."""
    model = tiny_moe(kind)
    block = model.model.layers[0].mlp
    temperature, repeats = 2.0, 20000
    tokens = torch.randn(3, HIDDEN, generator=torch.Generator().manual_seed(1))
    hidden = tokens.repeat_interleave(repeats, 0).unsqueeze(0)  # every row is an independent draw
    captured: list[torch.Tensor] = []
    block.experts.register_forward_hook(lambda _m, _i, out: captured.append(out))
    KnowledgeAugmentedMoE(model, sampling_prob=1.0, router_temperature=temperature, seed=3)
    with torch.no_grad():
        block(hidden)
        draws = captured[-1].reshape(3, repeats, HIDDEN).double()
        logits = tokens @ block.gate.weight.T
        p, q = torch.softmax(logits.double(), -1), torch.softmax(logits.double() / temperature, -1)
        one_expert = [block.experts(tokens, torch.full((3, 1), e), torch.ones(3, 1)) for e in range(EXPERTS)]
        per_expert = torch.stack(one_expert, 1).double()  # [token, expert, hidden]
    expected = torch.zeros(3, HIDDEN, dtype=torch.float64)
    greedy = torch.zeros(3, HIDDEN, dtype=torch.float64)
    for i in range(3):
        for first, second in itertools.permutations(range(EXPERTS), 2):
            chance = q[i, first] * q[i, second] / (1 - q[i, first])
            subset = [first, second]
            expected[i] += chance * (p[i, subset, None] / p[i, subset].sum() * per_expert[i, subset]).sum(0)
        top = p[i].topk(2).indices
        greedy[i] = (p[i, top, None] / p[i, top].sum() * per_expert[i, top]).sum(0)
    mean, stderr = draws.mean(1), draws.std(1) / repeats**0.5
    assert ((mean - expected).abs() <= 5 * stderr + 1e-6).all()
    assert ((mean - greedy).abs() > 5 * stderr).any()  # the test can tell sampled from greedy routing


def test_dense_model_fails_clearly() -> None:
    with pytest.raises(ValueError, match="no MoE router gates found in LlamaForCausalLM"):
        find_router_gates(tiny_dense())
    with pytest.raises(ValueError, match="LlamaForCausalLM"):
        KnowledgeAugmentedMoE(tiny_dense())


def test_augment_hook_from_config_node_and_name() -> None:
    from omegaconf import OmegaConf

    model = tiny_moe("mixtral")
    assert augment_teacher(model, None) is model
    node = OmegaConf.create({"_target_": "kd_lightning.teachers.moe.KnowledgeAugmentedMoE", "_partial_": True,
                             "num_samples": 4, "sampling_prob": 0.1})
    wrapped = augment_teacher(model, node)
    assert isinstance(wrapped, KnowledgeAugmentedMoE) and wrapped.num_samples == 4
    assert augment_teacher(tiny_moe("mixtral"), "ka").num_samples == 2  # conf/teacher/augment/ka.yaml
    with pytest.raises(ValueError, match="choose one of"):
        augment_teacher(model, "nope")


def teacher_student_kl(module: DistillationModule, batch: dict[str, torch.Tensor]) -> float:
    with torch.no_grad():
        student, labels = module.align(module.student_logits(batch), batch["labels"])
        teacher, _ = module.align(module.teacher_logits(batch)["teacher"], batch["labels"])
        return float(kl_sum(log_probs(teacher), log_probs(student)).mean())


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_sar_changes_only_router_params_and_lowers_divergence(kind: str) -> None:
    teacher = tiny_moe(kind, layers=2)
    module = DistillationModule(tiny_dense(), teacher, forward_kl)
    before = {name: p.detach().clone() for name, p in teacher.named_parameters()}
    sar = StudentAwareRouter(lr=0.05, balance_weight=0.0)
    sar.attach(module)
    gate_names = {f"{g}.weight" for g, _ in find_router_gates(teacher)}
    assert {n for n, p in teacher.named_parameters() if p.requires_grad} == gate_names
    assert all(gate.top_k == EXPERTS for _, gate in find_router_gates(teacher))
    batch = lm_batch()
    start = teacher_student_kl(module, batch)
    for _ in range(15):
        sar.router_step(module, batch)
    assert not teacher.training
    assert teacher_student_kl(module, batch) < 0.9 * start
    for name, p in teacher.named_parameters():
        assert torch.equal(p, before[name]) != (name in gate_names), name


def test_sar_state_in_checkpoint_and_restored_on_resume(tmp_path: Path) -> None:
    loader = DataLoader([{k: v[0] for k, v in lm_batch(1, 12, seed=s).items()} for s in range(8)], batch_size=4)

    def fit(max_steps: int, ckpt: str | None = None) -> tuple[DistillationModule, StudentAwareRouter, Trainer]:
        module = DistillationModule(tiny_dense(), tiny_moe("mixtral"), forward_kl,
                                    optimizer=partial(torch.optim.AdamW, lr=1e-2))
        sar = StudentAwareRouter(lr=1e-2)
        trainer = Trainer(max_steps=max_steps, callbacks=[sar], logger=False, enable_checkpointing=False,
                          enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
        trainer.fit(module, train_dataloaders=loader, ckpt_path=ckpt)
        return module, sar, trainer

    module, sar, trainer = fit(2)
    assert "train/router_loss" in trainer.callback_metrics and sar.router_steps == 2
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    ckpt = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=False)
    teacher_keys = {k for k in ckpt["state_dict"] if k.startswith("teachers.")}
    assert teacher_keys == {"teachers.teacher.model.layers.0.mlp.gate.weight"}  # routers only, not experts
    restored_module, restored_sar, _ = fit(2, str(tmp_path / "last.ckpt"))  # restores, no further step
    gate = "teachers.teacher.model.layers.0.mlp.gate.weight"
    assert torch.equal(restored_module.state_dict()[gate], module.state_dict()[gate])
    saved, loaded = sar.optimizer.state_dict()["state"], restored_sar.optimizer.state_dict()["state"]
    assert restored_sar.router_steps == 2 and torch.equal(saved[0]["exp_avg"], loaded[0]["exp_avg"])
    assert float(loaded[0]["step"]) == 2.0


def test_ka_and_sar_configs_compose_and_keep_the_moe_cache_key(tmp_path: Path) -> None:
    import hydra

    from tests.conftest import compose_config

    def teacher(*overrides: str):
        return compose_config(list(overrides), tmp_path, tmp_path).teacher

    plain = teacher("teacher=moe")
    assert plain.augment is None
    for overrides in (["teacher=moe_ka"], ["teacher=moe", "teacher/augment=ka"], ["teacher=qwen_moe", "teacher/augment=ka"]):
        cfg = teacher(*overrides)
        assert cfg.augment._target_.endswith("KnowledgeAugmentedMoE") and cfg.augment.num_samples == 2
    assert teacher("teacher=moe", "teacher.augment=ka").augment == "ka"  # resolved by augment_teacher
    ka = teacher("teacher=moe_ka")
    assert ka.name == plain.name and ka.model == plain.model and ka.pretrain == plain.pretrain  # same cached teacher
    sar = hydra.utils.instantiate(compose_config(["callbacks=sar"], tmp_path, tmp_path).callbacks.sar)
    assert isinstance(sar, StudentAwareRouter) and sar.balance_weight == 0.01


def test_ka_teacher_end_to_end(make_cfg) -> None:
    from kd_lightning.run.pipeline import run
    from tests.conftest import column, metrics_csv

    cfg = make_cfg("teacher=moe_ka", "distill.teacher_combine=losses", "loss=reverse_kl", "baseline=false",
                   "teacher.model.config.hidden_size=32", "teacher.model.config.intermediate_size=32",
                   "teacher.model.config.num_hidden_layers=1", "teacher.model.config.num_local_experts=4",
                   "teacher.pretrain.max_steps=2", "student.model.config.hidden_size=32",
                   "student.model.config.num_hidden_layers=1", "trainer.max_steps=2", "trainer.val_check_interval=2",
                   "trainer.limit_val_batches=1", "dataset.max_eval_tokens=1024", "dataset.seq_len=32",
                   "dataset.batch_size=4")
    run(cfg)
    rows = metrics_csv(Path(cfg.paths.output_dir))
    assert column(rows, "train/teacher_weight/moe/sample0") == [0.5, 0.5]  # M = 2 draws share the weight
