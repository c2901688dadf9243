"""KD paths run on a `StepInputs` value, without a DistillationModule, against independent formulas."""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F

from kd_lightning.kd_paths import ChunkedKD, CrossTokenizerKD, DenseKD
from kd_lightning.losses import forward_kl, reverse_kl
from kd_lightning.step import StepInputs, bind_loss
from kd_lightning.tasks import CausalLM, Classification
from tests.helpers import lm_batch, tiny_lm


def kl_rows(student: torch.Tensor, teacher: torch.Tensor, T: float) -> torch.Tensor:
    """Σ_v p (log p − log q) per row, float64, both distributions at temperature T."""
    log_p, log_q = torch.log_softmax(teacher.double() / T, -1), torch.log_softmax(student.double() / T, -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def classifier_step(loss_fn, teachers, weights, T=2.0) -> StepInputs:
    torch.manual_seed(0)
    labels = torch.tensor([0, 3, -100, 2, 4, 1])
    batch = {"inputs": torch.randn(6, 4), "labels": labels}
    return StepInputs(batch, labels, labels != -100, Classification, torch.nn.Linear(4, 5), teachers,
                      loss_fn, T, ce_in_loss=True, teacher_weights=torch.tensor(weights))


@pytest.mark.parametrize("loss_fn", [forward_kl, lambda *a, **k: forward_kl(*a, **k)], ids=["fast", "reference"])
def test_dense_path_without_a_module_equals_the_formula(loss_fn) -> None:
    torch.manual_seed(1)
    teacher = torch.nn.Linear(4, 5).requires_grad_(False)
    step = classifier_step(loss_fn, {"teacher": teacher}, [1.0])
    terms = DenseKD("mixture", "error")(step)
    m = step.mask
    s, t = step.student(step.batch["inputs"])[m], teacher(step.batch["inputs"])[m]
    torch.testing.assert_close(terms.kd.double(), kl_rows(s, t, 2.0).mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms.ce_sum.double(), F.cross_entropy(s.double(), step.labels[m], reduction="sum"),
                               rtol=1e-5, atol=1e-6)
    assert terms.kd.requires_grad and terms.teacher_names == ["teacher"]


def test_two_teachers_weighted_losses_without_a_module() -> None:
    torch.manual_seed(2)
    teachers = {"a": torch.nn.Linear(4, 5).requires_grad_(False), "b": torch.nn.Linear(4, 5).requires_grad_(False)}
    step = classifier_step(forward_kl, teachers, [0.25, 0.75], T=1.5)
    terms = DenseKD("losses", "error")(step)
    x, m = step.batch["inputs"][step.mask], step.mask
    want = sum(w * kl_rows(step.student(x), t(x), 1.5).mean() for w, t in zip((0.25, 0.75), teachers.values()))
    torch.testing.assert_close(terms.kd.double(), want, rtol=1e-5, atol=1e-6)
    assert terms.teacher_token_ce.shape == (2, int(m.sum()))


def test_chunked_path_without_a_module_equals_the_formula() -> None:
    student, teacher = tiny_lm(0), tiny_lm(1, hidden=48).requires_grad_(False)
    batch = lm_batch()
    labels = CausalLM.labels(batch)
    loss = bind_loss(reverse_kl, {})
    step = StepInputs(batch, labels, labels != -100, CausalLM, student, {"teacher": teacher}, loss, 1.7,
                      ce_in_loss=False, teacher_weights=torch.ones(1))
    terms = ChunkedKD(4)(step)
    m = step.mask
    s = student(input_ids=batch["input_ids"]).logits[:, :-1][m]
    t = teacher(input_ids=batch["input_ids"]).logits[:, :-1][m]
    log_p, log_q = torch.log_softmax(t.double() / 1.7, -1), torch.log_softmax(s.double() / 1.7, -1)
    want = (log_q.exp() * (log_q - log_p)).sum(-1).mean()
    torch.testing.assert_close(terms.kd.double(), want, rtol=1e-5, atol=1e-6)
    assert terms.ce_sum is None
    torch.testing.assert_close(terms.student_token_ce.double(), F.cross_entropy(s.double(), labels[m], reduction="none"),
                               rtol=1e-5, atol=1e-6)


def test_path_checks_refuse_what_they_cannot_serve() -> None:
    student, teacher = tiny_lm(0), tiny_lm(1)
    with pytest.raises(ValueError, match="exactly one teacher without a weighting callback"):
        ChunkedKD(4).check(student, {"teacher": teacher}, weighted=True)
    with pytest.raises(ValueError, match="exactly one teacher"):
        ChunkedKD(4).check(student, {"a": teacher, "b": tiny_lm(2)}, weighted=False)
    ChunkedKD(4).check(student, {"teacher": teacher}, weighted=False)
    with pytest.raises(ValueError, match="teacher-weighting callbacks do not apply"):
        CrossTokenizerKD(None).check(student, {"teacher": teacher}, weighted=True)
    with pytest.raises(ValueError, match="post-processes its logits"):
        teacher.config.logit_scale = 0.5
        ChunkedKD(4).check(student, {"teacher": teacher}, weighted=False)


def test_the_module_builds_the_inputs_its_path_reads() -> None:
    from kd_lightning.module import DistillationModule

    module = DistillationModule(tiny_lm(0), tiny_lm(1), partial(forward_kl), ce_weight=0.0, kd_temperature=3.0)
    module.loss_params = {"value_form": "ce"}
    batch = lm_batch()
    labels = module.adapter.labels(batch)
    step = module.step_inputs(batch, labels, module.adapter.mask(labels))
    assert step.kd_temperature == 3.0 and not step.ce_in_loss and step.loss_fn.keywords == {"value_form": "ce"}
    assert step.teachers is module.teachers and int(step.token_count) == int((labels != -100).sum())


def test_paths_do_not_import_the_module() -> None:
    """Paths read values: neither they nor the step values import the LightningModule, even for types."""
    import ast
    from pathlib import Path

    package = Path(__file__).resolve().parents[1] / "kd_lightning"
    for name in ("kd_paths.py", "step.py"):
        tree = ast.parse((package / name).read_text())
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        imported |= {a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
        assert "kd_lightning.module" not in imported, name
