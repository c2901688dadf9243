"""DistillationModule in isolation: the training step's equation, masking, freezing, checkpoints."""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig

from kd_lightning.losses import forward_kl, reverse_kl
from kd_lightning.models import build_causal_lm, build_mlp
from kd_lightning.module import DistillationModule
from tests.helpers import V, lm_batch, tiny_lm

# The step is called outside a Trainer here; Lightning warns that self.log has no trainer yet.
pytestmark = pytest.mark.filterwarnings(r"ignore:You are trying to `self.log\(\)`")


def reference_loss(student, teacher, batch, kd_weight, ce_weight, T):
    """Independent formula: shift, mask, forward KL at temperature T times T^2, plus CE."""
    s = student(input_ids=batch["input_ids"]).logits[:, :-1].double()
    t = teacher(input_ids=batch["input_ids"]).logits[:, :-1].double()
    y = batch["labels"][:, 1:]
    m = y != -100
    p = torch.softmax(t[m] / T, -1)
    kl = (p * (torch.log(p) - torch.log_softmax(s[m] / T, -1))).sum(-1).mean()
    ce = F.cross_entropy(s[m], y[m])
    return kd_weight * T**2 * kl + ce_weight * ce


@pytest.mark.parametrize("T", [1.0, 2.5])
def test_training_step_matches_equation(T: float) -> None:
    student, teacher = tiny_lm(0), tiny_lm(1, hidden=48)
    module = DistillationModule(student, teacher, forward_kl, kd_weight=0.7, ce_weight=0.3, kd_temperature=T)
    batch = lm_batch()
    got = module.training_step(batch, 0)
    want = reference_loss(student, teacher.eval(), batch, 0.7, 0.3, T)
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-6)
    assert set(module.last_step) >= {"student_ce", "kd_loss", "teacher_ce", "token_count", "teacher_token_ce"}
    assert int(module.last_step["token_count"]) == int((batch["labels"][:, 1:] != -100).sum())


def test_masked_positions_do_not_change_the_loss() -> None:
    module = DistillationModule(tiny_lm(0), tiny_lm(1), reverse_kl, ce_weight=0.5)
    batch = lm_batch()
    changed = {k: v.clone() for k, v in batch.items()}
    # Input tokens at the end of row 2 only feed masked predictions (causal model, labels -100 there).
    changed["input_ids"][2, -2:] = (changed["input_ids"][2, -2:] + 5) % V
    assert torch.allclose(module.training_step(batch, 0), module.training_step(changed, 0))
    # ...while changing a counted label does change it.
    changed["labels"][1, 5] = (changed["labels"][1, 5] + 1) % V
    changed["input_ids"][1, 5] = changed["labels"][1, 5]
    assert not torch.allclose(module.training_step(batch, 0), module.training_step(changed, 0))


def test_all_masked_batch_gives_zero_with_warning() -> None:
    module = DistillationModule(tiny_lm(0), tiny_lm(1), forward_kl, ce_weight=1.0)
    batch = lm_batch()
    batch["labels"][:] = -100
    with pytest.warns(UserWarning, match="every label is masked"):
        loss = module.training_step(batch, 0)
    assert loss.item() == 0.0 and torch.isfinite(loss)
    loss.backward()  # graph is valid


def test_teachers_frozen_out_of_optimizer_and_checkpoint() -> None:
    student, teacher = tiny_lm(0), tiny_lm(1)
    module = DistillationModule(student, teacher, forward_kl)
    module.train()
    assert not teacher.training and all(not p.requires_grad for p in teacher.parameters())
    opt = module.configure_optimizers()
    opt_params = {id(p) for group in opt.param_groups for p in group["params"]}
    assert opt_params == {id(p) for p in student.parameters()}
    module.training_step(lm_batch(), 0).backward()
    assert all(p.grad is None for p in teacher.parameters())
    ckpt = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt)
    assert ckpt["state_dict"] and not any(k.startswith("teachers.") for k in ckpt["state_dict"])
    module.on_load_checkpoint(ckpt)  # teacher weights are filled back for strict loading
    module.load_state_dict(ckpt["state_dict"], strict=True)


def test_two_teacher_mixture_equals_kl_to_average_distribution() -> None:
    student, t1, t2 = tiny_lm(0), tiny_lm(1), tiny_lm(2)
    module = DistillationModule(student, {"a": t1, "b": t2}, forward_kl, teacher_weights=[0.25, 0.75])
    batch = lm_batch()
    kd = module.training_step(batch, 0)
    s = student(input_ids=batch["input_ids"]).logits[:, :-1].double()
    m = batch["labels"][:, 1:] != -100
    p = 0.25 * torch.softmax(t1(input_ids=batch["input_ids"]).logits[:, :-1].double(), -1) + \
        0.75 * torch.softmax(t2(input_ids=batch["input_ids"]).logits[:, :-1].double(), -1)
    want = (p[m] * (p[m].log() - torch.log_softmax(s[m], -1))).sum(-1).mean()
    assert torch.allclose(kd.double(), want, rtol=1e-5)
    # "losses" combination: weighted sum of per-teacher divergences, which is larger (convexity).
    losses = DistillationModule(student, {"a": t1, "b": t2}, forward_kl, teacher_weights=[0.25, 0.75],
                                teacher_combine="losses")
    assert losses.training_step(batch, 0) > kd


