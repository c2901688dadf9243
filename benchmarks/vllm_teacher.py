"""Teacher scoring through a vLLM server (`teacher=vllm`) against the same teacher in process.

Scores the same batches of real text (the standard library's .py files, tokenised by the model's
tokenizer, `--seq-len`-token windows) three ways and prints one JSON line:
- `in_process`: the model's forward in this process (float32, this process's threads) and the top-k
  of its log-probabilities (what `teacher=hf` + a topk store compute);
- `served_sequential`: `ServedTeacher.stored(batch)` one batch after the other, nothing sent ahead
  (the step would wait for every answer);
- `served_prefetched`: every batch's requests sent first (`prefetch`), then collected (what the
  loader's read-ahead does while the student trains).
and how close the served top-k is to the in-process one (the served log-probabilities at the ids the
server chose, against the model's own at those ids).

    scripts/vllm_server.sh serve <model dir> 8000      # in another shell
    python benchmarks/vllm_teacher.py --model-dir <model dir> --url http://127.0.0.1:8000
"""

from __future__ import annotations

import argparse
import json
import sysconfig
import time
from pathlib import Path

import torch

from kd_lightning.teachers.served import ServedTeacher, check_servers
from kd_lightning.teachers.vllm_client import ServedTeacherOptions


def batches_of_text(tokenizer, count: int, batch_size: int, seq_len: int) -> list[dict[str, torch.Tensor]]:
    ids: list[int] = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        ids += tokenizer.encode(path.read_text(errors="replace"), add_special_tokens=False)
        if len(ids) >= count * batch_size * seq_len:
            break
    windows = torch.tensor(ids[: count * batch_size * seq_len]).view(count, batch_size, seq_len)
    return [{"input_ids": w, "attention_mask": torch.ones_like(w)} for w in windows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--served-model", default=None, help="default: --model-dir")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--rows-per-request", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    options = ServedTeacherOptions(urls=(args.url,), served_model=args.served_model or args.model_dir, top_k=args.top_k,
                                   rows_per_request=args.rows_per_request, timeout_s=args.timeout, retries=0)
    check_servers(options, tokenizer, args.seq_len)
    batches = batches_of_text(tokenizer, args.batches, args.batch_size, args.seq_len)
    tokens = args.batches * args.batch_size * args.seq_len
    result: dict[str, object] = {"model": args.model_dir, "tokens": tokens, "batch": [args.batch_size, args.seq_len],
                                 "top_k": args.top_k, "threads": torch.get_num_threads()}

    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    start, own = time.perf_counter(), []
    with torch.no_grad():
        for batch in batches:
            logprobs = model(**batch).logits.float().log_softmax(-1)
            own.append(logprobs)
            logprobs.topk(args.top_k, dim=-1)
    result["in_process_tokens_per_s"] = round(tokens / (time.perf_counter() - start), 1)
    print(json.dumps(result), flush=True)  # each phase as it ends: a server that times out loses nothing measured

    teacher = ServedTeacher(options, len(tokenizer), sparse=True)
    start = time.perf_counter()
    served = [teacher.stored(batch) for batch in batches]
    result["served_sequential_tokens_per_s"] = round(tokens / (time.perf_counter() - start), 1)
    print(json.dumps(result), flush=True)
    start = time.perf_counter()
    for batch in batches:
        teacher.prefetch(batch)
    for batch in batches:
        teacher.stored(batch)
    result["served_prefetched_tokens_per_s"] = round(tokens / (time.perf_counter() - start), 1)
    teacher.close()

    gaps, agree = [], []
    for logprobs, targets in zip(own, served):
        n = args.seq_len - 1
        mine = logprobs[:, :n].gather(-1, targets.indices[:, :n])
        theirs = targets.probs[:, :n].clamp_min(1e-30).log()  # with the tail's mass they sum to 1: the served log p
        gaps.append((mine - theirs).abs().mean())
        agree.append((targets.indices[:, :n, 0] == logprobs[:, :n].argmax(-1)).float().mean())
    result["mean_abs_logprob_gap_at_served_ids"] = round(float(torch.stack(gaps).mean()), 4)
    result["top1_agreement"] = round(float(torch.stack(agree).mean()), 4)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
