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

V = 40

# The step is called outside a Trainer here; Lightning warns that self.log has no trainer yet.
pytestmark = pytest.mark.filterwarnings(r"ignore:You are trying to `self.log\(\)`")


def tiny_lm(seed: int, hidden: int = 32) -> torch.nn.Module:
    config = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    return build_causal_lm(config, vocab_size=V, seed=seed)


def lm_batch(seed: int = 0, B: int = 3, L: int = 9) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (B, L), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt
    labels[2, -3:] = -100  # padding
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


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
    got = module._step(batch)
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
    assert torch.allclose(module._step(batch), module._step(changed))
    # ...while changing a counted label does change it.
    changed["labels"][1, 5] = (changed["labels"][1, 5] + 1) % V
    changed["input_ids"][1, 5] = changed["labels"][1, 5]
    assert not torch.allclose(module._step(batch), module._step(changed))


def test_all_masked_batch_gives_zero_with_warning() -> None:
    module = DistillationModule(tiny_lm(0), tiny_lm(1), forward_kl, ce_weight=1.0)
    batch = lm_batch()
    batch["labels"][:] = -100
    with pytest.warns(UserWarning, match="every label is masked"):
        loss = module._step(batch)
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
    module._step(lm_batch()).backward()
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
    kd = module._step(batch)
    s = student(input_ids=batch["input_ids"]).logits[:, :-1].double()
    m = batch["labels"][:, 1:] != -100
    p = 0.25 * torch.softmax(t1(input_ids=batch["input_ids"]).logits[:, :-1].double(), -1) + \
        0.75 * torch.softmax(t2(input_ids=batch["input_ids"]).logits[:, :-1].double(), -1)
    want = (p[m] * (p[m].log() - torch.log_softmax(s[m], -1))).sum(-1).mean()
    assert torch.allclose(kd.double(), want, rtol=1e-5)
    # "losses" combination: weighted sum of per-teacher divergences, which is larger (convexity).
    module.teacher_combine = "losses"
    assert module._step(batch) > kd


def test_classifier_student_and_teacher() -> None:
    student = build_mlp([16], num_features=8, num_classes=5, seed=0)
    teacher = build_mlp([64], num_features=8, num_classes=5, seed=1)
    module = DistillationModule(student, teacher, forward_kl, kd_weight=1.0, ce_weight=1.0, kd_temperature=4.0)
    assert module.task == "classification"
    batch = {"inputs": torch.randn(6, 8), "labels": torch.randint(0, 5, (6,))}
    loss = module._step(batch)
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
        loss = module._step(batch)
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
        DistillationModule(student, Broken(tiny_lm(1)), forward_kl)._step(lm_batch())
    with pytest.warns(UserWarning, match="skipping this batch"):
        assert DistillationModule(student, Broken(tiny_lm(1)), forward_kl, nonfinite_teacher="skip")._step(lm_batch()) is None
    # -inf logits (tokens the teacher rules out) are legitimate.
    teacher = tiny_lm(1)
    with torch.no_grad():
        teacher.lm_head.bias = None
        teacher.lm_head.weight[7] = 0.0
    module = DistillationModule(student, teacher, forward_kl)
    assert torch.isfinite(module._step(lm_batch()))


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
