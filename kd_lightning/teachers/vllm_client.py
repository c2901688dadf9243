"""The HTTP side of a teacher served by vLLM (`teacher=vllm`): requests, retries, parsing.

A vLLM OpenAI-compatible server (``python -m vllm.entrypoints.openai.api_server``, see
scripts/vllm_server.sh) scores token ids it is given: ``POST /v1/completions`` with ``"prompt":
[[ids], ...]``, ``"max_tokens": 1`` and ``"prompt_logprobs": k`` returns, per prompt, one entry per
position (``null`` first), each a map ``"<token id>" -> {"logprob", "rank", "decoded_token"}`` with the
k most likely next tokens plus the actual one. Entry t is the teacher's distribution for token t given
tokens < t; the teacher store's position t is the distribution for token t + 1, so
``stored[t] = entries[t + 1]``. The actual token is kept only when it is among the top k: what comes
back is the store's ``topk`` encoding (k ids, their log-probabilities, the tail's mass), so a served
teacher feeds exactly the targets `teacher=cached` with ``encoding=topk`` would.

Only the standard library is used (urllib, json), so nothing here depends on vLLM.
"""

from __future__ import annotations

import json
import logging
import math
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

log = logging.getLogger("kd_lightning")

RETRY_STATUS = (408, 429, 500, 502, 503, 504)  # the server is busy, restarting or its engine died


class TeacherUnavailable(RuntimeError):
    """The served teacher did not answer after every retry. The step that needed it did not run:
    the run stops, saving the last finished step (`resumable`), never training on a made-up target."""

    resumable = True  # `CheckpointOnSigterm.on_exception` saves `last.ckpt` for it (one process)


class TeacherRefused(RuntimeError):
    """The server answered with an error that a retry cannot fix (HTTP 4xx: a bad request)."""


@dataclass(frozen=True)
class ServedTeacherOptions:
    """`teacher=vllm` typed (conf/teacher/vllm.yaml says what each key is for).

    Args:
        urls: the servers (``http://host:port``); requests are spread over them, each rank starting
            at a different one, and a failed request is retried on the next.
        served_model: the model id the servers must serve (``GET /v1/models``; vLLM names it after
            ``--model`` unless ``--served-model-name`` is given).
        top_k: log-probabilities per position (``prompt_logprobs``; a vLLM server allows up to its
            ``--max-logprobs``, 20 by default).
        rows_per_request: rows (sequences) per HTTP request; a batch's requests run concurrently.
        concurrency: requests in flight at once (threads).
        prefetch_batches: training batches whose requests are sent before their step.
        timeout_s: seconds one request may take. Generous on purpose: a request that times out is sent
            again while the server may still be computing it, which only adds to a busy server's queue.
        retries: further tries of a failed request (on the next server), after waits of
            ``backoff_s * 2**attempt`` seconds (capped at 30 s).
        probe_text: the text both tokenizers must turn into the same ids before training.
        tail: how `sparse_kl` reads the tail's mass (``teacher_cache.tail``).
    """

    urls: tuple[str, ...] = ("http://127.0.0.1:8000",)
    served_model: str = ""
    top_k: int = 20
    rows_per_request: int = 8
    concurrency: int = 4
    prefetch_batches: int = 2
    timeout_s: float = 600.0
    retries: int = 4
    backoff_s: float = 1.0
    probe_text: str = "Knowledge distillation: def f(x):\n    return x + 1  # 3.14"
    tail: str = "uniform"

    def __post_init__(self) -> None:
        if not self.urls:
            raise ValueError("teacher.urls: give at least one server URL (http://host:port)")
        for key in ("top_k", "rows_per_request", "concurrency"):
            if int(getattr(self, key)) < 1:
                raise ValueError(f"teacher.{key}={getattr(self, key)!r}: must be >= 1")
        if int(self.prefetch_batches) < 0 or int(self.retries) < 0 or float(self.timeout_s) <= 0:
            raise ValueError("teacher.prefetch_batches and teacher.retries must be >= 0, teacher.timeout_s > 0")


