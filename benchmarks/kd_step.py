"""The KD step at real vocabularies (V = 32k, 128k): fast path vs reference vs TRL GKD vs the floor.

Tiny Llama teacher (hidden 256, 4 layers) and student (hidden 64, 2 layers) from
`transformers.LlamaConfig`, random weights, AdamW, forward KL at T = 1, the same batch (the first
16 positions of every sequence are prompt, labels -100). Each arm runs in its own fresh subprocess
(so its peak RSS is its own) and the parent interleaves the rounds (a, b, c, d, e, a, ...) so that
load on a shared machine hits all arms alike. CPU time (`time.process_time`) of 1 torch thread,
medians; peak RSS delta = peak RSS of the arm's process minus its RSS after building models/batch.

  module:        kd-lightning's own step: `DistillationModule.training_step` (forward KL, kd_weight 1,
                 ce_weight 0), which routes through the fast kernel below -> backward -> AdamW step
  module_chunked: the same with `chunk_size` (the lm_head-fused path)
  (a) fast:      student forward -> logits -> counted rows selected once (student and teacher,
                 one index_select of the flattened logits each)
                 -> `fast_kd_terms` (ce=False, token CE statistics on) -> backward -> AdamW step
  (b) chunked:   hidden states -> counted rows -> `chunked_kd_terms` (lm_head fused,
                 --chunk-size rows per head matmul) -> backward -> AdamW step
  (c) reference: today's path: `forward_kl(student, teacher, mask)` + the token CE graph
                 (F.cross_entropy on the counted rows, weight 0), backward, AdamW step
  (d) trl:       TRL's `GKDTrainer.compute_loss` (lmbda=0, beta=0: forward KL, same batch), backward,
                 AdamW step (needs `pip install -e '.[bench]'`)
  (e) floor:     teacher forward (no_grad) + the student's CE step

Then each divergence in isolation (forward + backward over [rows, V]): `fast_kd_terms` against the
reference loss of kd_lightning.losses, and for forward KL the two-line log_softmax + kl_div.

    python benchmarks/kd_step.py --quick     # V=1024, 2 rounds (mostly 7 process start-ups)
    python benchmarks/kd_step.py             # V=32000 (8x128) and V=128256 (4x256), 15 rounds
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
ARMS = ("module", "module_chunked", "fast", "chunked", "reference", "trl", "floor")
PROMPT = 16


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def build(vocab: int, batch: int, seq: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    def llama(hidden: int, layers: int) -> torch.nn.Module:
        config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden,
                             num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                             max_position_embeddings=seq, tie_word_embeddings=False)
        return LlamaForCausalLM(config)

    torch.manual_seed(0)
    teacher = llama(256, 4).eval().requires_grad_(False)
    student = llama(64, 2).train()
    input_ids = torch.randint(0, vocab, (batch, seq))
    labels = input_ids.clone()
    labels[:, :PROMPT] = -100
    return teacher, student, {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


def make_step(arm: str, teacher, student, inputs, chunk_size: int):
    from kd_lightning.losses import chunked_kd_terms, fast_kd_terms, forward_kl

    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    ids, attn, labels = inputs["input_ids"], inputs["attention_mask"], inputs["labels"]
    mask = labels[:, 1:] != -100
    targets = labels[:, 1:][mask]
    count = int(mask.sum())
    # Counted positions as flat row ids of the [B*L, V] logits (position t predicts label t+1): one
    # index_select, whose backward is one index_add (logits[:, :-1][mask] adds a slice backward).
    counted = torch.nn.functional.pad(mask, (0, 1)).reshape(-1).nonzero().squeeze(1)

    def teacher_out(hidden_only: bool = False):
        with torch.no_grad():
            if hidden_only:
                return teacher.model(input_ids=ids, attention_mask=attn).last_hidden_state
            return teacher(input_ids=ids, attention_mask=attn).logits

    def loss_fast():
        teacher_logits = teacher_out()
        teacher_rows = teacher_logits.view(-1, teacher_logits.shape[-1]).index_select(0, counted)
        del teacher_logits
        logits = student(input_ids=ids, attention_mask=attn).logits
        rows = logits.view(-1, logits.shape[-1]).index_select(0, counted)
        del logits
        terms = fast_kd_terms(forward_kl, rows, teacher_rows, targets, temperature=1.0)
        return terms.kd_sum / count

    def loss_chunked():
        teacher_rows = teacher_out(hidden_only=True)[:, :-1][mask]
        rows = student.model(input_ids=ids, attention_mask=attn).last_hidden_state[:, :-1][mask]
        terms = chunked_kd_terms(forward_kl, rows, student.lm_head.weight, None, teacher_rows,
                                      teacher.lm_head.weight, None, targets, temperature=1.0, chunk_size=chunk_size)
        return terms.kd_sum / count

    def loss_reference():
        teacher_logits = teacher_out()[:, :-1]
        logits = student(input_ids=ids, attention_mask=attn).logits[:, :-1]
        kd = forward_kl(logits, teacher_logits, mask, temperature=1.0)
        token_ce = F.cross_entropy(logits[mask].float(), targets, reduction="none")
        return kd + 0.0 * token_ce.mean()

    if arm == "trl":  # imported before the RSS baseline, so the import is not counted as step memory
        try:
            from trl.experimental.gkd import GKDTrainer
        except ImportError:  # trl < 1.0
            from trl import GKDTrainer
        # compute_loss reads only these attributes of the trainer (lmbda=0: no on-policy generation)
        trainer = SimpleNamespace(teacher_model=teacher, beta=0.0, generalized_jsd_loss=GKDTrainer.generalized_jsd_loss)

    def loss_trl():
        return GKDTrainer.compute_loss(trainer, student, inputs, num_items_in_batch=count)

    def loss_floor():
        teacher_out()
        logits = student(input_ids=ids, attention_mask=attn).logits[:, :-1]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)

    if arm.startswith("module"):  # kd-lightning's own step, as a run trains: DistillationModule.training_step
        import warnings

        from kd_lightning.module import DistillationModule

        warnings.filterwarnings("ignore", message=r".*self.log\(\)")  # no Trainer attached here
        module = DistillationModule(student, teacher, forward_kl, kd_weight=1.0, ce_weight=0.0,
                                    chunk_size=chunk_size if arm == "module_chunked" else None)

    def loss_module():
        return module.training_step(inputs, 0)

    loss_fn = {"fast": loss_fast, "chunked": loss_chunked, "reference": loss_reference, "trl": loss_trl,
               "floor": loss_floor, "module": loss_module, "module_chunked": loss_module}[arm]

    def step() -> float:
        loss = loss_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


MARK = "KDSTEP "  # protocol lines; anything else a library prints on stdout is skipped


def reply(message: dict) -> None:
    print(MARK + json.dumps(message), flush=True)


def read_reply(proc: subprocess.Popen, arm: str) -> dict:
    for line in proc.stdout:
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])
    raise RuntimeError(f"arm {arm} died (exit code {proc.wait()})")


def worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    teacher, student, inputs = build(args.vocab, args.batch, args.seq)
    step = make_step(args.worker, teacher, student, inputs, args.chunk_size)
    baseline = rss_bytes()
    reply({"ready": True})
    for line in sys.stdin:
        if line.strip() != "step":
            break
        start = time.process_time()
        loss = step()
        reply({"cpu_s": time.process_time() - start, "loss": loss})
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    reply({"peak_delta_mib": (peak - baseline) / 2**20})


def trl_available() -> bool:
    try:
        import trl  # noqa: F401
    except ImportError:
        return False
    return True


def run_config(vocab: int, batch: int, seq: int, arms: list[str], rounds: int, warmup: int, chunk_size: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRL_EXPERIMENTAL_SILENCE": "1", "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    procs = {arm: subprocess.Popen([sys.executable, __file__, "--worker", arm, "--vocab", str(vocab), "--batch", str(batch),
                                    "--seq", str(seq), "--chunk-size", str(chunk_size)],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=REPO)
             for arm in arms}

    def ask(arm: str, message: str) -> dict:
        proc = procs[arm]
        proc.stdin.write(message + "\n")
        proc.stdin.flush()
        return read_reply(proc, arm)

    for arm, proc in procs.items():
        read_reply(proc, arm)  # "ready"
    times: dict[str, list[float]] = {arm: [] for arm in arms}
    losses: dict[str, float] = {}
    for r in range(warmup + rounds):
        order = arms[r % len(arms):] + arms[:r % len(arms)]  # rotate so no arm always runs first
        for arm in order:
            out = ask(arm, "step")
            if r >= warmup:
                times[arm].append(out["cpu_s"])
            losses[arm] = out["loss"]
    result = {}
    for arm in arms:
        peak = ask(arm, "quit")["peak_delta_mib"]
        procs[arm].wait()
        result[arm] = {"ms": 1000 * statistics.median(times[arm]), "peak_delta_mib": peak, "loss": losses[arm]}
    return result


def print_config(vocab: int, batch: int, seq: int, result: dict) -> None:
    print(f"\n## V = {vocab}, batch {batch}x{seq} (median CPU ms of 1 thread; peak RSS delta per arm)")
    print("| arm | step ms | peak RSS delta MiB | time vs TRL | memory vs TRL | time vs floor | loss |")
    print("|---|---|---|---|---|---|---|")
    trl, floor = result.get("trl"), result.get("floor")
    for arm, r in result.items():
        vs_trl = f"{r['ms'] / trl['ms']:.2f}x" if trl else "-"
        mem_trl = f"{r['peak_delta_mib'] / trl['peak_delta_mib']:.2f}x" if trl else "-"
        vs_floor = f"{r['ms'] / floor['ms']:.2f}x" if floor else "-"
        print(f"| {arm} | {r['ms']:.0f} | {r['peak_delta_mib']:.0f} | {vs_trl} | {mem_trl} | {vs_floor} | {r['loss']:.5f} |")


def isolation(vocab: int, rows: int, repeats: int) -> None:
    """Each divergence alone, forward + backward over [rows, V] (1 thread, CPU time, min of repeats)."""
    from kd_lightning import losses
    from kd_lightning.losses import fast_kd_terms

    torch.manual_seed(0)
    student, teacher = torch.randn(rows, vocab) * 2, torch.randn(rows, vocab) * 2
    specs = [("forward_kl", {}), ("reverse_kl", {}), ("skew_kl", {"alpha": 0.1}), ("skew_reverse_kl", {"alpha": 0.1}),
             ("jensen_shannon", {}), ("generalized_jsd", {"beta": 0.1}), ("total_variation", {}),
             ("adaptive_kl", {}), ("taid", {"interpolation": 0.5})]

    def timed(fn) -> float:
        fn()
        best = float("inf")
        for _ in range(repeats):
            start = time.process_time()
            fn()
            best = min(best, time.process_time() - start)
        return 1000 * best

    def run_fast(loss_fn):
        x = student.clone().requires_grad_()
        fast_kd_terms(loss_fn, x, teacher, None, temperature=1.0).kd_sum.backward()

    def run_reference(loss_fn):
        x = student.clone().requires_grad_()
        loss_fn(x, teacher, reduction="sum").backward()

    def run_two_line():
        x = student.clone().requires_grad_()
        F.kl_div(F.log_softmax(x, -1), F.log_softmax(teacher, -1), reduction="sum", log_target=True).backward()

    print(f"\n## Divergences alone: forward + backward over [{rows}, {vocab}] (min CPU ms of {repeats})")
    print("| divergence | fast ms | reference ms | fast / reference |")
    print("|---|---|---|---|")
    for name, params in specs:
        loss_fn = functools.partial(getattr(losses, name), **params)
        fast_ms, ref_ms = timed(lambda: run_fast(loss_fn)), timed(lambda: run_reference(loss_fn))
        print(f"| {name} | {fast_ms:.0f} | {ref_ms:.0f} | {fast_ms / ref_ms:.2f} |")
    two = timed(run_two_line)
    print(f"| forward KL, two-line log_softmax + kl_div | - | {two:.0f} | - |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="V=1024, batch 2x32, 2 rounds: a smoke run")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--chunk-size", type=int, default=256, help="rows per head matmul of the chunked arm")
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--no-isolation", action="store_true")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--vocab", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--seq", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    torch.set_num_threads(1)
    arms = [arm for arm in args.arms.split(",") if arm]
    if "trl" in arms and not trl_available():
        print("trl not installed: pip install -e '.[bench]'")
        arms.remove("trl")
    configs = [(1024, 2, 32)] if args.quick else [(32000, 8, 128), (128256, 4, 256)]
    rounds = args.rounds or (2 if args.quick else 15)
    for vocab, batch, seq in configs:
        start = time.perf_counter()
        result = run_config(vocab, batch, seq, arms, rounds, args.warmup, args.chunk_size)
        print_config(vocab, batch, seq, result)
        print(f"({rounds} rounds + {args.warmup} warm-up, {time.perf_counter() - start:.0f} s wall)", flush=True)
    if not args.no_isolation:
        isolation(1024 if args.quick else 32000, 32 if args.quick else 512, 1 if args.quick else 5)


if __name__ == "__main__":
    main()
