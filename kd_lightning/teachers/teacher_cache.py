"""Offline teacher targets: the teacher store (`kd_lightning.teachers.store`) filled for the whole
training split by `stage=cache_teacher`, read by `teacher=cached` (no teacher model at training time).

Anshumann et al. 2025, "Sparse Logit Sampling: Accelerating Knowledge Distillation in LLMs": the
teacher's distribution is stored sparsely, as Random-Sampling KD counts (``teacher_cache.encoding=
sample``, unbiased) or as its top-k plus the tail's mass (``topk``), or in full (``full``); see
`kd_lightning.teachers.encodings`. Rows are keyed by their tokens, like the online store, so
`teacher=cached` reads a batch whatever order the loader gives.

Several writers share the work: the training split is cut into chunks of ``teacher_cache.shard_size``
samples; a process claims a chunk (an exclusive ``.claim-<chunk>`` file) before computing it, DDP
ranks (``RANK``/``WORLD_SIZE``) start at different chunks, and a process that finds no chunk left to
claim waits for the others, taking over a chunk whose claimer died: on this host, when its pid is
gone; on another host (a shared filesystem), when its heartbeat (the claim's mtime, refreshed every
10 s while computing) is older than ``teacher_cache.claim_timeout_s`` (default 600 s), with a
warning naming the host and pid. When every row is stored, a
``covers-<data fingerprint>.json`` record says the split is complete; `teacher=cached` needs it.
Each chunk's draws are seeded by (seed, chunk), so who computes a chunk does not change it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers.modeling_outputs import CausalLMOutput

from kd_lightning.infra.atomic import atomic_write_json, clean_stale_temporaries, pid_alive
from kd_lightning.data.tokenizer import tokenizer_identity
from kd_lightning.losses.sparse import SparseTargets, check_tail_mode
from kd_lightning.tasks import CausalLM
from kd_lightning.teachers.encodings import Encoding
from kd_lightning.teachers.identity import StoreOptions, teacher_store_location
from kd_lightning.teachers.store import TeacherOutputStore, row_keys

log = logging.getLogger("kd_lightning")

BUILD = ("python train.py stage=cache_teacher teacher=<the teacher> teacher_cache.dir={dir} "
         "(same dataset.* and teacher_cache.* settings)")


def coverage(datamodule: Any, num_samples: int) -> dict[str, Any]:
    """What a complete offline store covers (`covers-<data fingerprint>.json`)."""
    return {"data_fingerprint": datamodule.fingerprint(), "tokenizer": tokenizer_identity(datamodule.tokenizer)[:16],
            "seq_len": int(datamodule.seq_len), "num_samples": int(num_samples)}


def covers_path(directory: Path, fingerprint: str) -> Path:
    return directory / f"covers-{fingerprint}.json"


DEFAULT_CLAIM_TIMEOUT_S = 600.0  # teacher_cache.claim_timeout_s
HEARTBEAT_S = 10.0  # how often a writer refreshes its claim's mtime while computing


def _claim_owner(path: Path) -> tuple[int, str] | None:
    """(pid, host) of a claim file, None while it is being written (or unreadable)."""
    try:
        pid, host = path.read_text().split()
        return int(pid), host
    except (OSError, ValueError):
        return None


def _stale(path: Path, owner: tuple[int, str] | None, timeout_s: float) -> str | None:
    """Why the claim at `path` may be taken over, or None while its writer may still be computing.

    Same host: the writer's pid is dead. Another host (its pid cannot be checked from here), or a
    claim that was never written: its heartbeat (the file's mtime, which a writer refreshes every
    `HEARTBEAT_S` while computing) is older than `timeout_s`."""
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return None
    if owner is not None and owner[1] == socket.gethostname():
        return None if pid_alive(owner[0]) else f"its writer (pid {owner[0]} on this host) has exited"
    if age <= timeout_s:
        return None
    who = f"pid {owner[0]} on host {owner[1]}" if owner is not None else "a writer that never wrote its name"
    return f"its writer ({who}) has not refreshed it for {age:.0f} s (teacher_cache.claim_timeout_s={timeout_s:g})"


def _claim(directory: Path, chunk: int, *, steal: bool = False, timeout_s: float = DEFAULT_CLAIM_TIMEOUT_S) -> bool:
    """Take chunk `chunk` for this process; `steal`: also when its claim is stale (`_stale`): its
    writer on this host died, or a writer elsewhere stopped refreshing it for `timeout_s` seconds.

    A stale claim is renamed away first (one process wins the rename), then claimed anew with
    O_EXCL, so two processes never both take it over. A writer that was only slow (a heartbeat
    missed for longer than the timeout) and a thief then compute the same chunk: the rows are the
    same (seeded by chunk) and the store keeps the first copy of each."""
    path = directory / f".claim-{chunk}"
    me = f"{os.getpid()} {socket.gethostname()}"
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        if not steal:
            return False
        owner = _claim_owner(path)
        why = _stale(path, owner, timeout_s)
        if why is None:
            return False
        moved = path.with_name(f"{path.name}.stale-{os.getpid()}")
        try:
            os.rename(path, moved)  # atomic: only one process takes a given stale claim away
        except FileNotFoundError:
            return False
        if _claim_owner(moved) != owner:  # replaced between our read and the rename: put it back
            try:
                os.link(moved, path)
            except FileExistsError:
                pass
            moved.unlink(missing_ok=True)
            return False
        moved.unlink(missing_ok=True)
        log.warning("teacher_cache: taking over chunk %d of %s: %s", chunk, directory, why)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False  # another process claimed it afresh
    with os.fdopen(fd, "w") as handle:
        handle.write(me)
    return True


def _heartbeat(directory: Path, chunk: int) -> None:
    """Refresh this writer's claim (its mtime): a writer on another host sees it alive."""
    try:
        os.utime(directory / f".claim-{chunk}")
    except FileNotFoundError:
        pass


