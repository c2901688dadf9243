"""An in-process stand-in for a vLLM OpenAI-compatible server (stdlib `http.server` in a thread) that
speaks the JSON `kd_lightning.teachers.vllm_client` reads: `GET /v1/models`, `POST /tokenize`,
`POST /v1/completions` with `prompt_logprobs`. Its teacher is any torch causal LM (or a function of
the ids); failures are injected by count."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch


class FakeVllm:
    """`FakeVllm(logprobs_of, tokenize)`: `logprobs_of(ids [L]) -> [L, V]` log-probabilities (row t:
    the distribution of token t + 1), `tokenize(text) -> ids`. `fail_next`: the next requests answer
    `fail_status` (503: retried; 400: refused); `die_after`: completions beyond this count answer 503
    for good (a dead engine behind a live front end). `requests` counts completions calls, `rows` their prompts."""

    def __init__(self, logprobs_of: Callable[[list[int]], torch.Tensor], tokenize: Callable[[str], list[int]],
                 model: str = "fake-teacher", max_model_len: int = 512, max_logprobs: int = 20) -> None:
        self.logprobs_of, self.tokenize, self.model = logprobs_of, tokenize, model
        self.max_model_len, self.max_logprobs = max_model_len, max_logprobs
        self.fail_next, self.fail_status, self.die_after = 0, 503, None
        self.requests, self.rows, self.lock = 0, 0, threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def _send(self, status: int, body: Any) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path == "/v1/models":
                    self._send(200, {"object": "list", "data": [{"id": fake.model, "object": "model",
                                                                 "max_model_len": fake.max_model_len}]})
                else:
                    self._send(404, {"error": "not found"})

            def do_POST(self) -> None:
                payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                status, body = fake.answer(self.path, payload)
                self._send(status, body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeVllm:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()

    def answer(self, path: str, payload: dict[str, Any]) -> tuple[int, Any]:
        if payload.get("model") != self.model:
            return 404, {"error": f"model {payload.get('model')!r} does not exist"}
        if path == "/tokenize":
            return 200, {"tokens": self.tokenize(payload["prompt"]), "count": 0, "max_model_len": self.max_model_len}
        if path != "/v1/completions":
            return 404, {"error": "not found"}
        with self.lock:
            self.requests += 1
            if self.fail_next > 0:
                self.fail_next -= 1
                return self.fail_status, {"error": "injected failure"}
            if self.die_after is not None and self.requests > self.die_after:
                return 503, {"error": "engine dead"}
        k = int(payload["prompt_logprobs"])
        if k > self.max_logprobs:
            return 400, {"error": f"Requested prompt logprobs of {k}, which is greater than max allowed: {self.max_logprobs}"}
        choices = []
        for index, ids in enumerate(payload["prompt"]):
            with self.lock:
                self.rows += 1
            choices.append({"index": index, "text": "", "prompt_logprobs": prompt_logprobs(self.logprobs_of(ids), ids, k)})
        return 200, {"object": "text_completion", "model": self.model, "choices": choices}


def prompt_logprobs(logprobs: torch.Tensor, ids: list[int], k: int) -> list[Any]:
    """vLLM's `prompt_logprobs`: null, then for token t >= 1 the top-k of row t - 1 plus the actual
    token t (with its rank) when it is not among them."""
    out: list[Any] = [None]
    for t in range(1, len(ids)):
        row = logprobs[t - 1].float()
        values, top = row.topk(k)
        entry = {str(int(i)): {"logprob": float(v), "rank": r + 1, "decoded_token": "x"}
                 for r, (v, i) in enumerate(zip(values.tolist(), top.tolist()))}
        if str(ids[t]) not in entry:
            rank = int((row > row[ids[t]]).sum()) + 1
            entry[str(ids[t])] = {"logprob": float(row[ids[t]]), "rank": rank, "decoded_token": "y"}
        out.append(entry)
    return out


def model_logprobs(model: torch.nn.Module) -> Callable[[list[int]], torch.Tensor]:
    """A causal LM as the fake server's teacher: log-softmax of its logits for the ids."""

    @torch.no_grad()
    def logprobs_of(ids: list[int]) -> torch.Tensor:
        return model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)

    return logprobs_of
