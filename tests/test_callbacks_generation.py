"""On-policy (GKD) and adaptive off-policy (DistiLLM) training data from the student's own samples."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kd_lightning.callbacks import DistillmOffPolicy, OnPolicyGeneration
from kd_lightning.callbacks.generation import FRESH, REPLAY
from kd_lightning.losses import forward_kl
from kd_lightning.models import build_mlp
from kd_lightning.module import DistillationModule
from kd_lightning.run.pipeline import run
from tests.conftest import column, metrics_csv
from tests.helpers import SHORT, V, fake_trainer, tiny_lm

PAD, EOS = 0, 1
pytestmark = pytest.mark.filterwarnings(r"ignore:You are trying to `self.log\(\)`")


def lm_module() -> DistillationModule:
    student = tiny_lm(0)
    student.generation_config.pad_token_id, student.generation_config.eos_token_id = PAD, EOS
    return DistillationModule(student, tiny_lm(1), forward_kl)


def prompt_response_batch(L: int = 14) -> dict[str, torch.Tensor]:
    """Right-padded rows with prompts of 3, 5 and 2 tokens (the data modules' layout)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, V, (3, L), generator=g)
    lengths, prompts = torch.tensor([L, 9, 6]), torch.tensor([3, 5, 2])
    pos = torch.arange(L)
    real = pos[None] < lengths[:, None]
    ids = ids.masked_fill(~real, PAD)
    labels = ids.masked_fill(~real | (pos[None] < prompts[:, None]), -100)
    return {"input_ids": ids, "attention_mask": real.long(), "labels": labels, "prompt_lengths": prompts}


def started(callback, module: DistillationModule, trainer=None):
    trainer = trainer or fake_trainer(100)
    callback.setup(trainer, module, "fit")
    return trainer


# ---------------------------------------------------------------------------- on-policy
def test_on_policy_batch_holds_student_samples_after_unchanged_prompts() -> None:
    module = lm_module()
    module.train()
    with torch.no_grad():  # peaked logits: no near-ties, so tiny-temperature sampling is greedy
        module.student.lm_head.weight.mul_(100.0)
    callback = OnPolicyGeneration(lambda_on_policy=1.0, max_new_tokens=6, sampling_temperature=1e-3)
    trainer = started(callback, module)
    batch = prompt_response_batch()
    original = {k: v.clone() for k, v in batch.items()}
    rng = torch.get_rng_state()
    callback.on_train_batch_start(trainer, module, batch, 0)  # mutates the dict in place
    assert torch.equal(torch.get_rng_state(), rng) and module.student.training  # global RNG and mode untouched
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert ids.shape[1] <= original["input_ids"].shape[1]
    for row, p in enumerate(original["prompt_lengths"].tolist()):
        assert torch.equal(ids[row, :p], original["input_ids"][row, :p])  # prompt tokens unchanged
        assert (labels[row, :p] == -100).all()  # and masked
        n = int(mask[row].sum()) - p
        assert n > 0 and torch.equal(labels[row, p:p + n], ids[row, p:p + n])  # new tokens counted
        # Near-zero sampling temperature = greedy decoding: the tokens are the student's own.
        greedy = module.student.generate(input_ids=original["input_ids"][row:row + 1, :p], do_sample=False,
                                         max_new_tokens=n, pad_token_id=PAD, eos_token_id=EOS)
        assert torch.equal(ids[row, p:p + n], greedy[0, p:p + n])
    assert torch.isfinite(module.training_step(batch, 0))


def test_on_policy_packed_windows_use_the_first_tokens_and_mask_after_eos() -> None:
    module = lm_module()
    callback = OnPolicyGeneration(lambda_on_policy=1.0, max_new_tokens=5, prompt_length=4)
    trainer = started(callback, module)
    ids = torch.randint(3, V, (2, 12))
    batch = {"input_ids": ids.clone(), "attention_mask": torch.ones_like(ids), "labels": ids.clone(),
             "prompt_lengths": torch.zeros(2, dtype=torch.long)}
    continuation = torch.tensor([[7, 8, EOS, 9, 9], [5, 6, 7, 8, 9]])
    module.student.generate = lambda input_ids, **kw: torch.cat([input_ids, continuation], 1)
    callback.on_train_batch_start(trainer, module, batch, 0)
    assert torch.equal(batch["input_ids"][:, :4], ids[:, :4]) and (batch["labels"][:, :4] == -100).all()
    assert batch["input_ids"].shape == (2, 9)
    assert batch["labels"][0].tolist() == [-100] * 4 + [7, 8, EOS, -100, -100]  # EOS counts, padding not
    assert batch["attention_mask"][0].tolist() == [1] * 7 + [0, 0]
    assert batch["input_ids"][0, 7:].tolist() == [PAD, PAD] and batch["labels"][1, 4:].tolist() == [5, 6, 7, 8, 9]


def test_on_policy_probability_seeding_and_ranks() -> None:
    module = lm_module()
    never = OnPolicyGeneration(lambda_on_policy=0.0)
    trainer = started(never, module)
    batch = prompt_response_batch()
    before = batch["input_ids"].clone()
    for step in range(5):
        never.on_train_batch_start(trainer, module, batch, step)
    assert torch.equal(batch["input_ids"], before)

    def draws(rank: int, seed: int = 0) -> list[float]:
        callback = OnPolicyGeneration(seed=seed)
        callback.setup(fake_trainer(100, rank=rank), module, "fit")
        return [callback.uniform() for _ in range(8)]

    assert draws(0) == draws(0) != draws(1)  # seeded, and DDP ranks differ
    with pytest.raises(ValueError, match="needs a causal LM student"):
        classifier = DistillationModule(build_mlp([4], num_features=3, num_classes=2), build_mlp([4], num_features=3, num_classes=2), forward_kl)
        OnPolicyGeneration().setup(fake_trainer(1), classifier, "fit")
    with pytest.raises(ValueError, match="lambda_on_policy=1.5"):
        OnPolicyGeneration(lambda_on_policy=1.5)


# ---------------------------------------------------------------------------- DistiLLM off-policy
def test_offpolicy_threshold_zero_never_generates() -> None:
    module = lm_module()
    callback = DistillmOffPolicy(init_threshold=0.0)
    trainer = started(callback, module)
    callback.sample = lambda *a: pytest.fail("generated with threshold 0")
    batch = prompt_response_batch()
    for step in range(20):
        trainer.global_step = step
        callback.on_train_batch_start(trainer, module, batch, step)
    assert len(callback.buffer) == 0


def test_offpolicy_buffer_bounded_replays_and_round_trips() -> None:
    module = lm_module()
    callback = DistillmOffPolicy(init_threshold=1.0, capacity=5, max_new_tokens=4, seed=3)
    trainer = started(callback, module, fake_trainer(8))
    sources: list[int] = []
    callback.choose = lambda step, total: sources.append(DistillmOffPolicy.choose(callback, step, total)) or sources[-1]
    for step in range(8):
        trainer.global_step = step
        batch = prompt_response_batch()
        callback.on_train_batch_start(trainer, module, batch, step)
        assert len(callback.buffer) <= 5 and batch["input_ids"].shape[0] == 3
        assert ((batch["labels"] != -100) & (batch["attention_mask"] == 0)).sum() == 0
    assert len(callback.buffer) == 5 and {FRESH, REPLAY} <= set(sources)
    del callback.choose
    # Restore into a fresh callback: same buffer, threshold, previous loss and random stream.
    callback.update_threshold(2.0)
    state = callback.state_dict()
    resumed = DistillmOffPolicy(init_threshold=0.0, capacity=5, max_new_tokens=4)
    resumed.load_state_dict(state)
    assert resumed.threshold == 1.0 and resumed.prev_val_loss == 2.0 and len(resumed.buffer) == 5
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(resumed.buffer, callback.buffer))
    assert [resumed.choose(3, 8) for _ in range(6)] == [callback.choose(3, 8) for _ in range(6)]
    replayed = resumed.replay(3)
    assert replayed["input_ids"].shape[0] == 3 and (replayed["labels"][replayed["attention_mask"] == 0] == -100).all()