@dataclass(frozen=True)
class TeacherCacheOptions:
    """`teacher_cache:` of the config, typed (see conf/train.yaml for each key's meaning).

    Args:
        store: the store's root, encoding, precision and accelerator (the encoding is
            `teacher_cache.*`'s), shared with `teacher_outputs.reuse`.
        directory: the store (`teacher_cache.dir`, or `teacher.dir` for `teacher=cached`); None: the
            hashed directory under `store.root` that `teacher_outputs.reuse` also uses.
        shard_size: training samples per part and per chunk a writer claims.
        claim_timeout_s: a claim whose heartbeat is older than this is taken over (other hosts).
        tail: how `sparse_kl` reads a topk store's tail mass (`bucket`, `uniform`, `drop`).
        seed: the run's seed; each chunk's draws are seeded by (seed, chunk).
    """

    store: StoreOptions = StoreOptions()
    directory: str | None = None
    shard_size: int = 4096
    claim_timeout_s: float = DEFAULT_CLAIM_TIMEOUT_S
    tail: str = "uniform"
    seed: int = 0


@torch.no_grad()
def cache_teacher_targets(options: TeacherCacheOptions, datamodule: Any, name: str, teacher: nn.Module,
                          model_config: Any = None) -> Path:
    """`stage=cache_teacher`: store teacher `name`'s outputs for every training sample; returns the
    store. `model_config` is the teacher's resolved model config (part of the store's identity)."""
    if datamodule.task != "causal_lm":
        raise ValueError("stage=cache_teacher needs a causal-LM dataset")
    encoding = options.store.encoding
    hashed, identity = teacher_store_location(options.store, name, teacher, model_config)
    directory = Path(options.directory).expanduser() if options.directory else hashed
    clean_stale_temporaries(directory.parent, prefix=directory.name)  # an earlier layout's staging folders
    shard = int(options.shard_size)
    store = TeacherOutputStore(directory, identity, flush_rows=shard + 1, what="stage=cache_teacher")
    datamodule.setup("fit")
    dataset = datamodule.datasets["train"]
    covers = coverage(datamodule, len(dataset))
    if covers_path(directory, covers["data_fingerprint"]).is_file():
        if not store.stats["damaged_parts"]:
            log.info("Teacher targets already stored at %s", directory)
            return directory
        covers_path(directory, covers["data_fingerprint"]).unlink()  # recompute what the damaged parts held
    device = torch.device("cuda" if torch.cuda.is_available() and options.store.accelerator != "cpu" else "cpu")
    teacher = teacher.to(device).eval()
    chunks = [list(range(s, min(s + shard, len(dataset)))) for s in range(0, len(dataset), shard)]
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    order = list(range(rank, len(chunks), world)) + [i for i in range(len(chunks)) if i % world != rank]
    batch_size = int(datamodule.eval_batch_size)

    def chunk_keys(chunk: int) -> list[bytes]:
        items = [dataset[i] for i in chunks[chunk]]
        return row_keys(torch.stack([x["input_ids"] for x in items]), torch.stack([x["attention_mask"] for x in items]))

    timeout_s = float(options.claim_timeout_s or DEFAULT_CLAIM_TIMEOUT_S)
    # teacher=vllm: its dense decode (the served top-k, the tail spread evenly) re-encoded as topk with
    # k <= the served k gives back the served ids and values (run/checks refuses other encodings)
    prefetch = getattr(teacher, "prefetch", None)

    def compute(chunk: int) -> None:
        store.generator.manual_seed(int(options.seed) * 1_000_003 + chunk)
        beat = time.monotonic()
        def batch_at(start: int) -> dict[str, Tensor]:
            items = [dataset[i] for i in chunks[chunk][start:start + batch_size]]
            return {k: torch.stack([x[k] for x in items]).to(device) for k in ("input_ids", "attention_mask")}

        starts = range(0, len(chunks[chunk]), batch_size)
        for start in starts:
            if time.monotonic() - beat >= HEARTBEAT_S:
                _heartbeat(directory, chunk)
                beat = time.monotonic()
            batch = batch_at(start)
            if prefetch is not None and start + batch_size in starts:  # a served teacher scores the next batch meanwhile
                upcoming = batch_at(start + batch_size)
                if store.missing(row_keys(upcoming["input_ids"], upcoming["attention_mask"])):
                    prefetch(upcoming)
            keys = row_keys(batch["input_ids"], batch["attention_mask"])
            if store.missing(keys):
                store.put(keys, CausalLM.logits(teacher, batch).float(), 0.0)
        store.flush()

    def done(chunk: int) -> bool:
        return store.written(chunk_keys(chunk))

    log.info("Storing teacher '%s' outputs (%s) for %d training samples at %s", name,
             encoding, len(dataset), directory)
    for chunk in order:
        if _claim(directory, chunk):
            if not done(chunk):
                compute(chunk)
    pending = [chunk for chunk in order if not done(chunk)]
    while pending:  # chunks others claimed: wait for them, or take over those whose writer died
        for chunk in pending:
            if _claim(directory, chunk, steal=True, timeout_s=timeout_s):
                compute(chunk)
        time.sleep(0.5)
        store.scan()
        pending = [chunk for chunk in pending if not done(chunk)]
    if store.stats["truncated_rows"]:
        log.warning("teacher_cache: %d rows drew more than k=%d unique ids from %d draws; their k most drawn ids were "
                    "kept, renormalised (biased). k >= num_draws never truncates", store.stats["truncated_rows"],
                    encoding.k, encoding.num_draws)
    atomic_write_json(covers_path(directory, covers["data_fingerprint"]), covers)
    for chunk in range(len(chunks)):
        (directory / f".claim-{chunk}").unlink(missing_ok=True)
    return directory


