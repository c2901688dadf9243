"""A teacher served by vLLM in its own process (`teacher=vllm`): the same sparse targets as the
teacher store, fetched over HTTP ahead of the step.

`ServedTeacher` looks to the module exactly like `teacher=cached` (`CachedTeacher`): `sparse_targets`,
`stored(batch)` gives unaligned top-k targets [B, L, k] with the tail's mass (read by `loss=sparse_kl`),
and calling it gives the dense decode (`kd_lightning.teachers.encodings.decode_dense`: log p at the k
ids, the tail spread uniformly) for every other same-vocabulary loss. The encoding is the store's
``topk`` with float32 values, so both paths reuse the store's decoders.

Prefetch: the training loader calls `prefetch(batch)` as it reads each batch, `prefetch_batches`
batches before its step (`LMDataModule.read_ahead`); the batch's rows go out in requests of
`rows_per_request` rows on a thread pool, and `stored(batch)` only waits for what is not back yet.
A batch that was not prefetched (or a failed prefetch) is requested again at its step.

`stage=cache_teacher teacher=vllm` writes the served targets into the teacher store (encoding
``topk`` with k <= ``top_k``: the stored top-k is the served one, the tail its remaining mass), so a
sweep reads them with `teacher=cached` and the server scores each sample once.

Before training, `check_servers` refuses a server that does not answer, serves another model, or
tokenizes differently from the data; during training a request that fails after every retry raises
`TeacherUnavailable` (the run stops with its last step saved), never a zero target.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from torch import Tensor, nn
from transformers.modeling_outputs import CausalLMOutput

from kd_lightning.errors import ConfigError
from kd_lightning.losses.sparse import SparseTargets, check_tail_mode
from kd_lightning.teachers.encodings import Encoding, decode_dense, decode_targets
from kd_lightning.teachers.store import row_keys
from kd_lightning.teachers.vllm_client import (ServedTeacherOptions, TeacherRefused, TeacherUnavailable, VllmClient,
                                               topk_tensors)

log = logging.getLogger("kd_lightning")

START = "start one with: scripts/vllm_server.sh serve <model dir> <port> (README, 'A teacher served by vLLM')"
MAX_PENDING = 64  # prefetched batches never asked for (a loader read ahead at the end of a fit) are dropped


def real_tokens(input_ids: Tensor, attention_mask: Tensor | None) -> list[list[int]]:
    """Each row's ids up to its padding. Padding must be on the right: the server scores a prefix."""
    if attention_mask is None:
        return input_ids.tolist()
    lengths = attention_mask.sum(-1)
    expected = torch.arange(input_ids.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)
    if not torch.equal(attention_mask.bool().cpu(), expected.cpu()):
        raise ValueError("teacher=vllm: batches must be right-padded (attention_mask 1...1 0...0)")
    return [row[:n].tolist() for row, n in zip(input_ids.cpu(), lengths.tolist())]


class ServedTeacher(nn.Module):
    """Sparse top-k targets from vLLM servers. No parameters: nothing in checkpoints, nothing to
    move to a device; the held-out evaluation skips it like `teacher=cached`."""

    sparse_targets = True
    evaluation_note = "served by vLLM: top-k targets only, not scored on the test split"

    def __init__(self, options: ServedTeacherOptions, vocab_size: int, *, sparse: bool, rank: int = 0,
                 client: VllmClient | None = None) -> None:
        super().__init__()
        self.options, self.vocab_size, self.sparse = options, int(vocab_size), sparse
        self.tail = check_tail_mode(options.tail)
        self.encoding = Encoding("topk", "float32", k=int(options.top_k))
        self.client = client or VllmClient(options, rank=rank)
        self.pool = ThreadPoolExecutor(max_workers=int(options.concurrency), thread_name_prefix="vllm-teacher")
        self.pending: OrderedDict[bytes, list[Future[list[Any]]]] = OrderedDict()
        self.stats = {"rows": 0, "prefetched_batches": 0, "waited_s": 0.0}

    @property
    def store_weights(self) -> str:
        """What stands for the weights in a teacher store's identity (`stage=cache_teacher teacher=vllm`):
        the served model's id; the server's precision is not known here (say it in the id if it matters)."""
        return f"served:{self.options.served_model}"

    def _submit(self, rows: list[list[int]]) -> list[Future[list[Any]]]:
        step = int(self.options.rows_per_request)
        return [self.pool.submit(self._score, rows[i:i + step]) for i in range(0, len(rows), step)]

    def _score(self, rows: list[list[int]]) -> list[Any]:
        """vLLM's entries per row; an empty row (all padding) is not sent and has none."""
        sent = [row for row in rows if row]
        answers = iter(self.client.prompt_logprobs(sent) if sent else [])
        return [next(answers) if row else [None] for row in rows]

    @staticmethod
    def _key(input_ids: Tensor, attention_mask: Tensor | None) -> bytes:
        return hashlib.blake2b(b"".join(row_keys(input_ids, attention_mask)), digest_size=16).digest()

    def prefetch(self, batch: dict[str, Any]) -> None:
        """Send the batch's requests now; `stored(batch)` collects them at its step."""
        if "input_ids" not in batch:
            return
        key = self._key(batch["input_ids"], batch.get("attention_mask"))
        if key in self.pending:
            return
        self.pending[key] = self._submit(real_tokens(batch["input_ids"], batch.get("attention_mask")))
        self.stats["prefetched_batches"] += 1
        while len(self.pending) > MAX_PENDING:
            for future in self.pending.popitem(last=False)[1]:
                future.cancel()

    def _tensors(self, input_ids: Tensor, attention_mask: Tensor | None) -> dict[str, Tensor]:
        futures = self.pending.pop(self._key(input_ids, attention_mask), None)
        if futures is None:
            futures = self._submit(real_tokens(input_ids, attention_mask))
        start = time.perf_counter()
        entries: list[Any] = []
        for future in futures:
            entries.extend(future.result())  # TeacherUnavailable / TeacherRefused propagate: the step fails
        self.stats["waited_s"] += time.perf_counter() - start
        self.stats["rows"] += len(entries)
        return topk_tensors(entries, input_ids.shape[1], int(self.options.top_k))

    def stored(self, batch: dict[str, Tensor]) -> SparseTargets:
        """Unaligned sparse targets [B, L, k] (position t: the teacher's distribution for token t + 1),
        with the tail's mass unless ``tail="drop"``; as `CachedTeacher.stored`."""
        tensors = self._tensors(batch["input_ids"], batch.get("attention_mask"))
        found = decode_targets(self.encoding, tensors, self.tail)
        device = batch["input_ids"].device
        return SparseTargets(found.indices.to(device), found.probs.to(device),
                             None if found.tail is None else found.tail.to(device))

    def targets(self, batch: dict[str, Tensor]) -> SparseTargets:
        """Aligned sparse targets [B, L - 1, k]."""
        found = self.stored(batch)
        return SparseTargets(found.indices[:, :-1], found.probs[:, :-1], None if found.tail is None else found.tail[:, :-1])

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs: Any) -> CausalLMOutput:
        """Dense log-probabilities [B, L, V] of the top-k targets, the tail spread uniformly."""
        tensors = self._tensors(input_ids, attention_mask)
        return CausalLMOutput(logits=decode_dense(self.encoding, tensors, self.vocab_size).to(input_ids.device))

    def close(self) -> None:
        for futures in self.pending.values():
            for future in futures:
                future.cancel()
        self.pending.clear()
        self.pool.shutdown(wait=False, cancel_futures=True)