def test_offpolicy_choice_matches_the_reference_rule() -> None:
    callback = DistillmOffPolicy(init_threshold=0.4, capacity=2)
    callback.buffer.extend([{}, {}])  # full: fresh share theta*(1 - s/S), replay the rest of theta
    picks = torch.tensor([callback.choose(step=25, total=100) for _ in range(4000)])
    assert (picks == FRESH).float().mean() == pytest.approx(0.4 * 0.75, abs=0.03)
    assert (picks == REPLAY).float().mean() == pytest.approx(0.4 * 0.25, abs=0.03)
    callback.buffer.clear()  # not full: every student-data step generates
    assert all(callback.choose(step=99, total=100) != REPLAY for _ in range(200))


def test_offpolicy_threshold_rises_with_validation_loss_and_caps_at_one() -> None:
    callback = DistillmOffPolicy(init_threshold=0.75, loss_eps=0.1)
    trainer = fake_trainer(100)
    thresholds = []
    for loss in [2.0, 2.05, 2.12, 2.2, 2.3, 2.31, 2.5, 3.0, 4.0]:
        trainer.callback_metrics = {"val/student_loss": torch.tensor(loss)}
        callback.on_validation_end(trainer, None)
        thresholds.append(round(callback.threshold, 6))
    # 2.0 sets prev; 2.12 >= 2.1 raises (prev 2.12); 2.2 does not (< 2.22); 2.3 raises; 2.5, 3.0 cap.
    assert thresholds == [0.75, 0.75, 0.85, 0.85, 0.95, 0.95, 1.0, 1.0, 1.0]
    trainer.sanity_checking = True
    trainer.callback_metrics = {"val/student_loss": torch.tensor(9.0)}
    before = callback.prev_val_loss
    callback.on_validation_end(trainer, None)
    assert callback.prev_val_loss == before