def test_classifier_student_and_teacher() -> None:
    student = build_mlp([16], num_features=8, num_classes=5, seed=0)
    teacher = build_mlp([64], num_features=8, num_classes=5, seed=1)
    module = DistillationModule(student, teacher, forward_kl, kd_weight=1.0, ce_weight=1.0, kd_temperature=4.0)
    assert module.task == "classification"
    batch = {"inputs": torch.randn(6, 8), "labels": torch.randint(0, 5, (6,))}
    loss = module.training_step(batch, 0)
    s, t = student(batch["inputs"]).double(), teacher(batch["inputs"]).double()
    p = torch.softmax(t / 4, -1)
    kl = (p * (p.log() - torch.log_softmax(s / 4, -1))).sum(-1).mean()
    assert torch.allclose(loss.double(), 16 * kl + F.cross_entropy(s, batch["labels"]), rtol=1e-5)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in student.parameters())


@pytest.mark.parametrize("kwargs, match", [
    ({"teacher_combine": "vote"}, "teacher_combine"),
    ({"kd_temperature": 0.0}, "kd_temperature"),
    ({"teacher_weights": [1.0, 2.0]}, "teacher_weights"),
])
def test_bad_arguments_fail_clearly(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DistillationModule(tiny_lm(0), tiny_lm(1), partial(forward_kl), **kwargs)


@pytest.mark.parametrize("loss_fn", [forward_kl, partial(reverse_kl)])
def test_chunked_path_matches_plain_loss_and_gradients(loss_fn) -> None:
    torch.manual_seed(0)
    student, teacher = tiny_lm(0), tiny_lm(1, hidden=48)
    batch = lm_batch()
    grads = []
    for chunk_size in (None, 5):
        module = DistillationModule(student, teacher, loss_fn, ce_weight=0.4, kd_temperature=2.0, chunk_size=chunk_size)
        student.zero_grad()
        loss = module.training_step(batch, 0)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in student.parameters()]))
        assert torch.allclose(module.last_step["student_ce"], grads[0][0].new_tensor(module.last_step["student_ce"]))
    (plain, plain_grads), (chunked, chunked_grads) = grads
    assert torch.allclose(plain, chunked, rtol=1e-5, atol=1e-7)
    for a, b in zip(plain_grads, chunked_grads):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)


def test_nonfinite_teacher_logits_stop_or_skip_naming_the_step() -> None:
    class Broken(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner
            self.generate = inner.generate

        def forward(self, **kwargs):
            out = self.inner(**kwargs)
            out.logits[0, 5, 3] = float("nan")
            return out

    student = tiny_lm(0)
    with pytest.raises(FloatingPointError, match=r"step 0: teacher\(s\) \['teacher'\] produced NaN"):
        DistillationModule(student, Broken(tiny_lm(1)), forward_kl).training_step(lm_batch(), 0)
    with pytest.warns(UserWarning, match="skipping this batch"):
        assert DistillationModule(student, Broken(tiny_lm(1)), forward_kl, nonfinite_teacher="skip").training_step(lm_batch(), 0) is None



def test_teacher_ruling_tokens_out_with_minus_inf_logits_is_legitimate() -> None:
    class RulesOut(torch.nn.Module):  # token 7 gets probability exactly 0
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner, self.generate = inner, inner.generate

        def forward(self, **kwargs):
            out = self.inner(**kwargs)
            out.logits[..., 7] = float("-inf")
            return out

    student, teacher, batch = tiny_lm(0), RulesOut(tiny_lm(1)), lm_batch()
    assert torch.isneginf(teacher(input_ids=batch["input_ids"]).logits[..., 7]).all()
    module = DistillationModule(student, teacher, forward_kl, kd_weight=1.0, ce_weight=0.0)
    loss = module.training_step(batch, 0)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in student.parameters() if p.grad is not None)
    # Independent formula: 0 · log 0 = 0, so token 7 contributes nothing.
    s = student(input_ids=batch["input_ids"]).logits[:, :-1].double()
    t = teacher(input_ids=batch["input_ids"]).logits[:, :-1].double()
    m = batch["labels"][:, 1:] != -100
    p = torch.softmax(t[m], -1)
    want = (torch.xlogy(p, p) - p * torch.log_softmax(s[m], -1)).sum(-1).mean()
    assert torch.allclose(loss.double(), want, rtol=1e-5, atol=1e-6)