def check_servers(options: ServedTeacherOptions, tokenizer: Any, seq_len: int, client: VllmClient | None = None) -> None:
    """Refuse, before training, a server that does not answer, serves another model than
    `options.served_model`, accepts shorter sequences than `seq_len`, tokenizes `options.probe_text`
    differently from the data's `tokenizer`, or refuses `top_k` log-probabilities."""
    client = client or VllmClient(options)
    for index, url in enumerate(client.urls):
        where = f"teacher.urls[{index}]={url}"
        try:
            served = client.models(url)
        except (TeacherUnavailable, TeacherRefused) as error:
            raise ConfigError(f"{where}: no vLLM server answers ({error}); {START}") from error
        names = [str(m.get("id")) for m in served]
        entry = next((m for m in served if str(m.get("id")) == options.served_model), None)
        if entry is None:
            raise ConfigError(f"{where} serves {names}, not teacher.served_model={options.served_model!r}: pass "
                              f"teacher.served_model={names[0] if names else '<id>'} or start the server with "
                              f"--model {options.served_model}")
        limit = entry.get("max_model_len")
        if limit is not None and int(limit) < int(seq_len) + 1:
            raise ConfigError(f"{where}: the server takes at most {limit} tokens (--max-model-len) but dataset.seq_len="
                              f"{seq_len} needs {int(seq_len) + 1}; restart it with --max-model-len {int(seq_len) + 1} "
                              "or more, or lower dataset.seq_len")
        theirs = client.tokenize(url, options.probe_text)
        ours = [int(i) for i in tokenizer.encode(options.probe_text, add_special_tokens=False)]
        if theirs != ours:
            first = next((i for i, (a, b) in enumerate(zip(theirs, ours)) if a != b), min(len(theirs), len(ours)))
            raise ConfigError(f"{where}: the server's tokenizer differs from the data's (dataset.tokenizer): "
                              f"teacher.probe_text gives {len(theirs)} ids there, {len(ours)} here, first difference at "
                              f"position {first} ({theirs[first:first + 3]} vs {ours[first:first + 3]}); serve a "
                              "model with the data's tokenizer, or set dataset.tokenizer to the served model's")
        try:
            client.prompt_logprobs([ours[:2] or [0, 0]], url=url)
        except TeacherRefused as error:
            raise ConfigError(f"{where} refused prompt_logprobs={options.top_k} ({error}); lower teacher.top_k or "
                              f"restart the server with --max-logprobs {options.top_k}") from error
        except TeacherUnavailable as error:  # it lists the model but cannot score (e.g. its engine died)
            raise ConfigError(f"{where} answers but could not score a probe ({error}); see the server's log") from error
    log.info("teacher=vllm: %d server(s) serve %s with the data's tokenizer (top-%d log-probabilities)",
             len(client.urls), options.served_model, options.top_k)


__all__ = ["ServedTeacher", "ServedTeacherOptions", "TeacherUnavailable", "check_servers", "real_tokens"]
