"""`teacher=vllm` against an in-process fake vLLM server (tests/fake_vllm.py): parsing, batching,
prefetch, retries with backoff, refusals before training, one end-to-end run. Nothing here needs vLLM
(tests/test_served_teacher_vllm.py runs a real server in the slow tier)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch

from kd_lightning.errors import ConfigError
from kd_lightning.run.pipeline import run
from kd_lightning.teachers.encodings import Encoding, decode_dense, decode_targets, encode
from kd_lightning.teachers.served import ServedTeacher, check_servers
from kd_lightning.teachers.vllm_client import (ServedTeacherOptions, TeacherRefused, TeacherUnavailable, VllmClient,
                                               topk_tensors)
from tests.fake_vllm import FakeVllm, model_logprobs, prompt_logprobs
from tests.helpers import V, tiny_lm

K = 5


def options(*urls: str, **kwargs) -> ServedTeacherOptions:
    return ServedTeacherOptions(urls=urls, **{"served_model": "fake-teacher", "top_k": K, "backoff_s": 0.01,
                                               "timeout_s": 5, **kwargs})


class IdTokenizer:
    """Text -> ids as the fake server's tokenizer and the data's (bytes mod V)."""

    def __init__(self, shift: int = 0) -> None:
        self.shift = shift

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [(b + self.shift) % V for b in text.encode()]


@pytest.fixture(scope="module")
def teacher_lm() -> torch.nn.Module:
    return tiny_lm(0).eval()


def fake(teacher_lm, **kwargs) -> FakeVllm:
    return FakeVllm(model_logprobs(teacher_lm), IdTokenizer().encode, **kwargs)


def free_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"  # closed again: nothing listens there


def batch(B: int = 5, L: int = 9, pad: int = 3) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, V, (B, L), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    if pad:
        mask[-1, -pad:] = 0  # right padding on the last row
    return {"input_ids": ids, "attention_mask": mask}


def test_parsing_shifts_to_store_positions_keeps_topk_and_pads() -> None:
    logprobs = torch.randn(4, V).log_softmax(-1)
    ids = [3, 7, 1, 9]
    entries = prompt_logprobs(logprobs, ids, K)  # entry t: the distribution of token t (row t - 1)
    tensors = topk_tensors([entries], 6, K)
    assert tensors["ids"].shape == (1, 6, K) and tensors["tail"].shape == (1, 6)
    values, top = logprobs.topk(K)
    assert torch.equal(tensors["ids"][0, :3], top[:3])  # position t: token t + 1's distribution; the extra actual token dropped
    assert torch.allclose(tensors["values"][0, :3], values[:3])
    assert torch.allclose(tensors["tail"][0, :3], 1 - values[:3].exp().sum(-1))
    assert torch.isneginf(tensors["values"][0, 3:]).all() and (tensors["tail"][0, 3:] == 1).all()  # last token, padding


def test_served_targets_equal_the_stores_topk_targets(teacher_lm) -> None:
    """What a served teacher gives is what the teacher store's topk encoding (float32) gives for the
    same teacher: sparse targets for sparse_kl and the dense decode for the other losses."""
    data = batch(pad=0)
    with fake(teacher_lm) as server:
        teacher = ServedTeacher(options(server.url, rows_per_request=2), V, sparse=True)
        got = teacher.stored(data)
        dense = teacher(data["input_ids"], data["attention_mask"]).logits
        teacher.close()
    encoding = Encoding("topk", "float32", k=K)
    with torch.no_grad():
        logprobs = teacher_lm(input_ids=data["input_ids"]).logits.float().log_softmax(-1)
    tensors = encode(encoding, logprobs)
    want = decode_targets(encoding, tensors, "uniform")
    L = data["input_ids"].shape[1]
    assert torch.equal(got.indices[:, : L - 1], want.indices[:, : L - 1])
    assert torch.allclose(got.probs[:, : L - 1], want.probs[:, : L - 1], atol=1e-5)
    assert torch.allclose(got.tail[:, : L - 1], want.tail[:, : L - 1].float(), atol=1e-3)
    assert torch.allclose(dense[:, : L - 1], decode_dense(encoding, tensors, V)[:, : L - 1], atol=1e-3)


def test_batch_is_split_into_requests_and_prefetch_is_not_sent_twice(teacher_lm) -> None:
    data = batch()
    with fake(teacher_lm) as server:
        teacher = ServedTeacher(options(server.url, rows_per_request=2), V, sparse=True)
        teacher.prefetch(data)
        teacher.prefetch(data)  # the same batch again: nothing more is sent
        first = teacher.stored(data)  # collects the prefetched answers
        assert (server.requests, server.rows) == (3, 5)  # 5 rows, 2 per request
        again = teacher.stored(data)  # not prefetched any more: sent now
        assert (server.requests, server.rows) == (6, 10)
        teacher.close()
    assert torch.equal(first.indices, again.indices)
    assert torch.isneginf(first.probs.log()[-1, -4:]).all()  # the padded row's tail positions: all mass in the tail


def test_transient_failures_are_retried_with_growing_waits(teacher_lm) -> None:
    waits: list[float] = []
    with fake(teacher_lm) as server:
        server.fail_next = 2
        client = VllmClient(options(server.url, backoff_s=0.5), sleep=waits.append)
        assert len(client.prompt_logprobs([[1, 2, 3]])[0]) == 3
    assert waits == [0.5, 1.0] and client.retried == 2


def test_a_dead_server_passes_its_requests_to_the_next(teacher_lm) -> None:
    waits: list[float] = []
    with fake(teacher_lm) as server:
        client = VllmClient(options(free_port_url(), server.url), sleep=waits.append)  # rank 0 starts at the dead one
        assert len(client.prompt_logprobs([[1, 2]])[0]) == 2
        assert server.requests == 1 and len(waits) == 1
        spread = VllmClient(options(server.url, free_port_url()), rank=0, sleep=waits.append)
        other_rank = VllmClient(options(free_port_url(), server.url), rank=1, sleep=waits.append)
        spread.prompt_logprobs([[1, 2]]), other_rank.prompt_logprobs([[1, 2]])
        assert len(waits) == 1  # each started at the live server


def test_no_answer_after_every_retry_is_an_error_never_a_zero_target(teacher_lm) -> None:
    with fake(teacher_lm) as server:
        server.die_after = 0
        teacher = ServedTeacher(options(server.url, retries=2), V, sparse=True,
                                client=VllmClient(options(server.url, retries=2), sleep=lambda s: None))
        with pytest.raises(TeacherUnavailable, match="failed 3 time"):
            teacher.stored(batch())
        teacher.close()
    assert TeacherUnavailable.resumable  # the run saves its last step (CheckpointOnSigterm)


def test_a_bad_request_is_refused_at_once(teacher_lm) -> None:
    with fake(teacher_lm) as server:
        server.fail_next, server.fail_status = 1, 400
        with pytest.raises(TeacherRefused, match="HTTP 400"):
            VllmClient(options(server.url), sleep=lambda s: pytest.fail("no retry")).prompt_logprobs([[1, 2]])


def test_servers_are_checked_before_training(teacher_lm) -> None:
    ours = IdTokenizer()
    with pytest.raises(ConfigError, match=r"teacher.urls\[0\].*no vLLM server answers.*vllm_server.sh"):
        check_servers(options(free_port_url(), retries=0), ours, 64)
    with fake(teacher_lm, model="other") as server:
        with pytest.raises(ConfigError, match=r"serves \['other'\], not teacher.served_model='fake-teacher'"):
            check_servers(options(server.url), ours, 64)
    with fake(teacher_lm, max_model_len=32) as server:
        with pytest.raises(ConfigError, match="--max-model-len 65"):
            check_servers(options(server.url), ours, 64)
    with fake(teacher_lm, max_logprobs=3) as server:
        with pytest.raises(ConfigError, match="lower teacher.top_k or restart the server with --max-logprobs 5"):
            check_servers(options(server.url), ours, 64)
    with fake(teacher_lm) as server:
        with pytest.raises(ConfigError, match="tokenizer differs from the data's.*first difference at position 0"):
            check_servers(options(server.url), IdTokenizer(shift=1), 64)
        check_servers(options(server.url), ours, 64)  # all well


def test_distill_with_a_served_teacher(make_cfg, tmp_path: Path) -> None:
    """The real entry point: teacher=vllm + loss=sparse_kl on the embedded data, the fake server's
    teacher a tiny Llama of the byte vocabulary; every training row is requested ahead of its step."""
    cfg = make_cfg("teacher=vllm", "loss=sparse_kl", "baseline=false", "teacher.top_k=8", "teacher.rows_per_request=4")
    from kd_lightning.data.tokenizer import load_tokenizer  # the data's byte tokenizer (259 ids)

    tokenizer = load_tokenizer(cfg.dataset.tokenizer)
    lm = tiny_lm(0, vocab=len(tokenizer)).eval()
    with FakeVllm(model_logprobs(lm), lambda text: tokenizer.encode(text, add_special_tokens=False)) as server:
        cfg.teacher.urls, cfg.teacher.served_model = [server.url], server.model
        summary = run(cfg)
    assert summary["notes"] and "served by vLLM" in summary["notes"][0]
    steps, batch_size = int(cfg.trainer.max_steps), int(cfg.dataset.batch_size)
    assert server.rows >= steps * batch_size  # prefetch may have asked for a few batches beyond the last step
    served = summary["served_teachers"]["vllm"]
    assert served["rows"] == steps * batch_size and served["prefetched_batches"] >= steps and served["retried"] == 0


def test_served_targets_fill_the_store_that_teacher_cached_reads(make_cfg, tmp_path: Path) -> None:
    """stage=cache_teacher teacher=vllm writes the served top-k into the teacher store, and every
    training batch then reads from it (teacher=cached) exactly what the server sends; any encoding
    but topk with k <= teacher.top_k is refused before compute (the server sends only its top-k)."""
    from kd_lightning.data.tokenizer import load_tokenizer
    from kd_lightning.run.builders import obtain_teacher
    from hydra.utils import instantiate

    store = tmp_path / "store"
    common = ("teacher.top_k=8", "teacher.rows_per_request=3", "teacher_cache.encoding=topk", "teacher_cache.k=6",
              "teacher_cache.dtype=float32", f"teacher_cache.dir={store}")
    with pytest.raises(ConfigError, match=r"teacher_cache.encoding=topk and teacher_cache.k<=8 \(got encoding=sample"):
        run(make_cfg("stage=cache_teacher", "teacher=vllm", "teacher.top_k=8", "teacher.served_model=x",
                     output_dir=tmp_path / "refused"))
    with pytest.raises(ConfigError, match=r"k<=8 \(got encoding=topk, k=9\)"):
        run(make_cfg("stage=cache_teacher", "teacher=vllm", *common, "teacher_cache.k=9", "teacher.served_model=x",
                     output_dir=tmp_path / "refused_k"))

    cfg = make_cfg("stage=cache_teacher", "teacher=vllm", *common, output_dir=tmp_path / "cache")
    tokenizer = load_tokenizer(cfg.dataset.tokenizer)
    lm = tiny_lm(0, vocab=len(tokenizer)).eval()
    with FakeVllm(model_logprobs(lm), lambda text: tokenizer.encode(text, add_special_tokens=False)) as server:
        cfg.teacher.urls, cfg.teacher.served_model = [server.url], server.model
        assert run(cfg)["teacher_targets"] == str(store)
        read = make_cfg("teacher=cached", "loss=sparse_kl", "teacher_cache.tail=uniform", *common[2:],
                        output_dir=tmp_path / "read")
        datamodule = instantiate(read.dataset)
        datamodule.setup("fit")
        cached = obtain_teacher(read, read.teacher, datamodule)
        served = ServedTeacher(options(server.url, top_k=8), len(tokenizer), sparse=True)
        rows_before = server.rows
        data = next(iter(datamodule.train_dataloader()))
        want, got = served.stored(data), cached.stored(data)
        served.close()
    assert server.rows > rows_before  # the reference was fetched anew, not read from the store
    L = data["input_ids"].shape[1]
    assert torch.equal(got.indices[:, : L - 1], want.indices[:, : L - 1, :6])
    assert torch.allclose(got.probs[:, : L - 1], want.probs[:, : L - 1, :6], rtol=1e-3, atol=0)  # float32 log/exp
    # the stored tail is the mass outside the 6 kept ids: the served tail plus its 7th and 8th ids
    assert torch.allclose(got.tail[:, : L - 1], want.tail[:, : L - 1] + want.probs[:, : L - 1, 6:].sum(-1), atol=1e-5)
