"""Held-out evaluation of any model kd-lightning handles, and the end-of-run summary table."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassCalibrationError

from kd_lightning.infra.distributed import all_reduce_sums, is_distributed
from kd_lightning.infra.sharding import is_sharded, reshard_frozen
from kd_lightning.tasks import IGNORE_INDEX, Task, task_named

ECE_BINS = 15


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    task: Task | str,
    reference: nn.Module | None = None,
    device: str | torch.device = "cpu",
    byte_lengths: torch.Tensor | None = None,
) -> dict[str, float]:
    """Token-mean CE (nats), perplexity, top-1 accuracy and expected calibration error (top-1,
    15 equal-width confidence bins, L1: Guo et al. 2017, "On Calibration of Modern Neural Networks")
    of `model` on `batches`; with a `reference` model (the teacher) also the top-1 agreement. With
    `byte_lengths` (`[V]` UTF-8 bytes per token id, `data.tokenizer.token_byte_lengths`) also
    `loss_per_byte`: summed token NLL / bytes of text the counted tokens cover, comparable across
    tokenizers (equal to `loss` for the byte tokenizer).

    Inside a process group every rank passes its own share of the split (`batches` is streamed, never
    held): the summed counts and the calibration states are reduced over the ranks, so every rank
    returns the figures of the whole split. A sharded model (or reference) runs a collective forward:
    the ranks then step through their shares in lockstep (`_in_lockstep`)."""
    task = task_named(task) if isinstance(task, str) else task
    distributed = is_distributed()
    sharded = [m for m in (model, reference) if m is not None and is_sharded(m)]
    if distributed and sharded:
        batches = _in_lockstep(batches)
    was_training = model.training
    model.eval().to(device)
    if reference is not None:
        reference.eval().to(device)
    # Summed over batches (and ranks).
    sums = {"loss": 0.0, "correct": 0.0, "agree": 0.0, "count": 0.0, "bytes": 0.0}
    calibration: MulticlassCalibrationError | None = None
    for batch in batches:
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        logits, labels = _aligned_logits(model, batch, task)
        # the reference's forward runs for every batch: sharded, it is a collective
        ref_logits = _aligned_logits(reference, batch, task)[0] if reference is not None else None
        mask = task.mask(labels)
        if not mask.any():
            continue
        logits, labels = logits[mask].float(), labels[mask]
        sums["loss"] += F.cross_entropy(logits, labels, reduction="sum").item()
        sums["correct"] += (logits.argmax(-1) == labels).sum().item()
        if calibration is None:
            calibration = _calibration(logits.shape[-1], distributed, device)
        calibration.update(logits.softmax(-1), labels)
        if ref_logits is not None:
            sums["agree"] += (ref_logits[mask].argmax(-1) == logits.argmax(-1)).sum().item()
        sums["count"] += int(mask.sum())
        if byte_lengths is not None:
            sums["bytes"] += int(byte_lengths[labels.cpu()].sum())
    model.train(was_training)
    for frozen in sharded:  # FSDP2 keeps a root gathered after a forward without backward
        reshard_frozen(frozen)
    if distributed:
        sums = dict(zip(sums, all_reduce_sums(list(sums.values()))))
        # every rank syncs the calibration states, also one whose share had nothing to score
        classes, scored = all_reduce_sums([calibration.num_classes, 1] if calibration is not None else [0, 0])
        calibration = calibration or _calibration(int(classes // max(scored, 1)), distributed, device)
    count = int(sums["count"])
    if count == 0:
        raise ValueError("evaluation split has no counted tokens/examples")
    loss = sums["loss"] / count
    assert calibration is not None  # count > 0: at least one batch was scored
    result = {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "accuracy": sums["correct"] / count, "count": count,
              "ece": float(calibration.compute())}
    if reference is not None:
        result["teacher_agreement"] = sums["agree"] / count
    if byte_lengths is not None:
        result["loss_per_byte"] = sums["loss"] / max(sums["bytes"], 1)
    return result


def _in_lockstep(batches: Iterable[dict[str, torch.Tensor]]) -> Iterator[dict[str, torch.Tensor]]:
    """Every rank's batches, then copies with nothing counted (labels all ignored) until the rank
    with the most batches is done: every forward of a sharded model is a collective. Rank 0 holds
    the most (`RankShareSampler`); its first batch is the filler of a rank that has none."""
    batches = iter(batches)
    batch = next(batches, None)
    shared = [_nothing_counted(batch) if batch is not None else None]
    torch.distributed.broadcast_object_list(shared, src=0)
    filler = shared[0]
    while True:
        remaining = all_reduce_sums([batch is not None])[0]
        if remaining == 0:
            return
        yield batch if batch is not None else filler  # type: ignore[misc]
        batch = next(batches, None)


def _nothing_counted(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: torch.full_like(v, IGNORE_INDEX) if k.endswith("labels") else v for k, v in batch.items()}


def _calibration(num_classes: int, distributed: bool, device: str | torch.device) -> MulticlassCalibrationError:
    # sync_on_compute only inside a process group: then every rank computes (see `evaluate`).
    return MulticlassCalibrationError(num_classes, n_bins=ECE_BINS, validate_args=False,
                                      sync_on_compute=distributed).to(device)


def with_progress(batches: Sequence[dict[str, torch.Tensor]], label: str,
                  enabled: bool = True) -> Iterable[dict[str, torch.Tensor]]:
    """`batches` under a tqdm bar named `label` (batch count known up front), so the held-out
    evaluation is visible and its length bounded on screen; the bar disappears when done."""
    from tqdm.auto import tqdm

    return tqdm(batches, desc=label, total=len(batches), unit="batch", leave=False, disable=not enabled)


def _aligned_logits(model: nn.Module, batch: dict[str, torch.Tensor], task: Task) -> tuple[torch.Tensor, torch.Tensor]:
    return task.align(task.logits(model, batch), batch["labels"])


def print_summary(rows: dict[str, dict[str, float]], task: str, student_dir: str, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    per_byte = any("loss_per_byte" in r for r in rows.values())
    for col in ("model", "params", "held-out loss", *(("nats/byte",) if per_byte else ()), "perplexity", "accuracy",
                "agreement w/ teacher"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for name, r in rows.items():
        agree = f"{r['teacher_agreement']:.3f}" if "teacher_agreement" in r else "-"
        byte = (f"{r['loss_per_byte']:.4f}" if "loss_per_byte" in r else "-",) if per_byte else ()
        table.add_row(name, f"{int(r.get('params', 0)):,}", f"{r['loss']:.4f}", *byte, f"{r['ppl']:.3f}",
                      f"{r['accuracy']:.3f}", agree)
    console = Console()
    console.print(table)
    console.print(f"Student saved to [bold]{student_dir}[/bold] (load with AutoModelForCausalLM.from_pretrained)"
                  if task == "causal_lm" else f"Student saved to [bold]{student_dir}[/bold] (kd_lightning.models.load_model)")
