"""Multi-teacher weighting callbacks and `teacher=ensemble` runs through the real entry point."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kd_lightning.callbacks.weighting import (
    CAMKDWeighting,
    ConfidenceWeighting,
    PerformanceGapWeighting,
    ReinforcedWeighting,
    example_statistics,
)
from kd_lightning.losses import forward_kl
from kd_lightning.models import MLPClassifier
from kd_lightning.module import DistillationModule
from kd_lightning.run.pipeline import run
from tests.conftest import column, metrics_csv

B, L, V = 3, 5, 7


def lm_case() -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    """Three teachers on 3 sequences: `right` puts 4 nats on every label, `wrong_first` does too
    except on sequence 0 where it backs another token, `flat` is uniform (maximal entropy). The
    student is mildly right everywhere (1 nat on the label)."""
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, V, (B, L), generator=gen)
    labels[:, 0] = -100  # an ignored position per sequence
    mask = labels != -100
    onehot = torch.nn.functional.one_hot(labels.clamp_min(0), V).float()
    right = 4.0 * onehot
    wrong = right.clone()
    wrong[0] = 4.0 * torch.nn.functional.one_hot((labels[0].clamp_min(0) + 1) % V, V).float()
    teachers = {"right": right, "wrong_first": wrong, "flat": torch.zeros(B, L, V)}
    return teachers, 1.0 * onehot, labels, mask


def test_statistics_are_masked_sequence_means() -> None:
    teachers, student, labels, mask = lm_case()
    stats = example_statistics(teachers, student, labels, mask)
    assert stats["teacher_ce"].shape == (B, 3) and stats["student_ce"].shape == (B,)
    token_ce = -torch.log_softmax(teachers["flat"], -1).gather(-1, labels.clamp_min(0)[..., None])[..., 0]
    assert torch.allclose(stats["teacher_ce"][:, 2], (token_ce * mask).sum(1) / mask.sum(1))
    assert torch.allclose(stats["teacher_entropy"][:, 2], torch.full((B,), torch.log(torch.tensor(float(V)))))


def test_weights_sum_to_one_and_follow_the_documented_direction() -> None:
    teachers, student, labels, mask = lm_case()
    ca_mkd = CAMKDWeighting()(teachers, student, labels, mask)
    confidence = ConfidenceWeighting()(teachers, student, labels, mask)
    gap = PerformanceGapWeighting()(teachers, student, labels, mask)
    for weights in (ca_mkd, confidence, gap):
        assert weights.shape == (B, 3) and torch.allclose(weights.sum(-1), torch.ones(B)) and (weights >= 0).all()
    # CA-MKD: the teacher that is wrong on sequence 0 loses weight there, and only there.
    assert ca_mkd[0, 1] < ca_mkd[0, 0] and torch.allclose(ca_mkd[1:, 1], ca_mkd[1:, 0])
    # Confidence: the flat (high-entropy) teacher gets the least weight everywhere.
    assert (confidence[:, 2] < confidence[:, :2].min(-1).values).all()
    # Performance gap: teachers worse than the student on a sequence are dropped.
    assert gap[0, 1] == 0 and (gap[:, 2] == 0).all() and gap[0, 0] == 1.0
    assert torch.allclose(gap[1:, :2], torch.full((2, 2), 0.5))


def test_performance_gap_falls_back_when_no_teacher_beats_the_student() -> None:
    teachers, _, labels, mask = lm_case()
    expert_student = 10.0 * torch.nn.functional.one_hot(labels.clamp_min(0), V).float()
    equal = PerformanceGapWeighting()(teachers, expert_student, labels, mask)
    assert torch.allclose(equal, torch.full((B, 3), 1 / 3))
    soft = PerformanceGapWeighting(fallback="softmax")(teachers, expert_student, labels, mask)
    assert torch.allclose(soft.sum(-1), torch.ones(B)) and (soft[:, 0] > soft[:, 2]).all()


def test_reinforced_policy_learns_from_reward_and_round_trips() -> None:
    teachers, student, labels, mask = lm_case()
    policy = ReinforcedWeighting(lr=0.05, seed=0)
    for _ in range(60):  # reward: +1 per selected `right` teacher, −1 per selected `flat` teacher
        weights = policy(teachers, student, labels, mask)
        assert torch.allclose(weights.sum(-1), torch.ones(B))
        states, actions, _ = policy._pending
        policy.update(states, actions, actions[:, 0] - actions[:, 2])
    probs = policy.selection_probs(states)
    assert (probs[:, 0] > 0.9).all() and (probs[:, 2] < 0.5).all()

    state = policy.state_dict()
    restored = ReinforcedWeighting(lr=0.05, seed=123)
    restored.load_state_dict(state)
    assert restored.baseline == policy.baseline and restored.updates == policy.updates == 60
    assert all(torch.equal(a, b) for a, b in zip(restored.policy.parameters(), policy.policy.parameters()))
    # Same policy and generator state: the next draws coincide.
    assert torch.equal(restored(teachers, student, labels, mask), policy(teachers, student, labels, mask))


def test_two_weighting_callbacks_fail_clearly() -> None:
    mlp = lambda: MLPClassifier(4, 3, [8])  # noqa: E731
    module = DistillationModule(mlp(), {"a": mlp(), "b": mlp()}, forward_kl)
    CAMKDWeighting().setup(None, module, "fit")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="already set by CAMKDWeighting"):
        ConfidenceWeighting().setup(None, module, "fit")  # type: ignore[arg-type]


TINY_MEMBERS = [
    "teacher.members.moe.model.config.hidden_size=32", "teacher.members.moe.model.config.intermediate_size=32",
    "teacher.members.moe.model.config.num_hidden_layers=1", "teacher.members.moe.model.config.num_local_experts=4",
    "teacher.members.moe.pretrain.max_steps=2",
    "teacher.members.dense.model.config.hidden_size=32", "teacher.members.dense.model.config.intermediate_size=64",
    "teacher.members.dense.model.config.num_hidden_layers=1", "teacher.members.dense.pretrain.max_steps=2",
    "student.model.config.hidden_size=32", "student.model.config.num_hidden_layers=1",
]


def test_ensemble_of_moe_and_dense_teachers_with_ca_mkd(make_cfg) -> None:
    cfg = make_cfg("teacher=ensemble", "callbacks=ca_mkd", "baseline=false", "trainer.max_steps=3",
                   "trainer.val_check_interval=3", "trainer.limit_val_batches=1", "dataset.max_eval_tokens=1024",
                   "dataset.seq_len=32", "dataset.batch_size=4", *TINY_MEMBERS)
    summary = run(cfg)
    assert set(summary["models"]) == {"teacher:moe", "teacher:dense", "student (KD)"}
    rows = metrics_csv(Path(cfg.paths.output_dir))
    moe, dense = column(rows, "train/teacher_weight/moe"), column(rows, "train/teacher_weight/dense")
    assert len(moe) == 3 and all(abs(a + b - 1) < 1e-5 for a, b in zip(moe, dense))
    assert any(abs(a - 0.5) > 1e-4 for a in moe)  # per-example CA-MKD weights, not the static 1/2


def test_digits_ensemble_with_reinforced_selection(make_cfg) -> None:
    cfg = make_cfg("experiment=digits_ensemble", "callbacks=reinforced", "trainer.max_steps=8",
                   "teacher.members.wide.pretrain.max_steps=10", "teacher.members.narrow.pretrain.max_steps=10",
                   "baseline=false", "trainer.check_val_every_n_epoch=null", "trainer.val_check_interval=8")
    summary = run(cfg)
    assert set(summary["models"]) == {"teacher:wide", "teacher:narrow", "student (KD)"}
    assert summary["task"] == "classification"
    rows = metrics_csv(Path(cfg.paths.output_dir))
    assert len(column(rows, "train/policy_reward")) == 8 and column(rows, "train/teacher_weight/narrow")


def test_weighting_callback_configs_instantiate(tmp_path: Path) -> None:
    import hydra

    from kd_lightning.callbacks.weighting import TeacherWeighting
    from tests.conftest import compose_config

    strategies = "callbacks=[confidence,ca_mkd,performance_gap,reinforced]"
    cfg = compose_config(["teacher=ensemble", strategies], tmp_path, tmp_path)
    built = {name: hydra.utils.instantiate(node) for name, node in cfg.callbacks.items()}
    assert set(built) == {"confidence", "ca_mkd", "performance_gap", "reinforced"}
    assert all(isinstance(cb, TeacherWeighting) for cb in built.values())
    assert [t.name for t in cfg.teacher.teachers] == ["moe", "dense"]
