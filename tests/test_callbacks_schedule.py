"""Temperature schedules (linear, cosine, DTS) and the TAID interpolation schedule."""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from kd_lightning.callbacks import CosineTemperature, DynamicTemperature, LinearTemperature, TAIDSchedule
from kd_lightning.callbacks.temperature import dts_scale
from kd_lightning.losses import forward_kl, taid
from kd_lightning.models import build_mlp
from kd_lightning.module import DistillationModule
from kd_lightning.run.pipeline import run
from tests.conftest import column, metrics_csv
from tests.helpers import SHORT, V, fake_trainer, tiny_lm

# Callbacks log through the module; driven outside a Trainer, Lightning warns and drops the value.
pytestmark = pytest.mark.filterwarnings(r"ignore:You are trying to `self.log\(\)`")
def lm_module(loss=forward_kl) -> DistillationModule:
    return DistillationModule(tiny_lm(0), tiny_lm(1), loss)


# ---------------------------------------------------------------------------- linear / cosine
@pytest.mark.parametrize("cls", [LinearTemperature, CosineTemperature])
def test_schedules_hit_both_end_points(cls) -> None:
    module, trainer = lm_module(), fake_trainer(max_steps=11)
    schedule = cls(start=4.0, end=1.5)
    schedule.setup(trainer, module, "fit")
    seen = []
    for step in range(11):
        trainer.global_step = step
        schedule.on_train_batch_start(trainer, module, {}, step)
        seen.append(module.kd_temperature)
    assert seen[0] == 4.0 and seen[-1] == 1.5
    assert all(a >= b for a, b in zip(seen, seen[1:]))
    assert seen[5] == pytest.approx(2.75)  # both are symmetric about the middle step