def test_evaluate_reports_binned_expected_calibration_error() -> None:
    from kd_lightning.evaluate import ECE_BINS, evaluate

    model = build_mlp([8], num_features=4, num_classes=3, seed=0)
    g = torch.Generator().manual_seed(0)
    batches = [{"inputs": torch.randn(50, 4, generator=g), "labels": torch.randint(0, 3, (50,), generator=g)}]
    result = evaluate(model, batches, "classification")
    with torch.no_grad():
        probs = torch.softmax(model(batches[0]["inputs"]), -1)
    confidence, prediction = probs.max(-1)
    correct = (prediction == batches[0]["labels"]).float()
    ece = 0.0
    for b in range(ECE_BINS):  # equal-width bins (lo, hi]
        in_bin = (confidence > b / ECE_BINS) & (confidence <= (b + 1) / ECE_BINS)
        if in_bin.any():
            ece += in_bin.float().mean() * (confidence[in_bin].mean() - correct[in_bin].mean()).abs()
    assert abs(result["ece"] - float(ece)) < 1e-6


def test_per_example_weights_of_one_teacher_come_out_per_teacher() -> None:
    """`last_step["teacher_weights"]` is [K] (batch mean), as kd_lightning.interface documents,
    also for one teacher whose weighting callback returns per-example weights [B, 1]."""
    module = DistillationModule(tiny_lm(0), tiny_lm(1), forward_kl)
    module.teacher_weight_fn = lambda teachers, student, labels, mask: torch.ones(student.shape[0], 1)
    module.training_step(lm_batch(B=3), 0)
    assert module.last_step["teacher_weights"].shape == (1,)
    assert torch.allclose(module.last_step["teacher_weights"], torch.ones(1))


def test_sar_parameters_are_declared_and_kept_in_checkpoints() -> None:
    """Teacher parameters a callback declares are trainable and checkpointed; the rest are not."""
    student, teacher = tiny_lm(0), tiny_lm(1)
    module = DistillationModule(student, teacher, forward_kl)
    module.train_teacher_parameters("teacher", [teacher.lm_head.weight])
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    kept = [k for k in checkpoint["state_dict"] if k.startswith("teachers.")]
    assert kept == ["teachers.teacher.lm_head.weight"] and teacher.lm_head.weight.requires_grad
    assert not teacher.model.embed_tokens.weight.requires_grad


def _grads(module: DistillationModule, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    module.student.zero_grad(set_to_none=True)
    loss = module.training_step(batch, 0)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in module.student.parameters() if p.grad is not None]


@pytest.mark.parametrize("loss_name, params, chunk_size", [
    ("forward_kl", {}, None), ("reverse_kl", {}, None), ("skew_kl", {"alpha": 0.2}, None),
    ("taid", {}, None), ("jensen_shannon", {}, None), ("forward_kl", {}, 5), ("skew_reverse_kl", {"alpha": 0.3}, 5),
])
def test_fast_kd_path_equals_the_reference_loss_in_the_module(loss_name: str, params: dict, chunk_size) -> None:
    """The module routes losses with a fast kernel through it; the same loss hidden behind a wrapper
    (no fast kernel known) takes the reference path: same loss and student gradients."""
    import kd_lightning.losses as losses

    fn = partial(getattr(losses, loss_name), **params)

    def opaque(*args, **kwargs):  # supports_fast does not know it: reference path
        return fn(*args, **kwargs)

    batch = lm_batch()
    results = []
    for loss_fn in (fn, opaque):
        module = DistillationModule(tiny_lm(0), tiny_lm(1, hidden=48), loss_fn, kd_weight=0.7, ce_weight=0.3,
                                    kd_temperature=2.0, chunk_size=chunk_size)
        if loss_name == "taid":
            module.loss_params = {"interpolation": 0.4}  # what the TAID callback sets every step
        results.append(_grads(module, batch))
    (fast_loss, fast_grads), (ref_loss, ref_grads) = results
    assert torch.allclose(fast_loss, ref_loss, rtol=1e-5, atol=1e-6)
    for a, b in zip(fast_grads, ref_grads):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_ce_weight_zero_builds_no_ce_graph_and_keeps_the_statistics() -> None:
    module = DistillationModule(tiny_lm(0), tiny_lm(1), forward_kl, kd_weight=1.0, ce_weight=0.0)
    batch = lm_batch()
    labels = module.adapter.labels(batch)
    mask = module.adapter.mask(labels)
    terms = module.kd_path(module.step_inputs(batch, labels, mask))
    assert terms.ce_sum is None and not terms.student_token_ce.requires_grad
    want = F.cross_entropy(module.student_logits(batch)[:, :-1][mask].float(), labels[mask], reduction="none")
    assert torch.allclose(terms.student_token_ce, want.detach(), rtol=1e-5, atol=1e-6)
    assert terms.teacher_token_ce.shape == (1, int(mask.sum()))