# ---------------------------------------------------------------------------- end to end
def test_on_policy_end_to_end(make_cfg) -> None:
    cfg = make_cfg("callbacks=[on_policy]", "loss=reverse_kl", "baseline=false", *SHORT,
                   "callbacks.on_policy.max_new_tokens=8", "callbacks.on_policy.prompt_length=16")
    run(cfg)
    rows = metrics_csv(Path(cfg.paths.output_dir))
    flags, seconds = column(rows, "train/on_policy"), column(rows, "train/generation_seconds")
    assert len(flags) == 4 and set(flags) == {0.0, 1.0}
    assert all((s > 0) == (f == 1.0) for f, s in zip(flags, seconds))


def test_distillm_offpolicy_end_to_end_saves_its_buffer(make_cfg) -> None:
    cfg = make_cfg("callbacks=[distillm_offpolicy]", "loss=skew_reverse_kl", "baseline=false", *SHORT,
                   "callbacks.distillm_offpolicy.init_threshold=1.0", "callbacks.distillm_offpolicy.capacity=8",
                   "callbacks.distillm_offpolicy.max_new_tokens=8")
    run(cfg)
    out = Path(cfg.paths.output_dir)
    rows = metrics_csv(out)
    assert set(column(rows, "train/student_data")) == {1.0, 2.0}  # fresh samples, then replays
    assert max(column(rows, "train/replay_buffer_size")) == 8
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    (state,) = [v for k, v in ckpt["callbacks"].items() if "DistillmOffPolicy" in k]
    assert len(state["buffer"]) == 8 and state["threshold"] == 1.0
