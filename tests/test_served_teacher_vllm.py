"""`teacher=vllm`, the slow tier: a run whose server dies mid-run stops with its last step saved and
resumes (the fake server, no vLLM needed); then a real vLLM server on a tiny Llama this test saves.

The real server runs in vLLM's own environment (scripts/vllm_server.sh setup): its Python is
`$KD_VLLM_PYTHON`, else `~/.cache/kd_lightning/vllm-env/bin/python`; the test skips, saying so, only
when that interpreter does not exist."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sysconfig
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from kd_lightning.run.pipeline import run
from kd_lightning.teachers.vllm_client import ServedTeacherOptions, TeacherUnavailable, VllmClient, topk_tensors
from tests.fake_vllm import FakeVllm, model_logprobs
from tests.helpers import tiny_lm

pytestmark = pytest.mark.slow

VLLM_PYTHON = Path(os.environ.get("KD_VLLM_PYTHON") or Path.home() / ".cache/kd_lightning/vllm-env/bin/python")
STARTUP_S = 600  # a first start on a busy 2-core machine took ~170 s
RESUME = ("resume=auto", "+resume_allow_changes=true")


def test_a_server_that_dies_mid_run_stops_it_with_a_checkpoint_and_resume_continues(make_cfg, tmp_path: Path) -> None:
    overrides = ("teacher=vllm", "loss=kl", "baseline=false", "teacher.top_k=8", "teacher.retries=1",
                 "teacher.backoff_s=0.01", "teacher.prefetch_batches=0", "teacher.rows_per_request=8")
    cfg = make_cfg(*overrides, output_dir=tmp_path / "run")
    from kd_lightning.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(cfg.dataset.tokenizer)
    with FakeVllm(model_logprobs(tiny_lm(0, vocab=len(tokenizer)).eval()),
                  lambda text: tokenizer.encode(text, add_special_tokens=False)) as server:
        server.die_after = 1 + 4  # the probe, then 4 one-request batches: step 5 finds the engine dead
        cfg.teacher.urls, cfg.teacher.served_model = [server.url], server.model
        with pytest.raises(TeacherUnavailable, match="resume=auto"):
            run(cfg)
        saved = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
        assert saved["global_step"] == 4  # the last finished step: the 5th batch's request failed
        assert saved["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]["ready"] == 4  # it is redone
        server.die_after = None  # the server is back
        resumed = make_cfg(*overrides, *RESUME, output_dir=tmp_path / "run")
        resumed.teacher.urls, resumed.teacher.served_model = [server.url], server.model
        summary = run(resumed)
    assert summary["models"]["student (KD)"]["loss"] > 0
    final = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert final["global_step"] == int(cfg.trainer.max_steps)


def tiny_llama_dir(directory: Path) -> Path:
    """A tiny random Llama with a byte-level BPE of 512 ids, saved for vLLM (head_dim 64: vLLM's CPU
    attention refuses 16)."""
    from transformers import LlamaConfig

    from kd_lightning.data.bpe import train_bpe
    from kd_lightning.models import build_causal_lm

    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:40]
    tokenizer = train_bpe((f.read_text(errors="replace") for f in files), 512)
    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, head_dim=64, max_position_embeddings=512)
    model = build_causal_lm(config, vocab_size=len(tokenizer), tokenizer=tokenizer, seed=0)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory: pytest.TempPathFactory):
    """(url, model dir) of a real vLLM server on 127.0.0.1, stopped after the module."""
    if not VLLM_PYTHON.exists():
        pytest.skip(f"no vLLM environment at {VLLM_PYTHON}: create it with scripts/vllm_server.sh setup <dir> and "
                    "point KD_VLLM_PYTHON at <dir>/bin/python")
    model_dir = tiny_llama_dir(tmp_path_factory.mktemp("tiny_llama"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path_factory.mktemp("vllm_log") / "server.log", "w")
    server = subprocess.Popen([str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
                               "--dtype", "float32", "--max-model-len", "512", "--enforce-eager",
                               "--host", "127.0.0.1", "--port", str(port)],
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                              env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_S
        while True:
            try:
                urllib.request.urlopen(url + "/v1/models", timeout=2).read()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"the vLLM server did not start (exit {server.poll()}); its log: {log.name}")
                time.sleep(2)
        yield url, model_dir
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and its engine processes
        server.wait(timeout=60)
        log.close()


def test_real_server_scores_like_the_model_in_process(vllm_server) -> None:
    url, model_dir = vllm_server
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    client = VllmClient(ServedTeacherOptions(urls=(url,), served_model=str(model_dir), top_k=8))
    ids = tokenizer.encode("def main(argv):\n    return sorted(argv, key=len)\n", add_special_tokens=False)
    got = topk_tensors(client.prompt_logprobs([ids]), len(ids), 8)
    with torch.no_grad():
        logprobs = model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)
    n = len(ids) - 1
    # the served log-probabilities of the ids it chose equal the model's own at those ids
    mine = logprobs[:n].gather(-1, got["ids"][0, :n])
    assert (mine - got["values"][0, :n]).abs().max() < 1e-3


def test_distill_from_a_real_vllm_server(vllm_server, make_cfg) -> None:
    url, model_dir = vllm_server
    cfg = make_cfg("teacher=vllm", "loss=sparse_kl", "baseline=false", "teacher.top_k=8", f"teacher.urls=[{url}]",
                   f"teacher.served_model={model_dir}", f"dataset.tokenizer={model_dir}")
    summary = run(cfg)
    assert summary["models"]["student (KD)"]["loss"] > 0
