"""`distill.nonfinite_teacher=skip` through the real entry point, with a teacher that really produces
NaN (issue #24): before, the first skipped batch crashed `FitTimer` with `KeyError: 'token_count'`."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from kd_lightning.run.pipeline import run

def flaky_logits(model: nn.Module, every: int = 3) -> nn.Module:
    """A teacher whose output logits are NaN on its 1st, (1+every)th, ... forward pass (a flaky device
    or a damaged kernel): the first training batch among them, so the very first step is skipped."""
    calls = [0]

    def hook(module: nn.Module, args: object, output):
        calls[0] += 1
        if (calls[0] - 1) % every == 0:
            output.logits = torch.full_like(output.logits, float("nan"))
        return output

    model.register_forward_hook(hook)
    return model


NAN_TEACHER = ("+teacher.augment._target_=tests.test_nonfinite_teacher.flaky_logits",
               "+teacher.augment._partial_=true")


@pytest.mark.parametrize("extra", [(), ("temperature=dts",), ("loss=taid",)], ids=["plain", "dts", "taid"])
def test_nonfinite_teacher_skip_skips_those_batches_and_the_run_finishes(make_cfg, tmp_path, extra) -> None:
    cfg = make_cfg("baseline=false", "distill.nonfinite_teacher=skip", *NAN_TEACHER, *extra,
                   output_dir=tmp_path / "run")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = run(cfg)
    skipped = [str(w.message) for w in caught if "produced NaN/+inf logits; skipping this batch" in str(w.message)]
    assert skipped, "the damaged teacher should have produced NaN on some batch"
    steps = int(cfg.trainer.max_steps)
    assert len(skipped) < steps  # only the batches holding the token
    # the skipped batches trained nothing, and their tokens are not counted (nor the previous batch's twice)
    tokens = summary["timing"]["train_tokens"]
    per_batch = int(cfg.dataset.batch_size) * (int(cfg.dataset.seq_len) - 1)
    assert 0 < tokens <= (steps + 1 - len(skipped)) * per_batch
    assert math.isfinite(summary["models"]["student (KD)"]["loss"])
    assert (tmp_path / "run" / "summary.json").is_file()


def test_nonfinite_teacher_error_names_the_step(make_cfg, tmp_path) -> None:
    with pytest.raises(FloatingPointError, match=r"step \d+: teacher\(s\) \['moe'\] produced NaN/\+inf logits"):
        run(make_cfg("baseline=false", *NAN_TEACHER, output_dir=tmp_path / "run"))