class CachedTeacher(nn.Module):
    """A teacher that is an offline store: `targets(batch)` gives sparse targets for `sparse_kl`,
    calling it gives dense log-probabilities for any other loss. No parameters (nothing in
    checkpoints); only the training split is stored."""

    sparse_targets = True

    def __init__(self, store: TeacherOutputStore, sparse: bool, tail: str = "uniform") -> None:
        super().__init__()
        self.store, self.sparse, self.tail = store, sparse, check_tail_mode(tail)
        self.vocab_size = store.vocab_size

    def _missing(self, count: int) -> KeyError:
        return KeyError(f"teacher=cached: {count} row(s) of this batch are not in {self.store.directory}: the store "
                        f"covers the training split it was built for; rebuild it with: "
                        f"{BUILD.format(dir=self.store.directory)}")

    def stored(self, batch: dict[str, Tensor]) -> SparseTargets:
        """Unaligned sparse targets [B, seq_len, k] of the batch's rows as stored (position t: the
        teacher's distribution for token t + 1; topk: with the tail's mass unless ``tail="drop"``)."""
        keys, length = row_keys(batch["input_ids"], batch.get("attention_mask")), batch["input_ids"].shape[1]
        found = self.store.targets(keys, length, self.tail)
        if found is None:
            raise self._missing(len(self.store.missing(keys)))
        device = batch["input_ids"].device
        tail = None if found.tail is None else found.tail.to(device, torch.float32, non_blocking=True)
        return SparseTargets(found.indices.to(device, non_blocking=True),
                             found.probs.to(device, torch.float32, non_blocking=True), tail)

    def targets(self, batch: dict[str, Tensor]) -> SparseTargets:
        """Aligned sparse targets [B, seq_len - 1, k] of the batch's rows (topk: with the tail's mass
        unless ``tail="drop"``)."""
        found = self.stored(batch)
        return SparseTargets(found.indices[:, :-1], found.probs[:, :-1], None if found.tail is None else found.tail[:, :-1])

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs: Any) -> CausalLMOutput:
        logprobs = self.store.get(row_keys(input_ids, attention_mask), input_ids.shape[1])
        if logprobs is None:
            raise self._missing(len(self.store.missing(row_keys(input_ids, attention_mask))))
        return CausalLMOutput(logits=logprobs.to(input_ids.device, non_blocking=True))


