"""Teacher outputs computed once per sweep: a content-addressed on-disk store of a frozen teacher's
next-token log-probabilities, shared by every run that uses the same teacher on the same inputs.

`teacher_outputs.reuse=true` (on in the `sweep/` presets) wraps each frozen teacher in a
`MemoizedTeacher`. For every batch it hashes each row's token ids and attention mask; when every row
is already stored it returns the stored log-probabilities instead of running the teacher, otherwise
it runs the teacher on the batch and stores the rows it lacked. The store lives under
`<paths.cache_dir>/teacher_outputs/<teacher>-<hash of the teacher's config and weights, the trainer's
precision and accelerator, the storage format>/`,
so runs of a sweep that change the loss, temperature, weights, learning rate, schedule or student
(anything but the teacher and the data) read what the first run computed. Different data or seeds
that change the data order simply miss (content keys), and a teacher with other weights gets another
directory.

Exactness. Log-probabilities equal the teacher's logits up to a per-position constant, which every
kd-lightning loss, temperature, mixture and weighting is invariant to (all use softmax(z / T) or its
log). With `topk: null` (the default) the full distribution is stored: in float32 (the default)
bitwise the teacher's log_softmax, so a run that reads it trains the same student as one that runs
the teacher (to float rounding of the loss's own log_softmax); float16 halves the disk at a relative
error of about 1e-3 per log-probability, which moved a 100-step reverse-KL student by 5e-3 nats here
(forward KL, skew KL, JS by < 1e-4). With `topk: k` only the k largest log-probabilities are stored and the remaining mass
is spread uniformly over the other tokens: an approximation, for large vocabularies where the full
distribution would not fit on disk (V = 32k in float32 is 128 KB per token).

Not reused (the wrapper is not installed, with a log line saying why): stochastic teachers (MoE
knowledge augmentation), callbacks that change the teacher (`modifies_teacher`, e.g. SAR) or feed it
generated inputs (`generates_inputs`, on-policy and DistiLLM replay), the chunked path
(`loss.chunk_size`, it needs the teacher's hidden states), classifiers and offline sparse targets
(`teacher=cached`).

Files: `part-*.safetensors` with `keys` uint8 [n, 16] (blake2b of the row), `values` [n, L, V|k]
and for top-k `ids` int32 [n, L, k]; each is written to a temporary name and renamed, so an
interrupted run leaves only whole parts, and parallel runs write distinct parts. The metadata of a
part records the teacher seconds per row measured when it was computed: a run that reads the row
counts that time as saved (`summary.json` -> `teacher_outputs`, shown by `kd-report`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from lightning import Callback
from torch import Tensor, nn
from transformers.modeling_outputs import CausalLMOutput
from typing_extensions import override

from kd_lightning.model_cache import config_key
from kd_lightning.models import output_size
from kd_lightning.teachers.teacher_cache import weights_hash

log = logging.getLogger("kd_lightning")

FORMAT_VERSION = 1
DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}


def row_keys(input_ids: Tensor, attention_mask: Tensor | None) -> list[bytes]:
    """A 16-byte content key per row: its length, token ids and attention mask."""
    ids = input_ids.detach().to("cpu", torch.int64).contiguous().numpy()
    mask = None if attention_mask is None else attention_mask.detach().to("cpu", torch.int8).contiguous().numpy()
    keys = []
    for i in range(ids.shape[0]):
        h = hashlib.blake2b(digest_size=16)
        h.update(ids.shape[1].to_bytes(8, "little"))
        h.update(ids[i].tobytes())
        h.update(b"\0" if mask is None else mask[i].tobytes())
        keys.append(h.digest())
    return keys


class TeacherOutputStore:
    """Stored next-token log-probabilities of one teacher, keyed by `row_keys`.

    Args:
        directory: the store's directory (created if missing).
        vocab_size: V, the teacher's number of logits.
        topk: None to store the full distribution, or k to store the k largest log-probabilities.
        dtype: storage dtype of the log-probabilities ("float16", "bfloat16" or "float32").
        flush_rows: rows kept in memory before they are written as a new part.
        max_gb: stop storing new rows (reading goes on) once the directory holds this much.
    """

    def __init__(self, directory: str | os.PathLike[str], vocab_size: int, *, topk: int | None = None,
                 dtype: str = "float32", flush_rows: int = 1024, max_gb: float = 20.0) -> None:
        if dtype not in DTYPES:
            raise ValueError(f"teacher_outputs.dtype={dtype!r}: must be one of {sorted(DTYPES)}")
        if topk is not None and not 0 < int(topk) < int(vocab_size):
            raise ValueError(f"teacher_outputs.topk={topk!r}: must be null (full distribution) or 1..{vocab_size - 1}")
        if int(flush_rows) < 1:
            raise ValueError(f"teacher_outputs.flush_rows={flush_rows!r}: must be >= 1")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.vocab_size, self.topk = int(vocab_size), None if topk is None else int(topk)
        self.dtype = DTYPES[dtype]
        self.flush_rows, self.max_bytes = int(flush_rows), float(max_gb) * 2**30
        self._parts: list[tuple[Any, float]] = []          # (safe_open handle, teacher seconds per row)
        self._index: dict[bytes, tuple[int, int]] = {}      # key -> (part, row)
        self._seen: set[str] = set()
        self._buffer: dict[bytes, tuple[Tensor, Tensor | None, float]] = {}  # key -> (values, ids, seconds)
        self._bytes = 0
        self._full = False
        self._last_scan = 0.0
        self.stats = {"hit_rows": 0, "computed_rows": 0, "stored_rows": 0, "computed_seconds": 0.0,
                      "saved_seconds": 0.0, "lookup_seconds": 0.0}
        self.scan()

    # ------------------------------------------------------------------ reading
    def scan(self) -> None:
        """Index the parts on disk not seen yet (parts written by other runs since the last scan)."""
        self._last_scan = time.monotonic()
        for path in sorted(self.directory.glob("part-*.safetensors")):
            if path.name in self._seen:
                continue
            handle = safe_open(str(path), framework="pt")
            meta = handle.metadata() or {}
            if int(meta.get("vocab_size", -1)) != self.vocab_size or meta.get("topk", "null") != json.dumps(self.topk):
                raise ValueError(f"teacher_outputs: {path} was written for vocab_size={meta.get('vocab_size')}, "
                                 f"topk={meta.get('topk')}, this run has {self.vocab_size}, {self.topk}")
            self._seen.add(path.name)
            self._bytes += path.stat().st_size
            part = len(self._parts)
            self._parts.append((handle, float(meta.get("seconds_per_row", "nan"))))
            for row, key in enumerate(handle.get_tensor("keys").numpy()):
                self._index.setdefault(key.tobytes(), (part, row))

    def __len__(self) -> int:
        return len(self._index) + sum(k not in self._index for k in self._buffer)

    def get(self, keys: list[bytes], seq_len: int) -> Tensor | None:
        """Log-probabilities [B, L, V] (float32, CPU) of the rows, or None unless all are stored."""
        start = time.perf_counter()
        if any(k not in self._index and k not in self._buffer for k in keys):
            if time.monotonic() - self._last_scan > 10.0:  # parallel runs may have written it meanwhile
                self.scan()
            if any(k not in self._index and k not in self._buffer for k in keys):
                self.stats["lookup_seconds"] += time.perf_counter() - start
                return None
        rows, saved = [], 0.0
        for key in keys:
            if key in self._buffer:
                values, ids, seconds = self._buffer[key]
            else:
                part, row = self._index[key]
                handle, seconds = self._parts[part]
                values = handle.get_slice("values")[row:row + 1][0]
                ids = handle.get_slice("ids")[row:row + 1][0] if self.topk is not None else None
            if values.shape[0] != seq_len:
                self.stats["lookup_seconds"] += time.perf_counter() - start
                return None
            rows.append(self._expand(values, ids))
            saved += 0.0 if math.isnan(seconds) else seconds
        out = torch.stack(rows)
        self.stats["hit_rows"] += len(keys)
        self.stats["saved_seconds"] += saved
        self.stats["lookup_seconds"] += time.perf_counter() - start
        return out

    def _expand(self, values: Tensor, ids: Tensor | None) -> Tensor:
        values = values.float()
        if ids is None:
            return values
        # top-k: the rest of the mass spread uniformly over the V - k other tokens
        rest = (1.0 - values.exp().sum(-1, keepdim=True)).clamp_min(1e-12) / (self.vocab_size - self.topk)
        out = rest.log().expand(*values.shape[:-1], self.vocab_size).clone()
        return out.scatter_(-1, ids.long(), values)

    # ------------------------------------------------------------------ writing
    def put(self, keys: list[bytes], logits: Tensor, seconds: float) -> None:
        """Store the rows of teacher logits [B, L, V] not stored yet; `seconds` is the teacher time."""
        self.stats["computed_rows"] += len(keys)
        self.stats["computed_seconds"] += seconds
        if self._full:
            return
        logprobs = torch.log_softmax(logits.detach().float(), dim=-1).cpu()
        per_row = seconds / max(len(keys), 1)
        for key, row in zip(keys, logprobs):
            if key in self._index or key in self._buffer:
                continue
            if self.topk is None:
                self._buffer[key] = (row.to(self.dtype), None, per_row)
            else:
                values, ids = row.topk(self.topk, dim=-1)
                self._buffer[key] = (values.to(self.dtype), ids.to(torch.int32), per_row)
        if len(self._buffer) >= self.flush_rows:
            self.flush()

    def flush(self) -> None:
        """Write the buffered rows as one new part (atomically)."""
        if not self._buffer:
            return
        by_len: dict[int, list[bytes]] = {}
        for key, (values, _, _) in self._buffer.items():
            by_len.setdefault(values.shape[0], []).append(key)
        for keys in by_len.values():
            entries = [self._buffer[k] for k in keys]
            tensors = {"keys": torch.frombuffer(bytearray(b"".join(keys)), dtype=torch.uint8).view(len(keys), 16),
                       "values": torch.stack([e[0] for e in entries])}
            if self.topk is not None:
                tensors["ids"] = torch.stack([e[1] for e in entries])
            size = sum(t.numel() * t.element_size() for t in tensors.values())
            if self._bytes + size > self.max_bytes:
                self._full = True
                log.warning("teacher_outputs: %s holds %.1f GiB, max_gb=%.1f reached; new teacher outputs are no "
                            "longer stored (stored ones are still read)", self.directory, self._bytes / 2**30,
                            self.max_bytes / 2**30)
                break
            meta = {"format_version": str(FORMAT_VERSION), "vocab_size": str(self.vocab_size),
                    "topk": json.dumps(self.topk), "seconds_per_row": repr(sum(e[2] for e in entries) / len(entries))}
            name = f"part-{uuid.uuid4().hex}.safetensors"
            tmp = self.directory / f".{name}.tmp"
            save_file(tensors, str(tmp), metadata=meta)
            os.replace(tmp, self.directory / name)
            self.stats["stored_rows"] += len(keys)
        self._buffer.clear()
        self.scan()


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

    @torch.no_grad()
    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs: Any) -> CausalLMOutput:
        keys = row_keys(input_ids, attention_mask)
        stored = None if kwargs else self.store.get(keys, input_ids.shape[1])
        if stored is not None:
            return CausalLMOutput(logits=stored.to(input_ids.device, non_blocking=True))
        if input_ids.is_cuda:
            torch.cuda.synchronize(input_ids.device)
        start = time.perf_counter()
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits
        if logits.is_cuda:
            torch.cuda.synchronize(logits.device)
        seconds = time.perf_counter() - start
        if not kwargs:
            self.store.put(keys, logits, seconds)
        return CausalLMOutput(logits=logits)


@dataclass(frozen=True)
class TeacherOutputOptions:
    """`teacher_outputs:` of the config, typed (see conf/train.yaml for each key's meaning)."""

    reuse: bool = False
    root: str = "~/.cache/kd_lightning/teacher_outputs"  # `dir`, or <paths.cache_dir>/teacher_outputs
    topk: int | None = None
    dtype: str = "float32"
    flush_rows: int = 1024
    max_gb: float = 20.0


@dataclass(frozen=True)
class RunContext:
    """What else decides whether and where a run's teacher outputs can be stored."""

    task: str
    chunked: bool  # `loss.chunk_size` is set: the chunked path reads hidden states, not logits
    precision: str  # trainer precision and accelerator change the teacher's numbers
    accelerator: str


def store_directory(opts: TeacherOutputOptions, name: str, model_config: Any, teacher: nn.Module,
                    context: RunContext) -> Path:
    """`<root>/<name>-<hash of the teacher's config and weights, precision, accelerator, format>`."""
    identity = {"format": FORMAT_VERSION, "weights": weights_hash(teacher), "topk": opts.topk, "dtype": opts.dtype,
                "precision": context.precision, "accelerator": context.accelerator, "config": model_config}
    return Path(os.path.expanduser(opts.root)) / f"{name}-{config_key(identity)}"


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
        directory = store_directory(opts, name, model_configs.get(name), teacher, context)
        store = TeacherOutputStore(directory, output_size(teacher), topk=opts.topk, dtype=opts.dtype,
                                   flush_rows=opts.flush_rows, max_gb=opts.max_gb)
        log.info("teacher_outputs.reuse: teacher '%s' outputs stored at %s (%d rows there)", name, directory, len(store))
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
           "memoize_teachers", "row_keys", "store_directory", "why_not_reusable"]