@pytest.mark.parametrize("make, message", [
    (lambda: LinearTemperature(start=0.0, end=1.0), "start=0.0"),
    (lambda: DynamicTemperature(t_min=3.0, t_max=2.0), "t_min=3.0"),
    (lambda: DynamicTemperature(scale_rule="fancy"), "scale_rule='fancy'"),
    (lambda: DynamicTemperature(momentum=1.0), "momentum=1.0"),
    (lambda: TAIDSchedule(t_start=1.0), "t_start=1.0"),
    (lambda: TAIDSchedule(t_start=0.5, t_end=0.3), "t_end=0.3"),
    (lambda: TAIDSchedule(beta=1.5), "beta=1.5"),
])
def test_arguments_are_validated(make, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()


def test_schedule_refuses_a_module_without_the_interface() -> None:
    with pytest.raises(TypeError, match="DynamicTemperature needs a kd_lightning DistillationModule"):
        DynamicTemperature().setup(fake_trainer(5), torch.nn.Linear(2, 2), "fit")


# ---------------------------------------------------------------------------- DTS
def dts_step(dts: DynamicTemperature, module: DistillationModule, trainer, teacher_ce: float, student_ce: float) -> float:
    dts.on_train_batch_start(trainer, module, {}, 0)
    module.last_step = {"teacher_ce": torch.tensor([teacher_ce, teacher_ce]), "student_ce": torch.tensor(student_ce)}
    trainer.global_step += 1
    dts.on_train_batch_end(trainer, module, None, {}, 0)
    return dts.temperature


def test_dts_ema_moves_exactly_ten_percent_toward_the_target() -> None:
    module, trainer = lm_module(), fake_trainer(max_steps=101)
    dts = DynamicTemperature(initial=2.0, t_min=0.5, t_max=8.0)
    dts.setup(trainer, module, "fit")
    before = dts.temperature
    after = dts_step(dts, module, trainer, teacher_ce=1.0, student_ce=3.0)  # student 2 nats behind
    cosine = 0.5 * (1 + math.cos(math.pi * 1 / 100))
    target = 2.0 * cosine * (1 + 2 / 3)  # smooth scale 1 + g/(1+g) at g = 2
    assert after - before == pytest.approx(0.1 * (target - before), rel=1e-12)
    assert module.kd_temperature == before  # the step that produced the gap used the old T


def test_dts_follows_the_gap_and_stays_in_bounds() -> None:
    module, trainer = lm_module(), fake_trainer(max_steps=10**6)  # cosine ~ constant
    dts = DynamicTemperature(initial=2.0, t_min=1.0, t_max=3.5)
    temps = [dts_step(dts, module, trainer, 1.0, 1.0 + gap) for gap in [0.2] * 5 + [2.0] * 5 + [0.1] * 5]
    assert all(b > a for a, b in zip(temps[4:9], temps[5:10]))  # gap grew: T rises
    assert all(b < a for a, b in zip(temps[9:14], temps[10:15]))  # gap shrank: T falls
    # Larger gap, larger next T (from the same state).
    small, large = DynamicTemperature(initial=2.0, t_max=4.0), DynamicTemperature(initial=2.0, t_max=4.0)
    assert dts_step(large, module, fake_trainer(1000), 1.0, 4.0) > dts_step(small, module, fake_trainer(1000), 1.0, 2.0)
    # Random gaps over a whole run never leave [min(T0, t_min), max(T0, t_max)].
    g = torch.Generator().manual_seed(0)
    dts, trainer = DynamicTemperature(initial=2.0, t_min=1.0, t_max=3.0), fake_trainer(max_steps=60)
    for _ in range(60):
        gap = float(torch.randn((), generator=g) * 3)
        assert 1.0 <= dts_step(dts, module, trainer, 1.0, 1.0 + gap) <= 3.0


def test_dts_legacy_rule_is_the_reference_and_not_monotone() -> None:
    assert [dts_scale(d, "legacy") for d in (-0.5, -1.5, -2.0, -3.0, 1.0)] == [1.0, 1.35, 2.0, 1.5, 1.0]
    assert dts_scale(-1.0, "legacy") == 1.0  # a division by zero in the reference
    smooth = [dts_scale(-g, "smooth") for g in (0.0, 0.5, 1.5, 2.0, 3.0, 50.0)]
    assert smooth[0] == 1.0 and all(b > a for a, b in zip(smooth, smooth[1:])) and smooth[-1] < 2.0
    assert dts_scale(-5.0, "none") == 1.0


def test_dts_state_round_trip_continues_identically() -> None:
    module, trainer = lm_module(), fake_trainer(max_steps=20)
    dts = DynamicTemperature(initial=2.0, t_min=1.0, t_max=3.0)
    for gap in (0.5, 1.5, 3.0):
        dts_step(dts, module, trainer, 1.0, 1.0 + gap)
    resumed = DynamicTemperature(initial=2.0, t_min=1.0, t_max=3.0)
    resumed.load_state_dict(dts.state_dict())
    resumed.on_train_batch_start(trainer, module, {}, 0)
    assert module.kd_temperature == dts.temperature != 2.0
    other = SimpleNamespace(**vars(trainer))
    assert dts_step(resumed, module, other, 1.0, 2.0) == dts_step(dts, module, trainer, 1.0, 2.0)


def test_dts_with_a_real_trainer_on_a_classifier_logs_the_temperature_it_used(tmp_path: Path) -> None:
    student = build_mlp([8], num_features=6, num_classes=4, seed=0)
    teacher = build_mlp([32], num_features=6, num_classes=4, seed=1)
    module = DistillationModule(student, teacher, forward_kl, kd_temperature=4.0)
    g = torch.Generator().manual_seed(0)
    data = [{"inputs": torch.randn(6, generator=g), "labels": torch.randint(0, 4, (), generator=g)} for _ in range(64)]

    class Record(L.Callback):
        def __init__(self) -> None:
            self.used: list[float] = []
            self.logged: list[float] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if "train/temperature" in trainer.callback_metrics:  # the previous step's logged value
                self.logged.append(float(trainer.callback_metrics["train/temperature"]))

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.used.append(pl_module.kd_temperature)

    dts, record = DynamicTemperature(initial=4.0, t_min=2.0, t_max=4.0), Record()
    trainer = L.Trainer(max_steps=8, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[record, dts], default_root_dir=tmp_path)
    trainer.fit(module, DataLoader(data, batch_size=8))
    assert record.used[0] == 4.0 and record.logged == pytest.approx(record.used[:-1], rel=1e-6)  # logged as float32
    assert record.used[-1] < 3.5 and min(record.used) >= 2.0  # cosine decay towards t_min


def test_dts_end_to_end_with_moe_teacher(make_cfg) -> None:
    cfg = make_cfg("temperature=dts", "loss=skew_kl", "teacher=moe", "baseline=false", *SHORT)
    run(cfg)
    temps = column(metrics_csv(Path(cfg.paths.output_dir)), "train/temperature")
    assert len(temps) == 4 and temps[0] == 2.0 and len(set(temps)) > 1
    assert all(1.0 <= t <= 3.0 for t in temps)


# ---------------------------------------------------------------------------- TAID
def taid_run(schedule: TAIDSchedule, losses: list[float], max_steps: int, module=None) -> list[float]:
    """Drive the schedule like the Trainer: t is set before each step, updated after it."""
    module = module or lm_module()
    trainer = fake_trainer(max_steps)
    schedule.setup(trainer, module, "fit")
    used = []
    for loss in losses:
        schedule.on_train_batch_start(trainer, module, {}, trainer.global_step)
        used.append(module.loss_params["interpolation"])
        module.last_step = {"kd_loss": torch.tensor(loss)}
        trainer.global_step += 1
        schedule.on_train_batch_end(trainer, module, None, {}, 0)
    assert trainer.strategy.reduced == ["mean"] * len(losses)  # DDP-ready: ranks share the mean loss
    return used


def reference_taid(losses: list[float], t0: float, alpha: float, beta: float) -> list[float]:
    """Independent transcription of the rule with the linear floor out of reach."""
    t, m, prev, out = t0, 0.0, None, []
    for loss in losses:
        out.append(t)
        if prev is not None:
            m = beta * m + (1 - beta) * (prev - loss) / (prev + 1e-15)
            t = t + alpha * (1 / (1 + math.exp(-m))) * (1 - t)
        prev = loss
    return out


def test_taid_step_follows_the_momentum_of_relative_improvement() -> None:
    improving = [2.0 * 0.9**k for k in range(12)]
    worsening = [2.0 * 1.1**k for k in range(12)]
    big = 10**9  # linear floor negligible: only the adaptive term moves t
    up = taid_run(TAIDSchedule(t_start=0.4, alpha=0.05, beta=0.9), improving, big)
    down = taid_run(TAIDSchedule(t_start=0.4, alpha=0.05, beta=0.9), worsening, big)
    assert up[1] == up[0] == 0.4  # first call never changes t
    assert up == pytest.approx(reference_taid(improving, 0.4, 0.05, 0.9), abs=1e-6)
    assert down == pytest.approx(reference_taid(worsening, 0.4, 0.05, 0.9), abs=1e-6)
    assert up[-1] - up[0] > down[-1] - down[0] > 0
    # Each step size is alpha * sigmoid(m) * (1 - t): larger with improving momentum.
    assert all(b - a > d - c for a, b, c, d in zip(up[2:], up[3:], down[2:], down[3:]))


def test_taid_monotone_above_linear_and_reaches_t_end() -> None:
    g = torch.Generator().manual_seed(0)
    losses = (torch.rand(40, generator=g) * 3 + 0.5).tolist()
    schedule = TAIDSchedule(t_start=0.2, t_end=0.9, alpha=0.05)
    used = taid_run(schedule, losses, max_steps=40)
    linear = [0.2 + 0.7 * s / 39 for s in range(40)]  # floor after step s
    after = used[1:] + [schedule.interpolation]  # t after the update of step s
    assert all(b >= a for a, b in zip(after, after[1:])) and used[1] == used[0] == 0.2
    assert all(t >= lin - 1e-12 for t, lin in zip(after, linear))
    assert schedule.interpolation == 0.9  # reaches t_end at the end of training, never beyond
    fixed = taid_run(TAIDSchedule(t_start=0.2, t_end=0.9, disable_adaptive=True), losses, max_steps=40)
    assert fixed == pytest.approx([0.2] + linear[:-1])


def test_taid_sets_interpolation_before_the_first_step_and_round_trips() -> None:
    module = lm_module(loss=partial(taid))
    schedule = TAIDSchedule()
    taid_run(schedule, [1.0, 0.9, 0.7], max_steps=1000, module=module)
    ids = torch.randint(3, V, (2, 8))
    fresh_module = lm_module(loss=partial(taid))
    first = TAIDSchedule()
    first.setup(fake_trainer(10), fresh_module, "fit")
    assert fresh_module.loss_params["interpolation"] == 0.4
    assert torch.isfinite(fresh_module.training_step({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}, 0))
    resumed = TAIDSchedule()
    resumed.load_state_dict(schedule.state_dict())
    assert resumed.state_dict() == schedule.state_dict() and resumed.interpolation > 0.4
    assert resumed.update(0.6, 0.5) == schedule.update(0.6, 0.5)


def test_taid_end_to_end(make_cfg) -> None:
    # Needs the lead's wiring: conf/loss/taid.yaml `callback:` and method_callbacks instantiating it.
    cfg = make_cfg("loss=taid", "baseline=false", *SHORT)
    run(cfg)
    rows = metrics_csv(Path(cfg.paths.output_dir))
    t = column(rows, "train/taid_interpolation")
    assert len(t) == 4 and t[0] == pytest.approx(0.4) and all(b >= a for a, b in zip(t, t[1:])) and t[-1] > t[0]