def load_cached_teacher(options: TeacherCacheOptions, datamodule: Any, *, sparse: bool = False) -> CachedTeacher:
    """The `teacher=cached` reader of the store at `options.directory`; fails before training when the
    store does not fit this run (its data or `options.store.encoding`). `sparse`: the loss reads
    sparse targets (`sparse_kl`), with `options.tail` for a topk store's tail."""
    if not options.directory:
        raise ValueError(f"teacher=cached: no store directory given; pass teacher_cache.dir=<dir> (or teacher.dir=) "
                         f"as printed by stage=cache_teacher; build one with: {BUILD.format(dir='<dir>')}")
    directory = Path(str(options.directory)).expanduser()
    datamodule.setup("fit")
    covers = coverage(datamodule, len(datamodule.datasets["train"]))
    records = sorted(directory.glob("covers-*.json"))
    if not records:
        raise FileNotFoundError(f"teacher=cached: no teacher-target cache at {directory} (no complete store); build "
                                f"it with: {BUILD.format(dir=directory)}")
    if not covers_path(directory, covers["data_fingerprint"]).is_file():
        found = json.loads(records[0].read_text())
        differ = [k for k in covers if found.get(k) != covers[k]]
        raise ValueError(f"teacher=cached: cache {directory} was built for " + ", ".join(
            f"{k.replace('_', ' ')} {found.get(k)!r} but this run has {covers[k]!r}" for k in differ)
            + "; rebuild it with stage=cache_teacher")
    fix = f"re-run stage=cache_teacher with the same settings and teacher_cache.dir={directory}: it replaces the part"
    store = TeacherOutputStore(directory, None, damaged="error", what="teacher=cached", damaged_fix=fix)
    wanted, stored = options.store.encoding.params(), store.encoding.params()
    if stored != wanted:
        differ = [k for k in wanted if stored[k] != wanted[k]]
        raise ValueError(f"teacher=cached: cache {directory} was built with " + ", ".join(
            f"teacher_cache.{k}={stored[k]!r}" for k in differ)
            + " but this run has " + ", ".join(f"{wanted[k]!r}" for k in differ)
            + "; pass the same teacher_cache.* settings or rebuild it with stage=cache_teacher")
    tail = str(options.tail or "uniform")
    log.info("Reading teacher targets (%s%s) from %s", store.encoding,
             f", tail={tail}" if sparse and store.encoding.encoding == "topk" else "", directory)
    return CachedTeacher(store, sparse, tail)


__all__ = ["CachedTeacher", "Encoding", "TeacherCacheOptions", "cache_teacher_targets", "coverage", "load_cached_teacher"]
