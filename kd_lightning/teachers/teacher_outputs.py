"""Teacher outputs computed once per sweep: the online way of filling and reading the teacher store
(`kd_lightning.teachers.store`), shared by every run that uses the same teacher on the same inputs.

`teacher_outputs.reuse=true` (on in the `sweep/` presets) wraps each frozen teacher in a
`MemoizedTeacher`. For every batch it hashes each row's token ids and attention mask; when every row
is already stored it returns the stored log-probabilities instead of running the teacher, otherwise
it runs the teacher on the batch and stores the rows it lacked. The store lives under
`<paths.cache_dir>/teacher_outputs/<teacher>-<hash of the teacher's config and weights, the trainer's
precision and accelerator, the encoding>/`, so runs of a sweep that change the loss, temperature,
weights, learning rate, schedule or student (anything but the teacher and the data) read what the
first run computed. Different data simply misses (content keys).

Exactness. Log-probabilities equal the teacher's logits up to a per-position constant, which every
kd-lightning loss, temperature, mixture and weighting is invariant to. `teacher_outputs.encoding=full`
(the default) with `dtype=float32` is bitwise the teacher's log_softmax; float16 halves the disk at a
relative error of about 1e-3 (moved a 100-step reverse-KL student by 5e-3 nats; forward KL, skew KL,
JS by < 1e-4). `topk` and `sample` (see `kd_lightning.teachers.encodings`) store ~100 bytes per token
instead of V·4 and are decoded to dense log-probabilities, so every loss reads them: an approximation
for large vocabularies.

Not reused (the wrapper is not installed, with a log line saying why): stochastic teachers (MoE
knowledge augmentation), callbacks that change the teacher (`modifies_teacher`, e.g. SAR) or feed it
generated inputs (`generates_inputs`, on-policy and DistiLLM replay), the chunked path
(`loss.chunk_size`, it needs the teacher's hidden states), classifiers and offline targets
(`teacher=cached`, already a store). A part's metadata records the teacher seconds per row: a run
that reads the row counts that time as saved (`summary.json` -> `teacher_outputs`, shown by `kd-report`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch
from lightning import Callback
from torch import Tensor, nn
from transformers.modeling_outputs import CausalLMOutput
from typing_extensions import override

from kd_lightning.infra.distributed import all_reduce_sums, is_distributed
from kd_lightning.infra.sharding import is_fsdp
from kd_lightning.teachers.identity import StoreOptions, teacher_store_location
from kd_lightning.teachers.store import TeacherOutputStore, row_keys

log = logging.getLogger("kd_lightning")


class MemoizedTeacher(nn.Module):
    """A frozen causal-LM teacher whose outputs are read from a `TeacherOutputStore` when stored.

    Called like the teacher (`input_ids`, `attention_mask`), it returns an output whose `logits` are
    the teacher's log-probabilities (float32): equal to its logits up to a per-position constant.
    """

    def __init__(self, model: nn.Module, store: TeacherOutputStore) -> None:
        super().__init__()
        self.model, self.store = model, store

    @property
    def config(self) -> Any:
        return getattr(self.model, "config", None)

    def get_output_embeddings(self) -> Any:
        return self.model.get_output_embeddings()

    def anyone_missed(self, missed: bool) -> bool:
        """Under FSDP (the model is sharded: its forward gathers weights from every rank) whether any
        rank missed the store for this batch (a collective every rank calls once per batch); else
        whether this rank did."""
        if not (is_fsdp(self.model) and is_distributed()):
            return missed
        return all_reduce_sums([float(missed)])[0] > 0

    @torch.no_grad()
    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs: Any) -> CausalLMOutput:
        keys = row_keys(input_ids, attention_mask)
        stored = None if kwargs else self.store.get(keys, input_ids.shape[1])
        if not self.anyone_missed(stored is None):
            return CausalLMOutput(logits=stored.to(input_ids.device, non_blocking=True))
        if input_ids.is_cuda:
            torch.cuda.synchronize(input_ids.device)
        start = time.perf_counter()
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits
        if stored is not None:  # FSDP: this rank only joined the collective forward of ranks that missed
            return CausalLMOutput(logits=stored.to(input_ids.device, non_blocking=True))
        if logits.is_cuda:
            torch.cuda.synchronize(logits.device)
        seconds = time.perf_counter() - start
        if not kwargs:
            self.store.put(keys, logits, seconds)
        return CausalLMOutput(logits=logits)


@dataclass(frozen=True)
class TeacherOutputOptions:
    """`teacher_outputs:` of the config, typed (see conf/train.yaml for each key's meaning); `store`
    holds the root (`dir`, or <paths.cache_dir>/teacher_outputs), the encoding, precision and
    accelerator."""

    reuse: bool = False
    store: StoreOptions = StoreOptions()
    flush_rows: int = 1024
    max_gb: float = 20.0


@dataclass(frozen=True)
class RunContext:
    """What else decides whether a run's teacher outputs can be stored."""

    task: str
    chunked: bool  # `loss.chunk_size` is set: the chunked path reads hidden states, not logits


def why_not_reusable(context: RunContext, teacher: nn.Module, callbacks: list[Any]) -> str | None:
    """None when a teacher's outputs can be memoized in this run, else the reason they cannot."""
    if context.task != "causal_lm":
        return f"task {context.task} (only causal LMs are memoized)"
    if getattr(teacher, "sparse_targets", False):
        return "the teacher is already offline sparse targets"
    if getattr(teacher, "stochastic", False) or int(getattr(teacher, "num_samples", 1)) > 1:
        return f"{type(teacher).__name__} is stochastic (a new draw every step)"
    if context.chunked:
        return "loss.chunk_size: the chunked path reads the teacher's hidden states"
    for callback in callbacks:
        if getattr(callback, "modifies_teacher", False):
            return f"{type(callback).__name__} changes the teacher during training"
        if getattr(callback, "generates_inputs", False):
            return f"{type(callback).__name__} feeds the teacher generated sequences"
    return None


def memoize_teachers(opts: TeacherOutputOptions, teachers: dict[str, nn.Module], model_configs: dict[str, Any],
                     context: RunContext, callbacks: list[Any]) -> dict[str, nn.Module]:
    """Wrap each teacher whose outputs can be reused (`opts.reuse`); `model_configs` holds each
    teacher's resolved model config (part of the store's identity)."""
    if not opts.reuse:
        return teachers
    out = dict(teachers)
    for name, teacher in teachers.items():
        reason = why_not_reusable(context, teacher, callbacks)
        if reason:
            log.info("teacher_outputs.reuse: teacher '%s' runs every step: %s", name, reason)
            continue
        directory, identity = teacher_store_location(opts.store, name, teacher, model_configs.get(name))
        store = TeacherOutputStore(directory, identity, flush_rows=opts.flush_rows,
                                   max_gb=opts.max_gb, what="teacher_outputs")
        log.info("teacher_outputs.reuse: teacher '%s' outputs stored at %s (%d rows there)", name, store.directory,
                 len(store))
        out[name] = MemoizedTeacher(teacher, store)
    return out


class TeacherOutputsFlush(Callback):
    """Writes every memoized teacher's buffered outputs when training ends, also when it stops on an
    exception (SIGTERM, an error): what was computed is never lost. `summary()` sums the stores'
    statistics for `summary.json`."""

    def __init__(self, teachers: dict[str, nn.Module]) -> None:
        self.stores = [t.store for t in teachers.values() if isinstance(t, MemoizedTeacher)]

    def flush(self) -> None:
        for store in self.stores:
            store.flush()

    @override
    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self.flush()

    @override
    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self.flush()

    def summary(self) -> dict[str, Any] | None:
        """Flush, then the summed statistics (None when nothing was memoized)."""
        if not self.stores:
            return None
        self.flush()
        total: dict[str, Any] = {}
        for store in self.stores:
            for key, value in store.stats.items():
                total[key] = total.get(key, 0) + value
        total = {k: round(v, 3) if isinstance(v, float) else v for k, v in total.items()}
        total["directories"] = [str(s.directory) for s in self.stores]
        return total


__all__ = ["MemoizedTeacher", "RunContext", "TeacherOutputOptions", "TeacherOutputStore", "TeacherOutputsFlush",
           "memoize_teachers", "row_keys", "why_not_reusable"]