class VllmClient:
    """Blocking calls to a set of vLLM servers, with timeouts and retries with exponential backoff.

    `rank` picks the first server, so N data-parallel processes start spread over the servers; each
    further request goes to the next server in turn."""

    def __init__(self, options: ServedTeacherOptions, rank: int = 0, sleep: Any = time.sleep) -> None:
        self.options, self.sleep = options, sleep
        self.urls = [u.rstrip("/") for u in options.urls]
        self.turn = int(rank)
        self.retried = 0  # requests that needed another try (logged in the summary)

    def _call(self, url: str, path: str, payload: dict[str, Any] | None) -> Any:
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(url + path, data=data, method="GET" if data is None else "POST",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=float(self.options.timeout_s)) as response:
            return json.loads(response.read())

    def request(self, path: str, payload: dict[str, Any] | None = None, url: str | None = None) -> Any:
        """The decoded JSON answer of one call, retried (next server, growing waits) on connection
        errors, timeouts and HTTP 408/429/5xx; `TeacherRefused` on any other HTTP error, at once."""
        tries = int(self.options.retries) + 1
        problems = []
        for attempt in range(tries):
            if url is not None:
                target = url
            else:
                target = self.urls[self.turn % len(self.urls)]
                self.turn += 1
            try:
                return self._call(target, path, payload)
            except urllib.error.HTTPError as error:
                body = error.read().decode(errors="replace")[:500]
                if error.code not in RETRY_STATUS:
                    raise TeacherRefused(f"{target}{path} answered HTTP {error.code}: {body}") from error
                problems.append(f"{target}: HTTP {error.code} {body[:120]}")
            except (OSError, ValueError) as error:  # URLError, refused, reset, timeout; a cut-off JSON answer
                problems.append(f"{target}: {type(error).__name__}: {getattr(error, 'reason', error)}")
            if attempt + 1 < tries:
                self.retried += 1
                wait = min(float(self.options.backoff_s) * 2 ** attempt, 30.0)
                log.warning("teacher=vllm: %s; retrying in %.1f s (%d/%d)", problems[-1], wait, attempt + 1, tries - 1)
                self.sleep(wait)
        raise TeacherUnavailable(f"teacher=vllm: {path} failed {tries} time(s) ({'; '.join(problems[-3:])})")

    def models(self, url: str) -> list[dict[str, Any]]:
        """What `url` serves (``GET /v1/models``): entries with ``id`` (and ``max_model_len``)."""
        return list(self.request("/v1/models", url=url).get("data") or [])

    def tokenize(self, url: str, text: str) -> list[int]:
        """The server tokenizer's ids of `text`, without special tokens (``POST /tokenize``)."""
        answer = self.request("/tokenize", {"model": self.options.served_model, "prompt": text,
                                            "add_special_tokens": False}, url=url)
        return [int(i) for i in answer["tokens"]]

    def prompt_logprobs(self, rows: Sequence[Sequence[int]], url: str | None = None) -> list[list[Any]]:
        """Per row, vLLM's ``prompt_logprobs`` list (one entry per position, the first null)."""
        payload = {"model": self.options.served_model, "prompt": [list(map(int, r)) for r in rows],
                   "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": int(self.options.top_k)}
        choices = sorted(self.request("/v1/completions", payload, url=url)["choices"], key=lambda c: c["index"])
        if len(choices) != len(rows):
            raise TeacherUnavailable(f"teacher=vllm: asked for {len(rows)} prompts, got {len(choices)} answers")
        return [c.get("prompt_logprobs") or [None] for c in choices]


def parse_row(entries: Sequence[Any], length: int, k: int) -> tuple[Tensor, Tensor]:
    """(ids long [length, k], log-probabilities float32 [length, k]) of one row in the store's
    positions: position t holds entry t + 1's k most likely ids, sorted. Positions without an entry
    (the last real token, padding) hold ids 0..k-1 at log-probability -inf (all mass in the tail);
    no loss counts them."""
    ids = torch.arange(k).repeat(length, 1)
    values = torch.full((length, k), float("-inf"))
    for position in range(min(length, len(entries) - 1)):
        entry = entries[position + 1]
        if not entry:
            raise TeacherUnavailable(f"teacher=vllm: no log-probabilities for position {position + 1}")
        best = sorted(((float(v["logprob"]), int(t)) for t, v in entry.items()), reverse=True)[:k]
        got = [t for _, t in best]
        if len(got) < k:  # a vocabulary smaller than k: pad with ids not used, at probability 0
            got += [i for i in range(k + len(got)) if i not in set(got)][: k - len(got)]
        ids[position] = torch.tensor(got)
        values[position, : len(best)] = torch.tensor([v for v, _ in best])
    return ids, values


def topk_tensors(rows_entries: Sequence[Sequence[Any]], length: int, k: int) -> dict[str, Tensor]:
    """The store's ``topk`` tensors (float32 values) of a batch: ``ids`` [B, L, k], ``values``
    [B, L, k] (log-probabilities), ``tail`` [B, L] (1 - the k probabilities' sum)."""
    parsed = [parse_row(entries, length, k) for entries in rows_entries]
    ids = torch.stack([p[0] for p in parsed])
    values = torch.stack([p[1] for p in parsed])
    tail = (1.0 - values.exp().sum(-1)).clamp_min(0.0)
    if not torch.isfinite(values.exp().sum(-1)).all() or math.isnan(float(tail.sum())):
        raise TeacherUnavailable("teacher=vllm: the server returned non-finite probabilities")
    return {"ids": ids, "values": values, "tail": tail}


__all__ = ["ServedTeacherOptions", "TeacherRefused", "TeacherUnavailable", "VllmClient", "parse_row", "topk_tensors"]
