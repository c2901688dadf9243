"""One token, one vote: the step's gradient does not depend on how its tokens are split into
micro-batches (gradient accumulation) or over processes (DDP)."""

from __future__ import annotations

import pytest
import torch

from kd_lightning.data.step_tokens import STEP_TOKENS_KEY, stamp_step_tokens, token_share
from kd_lightning.tasks import IGNORE_INDEX
from tests.dist_check import SEQ, run_steps, varied_tokens


def close(a: list[torch.Tensor], b: list[torch.Tensor], tol: float) -> float:
    """Largest absolute difference between two lists of tensors (asserting it is below `tol`)."""
    worst = max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))
    assert worst <= tol, worst
    return worst


def test_windows_are_stamped_with_their_count_and_resume_mid_window() -> None:
    batches = [{"n": n} for n in (1, 2, 3, 4, 5)]
    stamped = [int(b[STEP_TOKENS_KEY]) for b in stamp_step_tokens(iter(batches), 2, lambda b: b["n"])]
    assert stamped == [3, 3, 7, 7, 5]  # windows (1,2) (3,4) and the short last one (5)
    resumed = [{"n": n} for n in (2, 3, 4, 5)]  # one batch of the first window already trained on
    stamped = [int(b[STEP_TOKENS_KEY]) for b in stamp_step_tokens(iter(resumed), 2, lambda b: b["n"], already_done=1)]
    assert stamped == [2, 7, 7, 5]


def test_token_share_is_exactly_one_without_accumulation_or_ranks() -> None:
    count = torch.tensor(37)
    assert float(token_share(count, torch.tensor(37), 1, 1)) == 1.0
    assert token_share(count, None, 2, 4) == 1.0
    assert float(token_share(count, torch.tensor(74), 2, 1)) == 1.0


def test_accumulating_two_very_different_batches_gives_the_merged_batch_gradient() -> None:
    rows = varied_tokens(n=2)
    rows["labels"] = rows["input_ids"].clone()
    rows["labels"][0, : SEQ - 1] = IGNORE_INDEX  # 1 counted token against 11
    assert sorted(int((r[1:] != IGNORE_INDEX).sum()) for r in rows["labels"]) == [1, SEQ - 1]
    merged = run_steps(batch_size=2, accumulate=1, steps=1, rows=rows)
    split = run_steps(batch_size=1, accumulate=2, steps=1, rows=rows)
    assert merged["step_tokens"] == split["step_tokens"] == [SEQ]
    close(merged["grads"][0], split["grads"][0], 1e-6)
    assert abs(merged["losses"][0] - split["losses"][0]) < 1e-6
    # the per-micro-batch token mean would not: the 1-token batch would weigh as much as the other
    assert max(float(g.abs().max()) for g in merged["grads"][0]) > 1e-3


def test_accumulation_over_three_steps_matches_bigger_batches() -> None:
    merged = run_steps(batch_size=4, accumulate=1)
    split = run_steps(batch_size=2, accumulate=2)
    for step in range(3):
        close(merged["grads"][step], split["grads"][step], 1e-6)
    close(list(merged["params"].values()), list(split["params"].values()), 1e-6)


# The 2-process runs come from one launch (conftest.dist_runs); xdist_group: one worker runs it.
@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.xdist_group("dist_runs")
def test_ddp_two_processes_give_the_single_process_loss_and_gradients(dist_runs) -> None:
    single = run_steps(batch_size=4)
    ddp = dist_runs["ddp"]
    assert ddp["step_tokens"] == single["step_tokens"]
    for step in range(3):
        close(single["grads"][step], ddp["grads"][step], 1e-5)
        assert abs(single["losses"][step] - ddp["losses"][step]) < 1e-5
    close(list(single["params"].values()), list(ddp["params"].values()), 1e-5)


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.xdist_group("dist_runs")
@pytest.mark.parametrize("keep", [False, True], ids=["reshard", "keep_gathered"])
def test_fsdp_two_processes_give_the_single_process_loss_and_gradients(dist_runs, keep: bool) -> None:
    single = run_steps(batch_size=4)
    fsdp = dist_runs["fsdp-keep" if keep else "fsdp"]
    # really sharded: DTensor student; the frozen teacher holds half its weights per process after steps
    assert fsdp["sharded"] and not single["sharded"]
    assert 0.45 < fsdp["teacher_fraction"] < 0.55 and single["teacher_fraction"] == 1.0
    assert fsdp["step_tokens"] == single["step_tokens"]
    for step in range(3):
        close(single["grads"][step], fsdp["grads"][step], 1e-5)
        assert abs(single["losses"][step] - fsdp["losses"][step]) < 1e-5
    close(list(single["params"].values()), list(fsdp["params"].values()), 1e-5)


def test_rank_shares_make_up_the_single_process_order_and_resume_skips_per_rank() -> None:
    from kd_lightning.data.base import DictDataset
    from kd_lightning.data.resumable import EpochSeededSampler

    data = DictDataset(x=torch.arange(10))
    single = EpochSeededSampler(data, seed=3)
    single.set_epoch(2)
    order = list(single)
    shares = []
    for rank in range(2):
        sampler = EpochSeededSampler(data, seed=3, num_replicas=2, rank=rank)
        sampler.set_epoch(2)
        shares.append(list(sampler))
    assert [i for pair in zip(*shares) for i in pair] == order  # batch b of both ranks = batch b of 1 process
    resumed = EpochSeededSampler(data, seed=3, num_replicas=2, rank=1)
    resumed.set_epoch(2)
    resumed.skip = 2
    assert list(resumed) == shares[1][2:] and list(resumed) == shares[1]  # the skip applies once


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.xdist_group("dist_runs")
@pytest.mark.parametrize("reference,vocab", [(False, 40), (True, 40), (False, 32000)], ids=["fused", "reference", "fused-32k"])
def test_fsdp_chunked_loss_gives_the_single_process_gradients(dist_runs, monkeypatch, reference: bool,
                                                              vocab: int) -> None:
    """`loss.chunk_size` under FSDP2: the heads are read gathered after each root forward, the
    student head's gradient is reduce-scattered with the root's, and the teacher is resharded (the
    reference path, whose backward recomputes chunks, reads a copy of the teacher's head). Also at a
    realistic vocabulary (32k), where the chunked path is meant to be used."""
    import tests.dist_check as dist_check

    monkeypatch.setattr(dist_check, "VOCAB", vocab)
    single = run_steps(batch_size=4, chunk_size=5, reference=reference)
    plain = run_steps(batch_size=4)
    fsdp = dist_runs[f"fsdp-chunk-{'reference' if reference else 'fused'}{'-32k' if vocab == 32000 else ''}"]
    assert fsdp["sharded"] and 0.45 < fsdp["teacher_fraction"] < 0.55
    for step in range(3):
        close(single["grads"][step], fsdp["grads"][step], 1e-5)
        close(plain["grads"][step], single["grads"][step], 1e-5)  # chunking itself changes nothing
        assert abs(single["losses"][step] - fsdp["losses"][step]) < 1e-5
    close(list(single["params"].values()), list(fsdp["params"].values()), 1e-5)
