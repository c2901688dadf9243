"""Peak memory and time of one distillation-loss step: chunked fused path vs plain path.

One "step" = student head logits + teacher head logits + loss + backward to the student hidden
states and head (the teacher head runs under no_grad in both paths). Printed: a table with the
ratios chunked / plain. Targets: memory ratio <= 0.15, time ratio <= 1.2.

How memory is measured (honestly, per device):
- cuda: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus the
  memory allocated before the step (inputs and weights are excluded, the weight gradient that the
  step creates is included).
- cpu: PyTorch has no peak counter for its CPU allocator, so every measurement runs in a fresh
  subprocess and reads the kernel's resident-set high-water mark (``VmHWM``, reset through
  ``/proc/self/clear_refs``) minus the resident set before the step. glibc is told to serve every
  allocation above 128 KiB with mmap (``MALLOC_MMAP_THRESHOLD_``), so freed tensors leave the
  resident set at once and the high-water mark follows live tensor memory rather than allocator
  caching. Numbers include the few MiB of per-thread scratch the CPU kernels use. Times come from
  another fresh process with the default allocator. Linux only.

Usage::

    python benchmarks/loss_memory.py --quick                 # small sizes, CPU, ~1 minute
    python benchmarks/loss_memory.py --device cuda           # V = 32k and 128k, 8k tokens, H = 1024
    python benchmarks/loss_memory.py --vocab 32000 --tokens 2048 --hidden 512
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

import kd_lightning.losses as losses

HWM_RESET = Path("/proc/self/clear_refs")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="small sizes (1k tokens, H=256, V=8k/32k)")
    parser.add_argument("--tokens", type=int, default=None, help="tokens per step (default 8192; quick 1024)")
    parser.add_argument("--hidden", type=int, default=None, help="hidden size (default 1024; quick 256)")
    parser.add_argument("--vocab", type=int, nargs="+", default=None, help="vocab sizes (default 32000 128000)")
    parser.add_argument("--chunk-size", type=int, default=None, help="tokens per chunk (default tokens/16)")
    parser.add_argument("--loss", default="forward_kl", help="a token-level loss of kd_lightning.losses")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=5, help="timed steps after one warm-up (best is kept)")
    parser.add_argument("--worker", nargs=3, metavar=("PATH", "VOCAB", "WHAT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.tokens = args.tokens or (1024 if args.quick else 8192)
    args.hidden = args.hidden or (256 if args.quick else 1024)
    args.vocab = args.vocab or ([8192, 32000] if args.quick else [32000, 128000])
    args.chunk_size = args.chunk_size or max(args.tokens // 16, 1)
    return args


def make_inputs(args: argparse.Namespace, vocab: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator(device=args.device).manual_seed(0)
    dtype = getattr(torch, args.dtype)

    def randn(*shape: int, scale: float) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, device=args.device) * scale).to(dtype)

    scale = args.hidden**-0.5
    return {
        "student_hidden": randn(args.tokens, args.hidden, scale=1.0).requires_grad_(True),
        "student_weight": randn(vocab, args.hidden, scale=scale).requires_grad_(True),
        "teacher_hidden": randn(args.tokens, args.hidden, scale=1.0),
        "teacher_weight": randn(vocab, args.hidden, scale=scale),
        # 10% of positions masked, as padding/prompt tokens would be.
        "mask": torch.rand(args.tokens, generator=gen, device=args.device) > 0.1,
    }


def step(path: str, inputs: dict[str, torch.Tensor], loss_fn, chunk_size: int) -> None:
    if path == "plain":
        with torch.no_grad():
            teacher_logits = inputs["teacher_hidden"] @ inputs["teacher_weight"].T
        student_logits = inputs["student_hidden"] @ inputs["student_weight"].T
        loss = loss_fn(student_logits, teacher_logits, inputs["mask"])
        del student_logits, teacher_logits
    else:
        loss = losses.chunked_distill_loss(
            inputs["student_hidden"], inputs["student_weight"], inputs["teacher_hidden"], inputs["teacher_weight"],
            inputs["mask"], loss_fn, chunk_size=chunk_size,
        )
    loss.backward()


def clear_grads(inputs: dict[str, torch.Tensor]) -> None:
    for tensor in inputs.values():
        tensor.grad = None


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def measure(args: argparse.Namespace, path: str, vocab: int, what: str = "both") -> dict[str, float]:
    """Peak extra memory (MiB) of one step and/or median step time (ms), in this process."""
    loss_fn = getattr(losses, args.loss)
    inputs = make_inputs(args, vocab)
    step(path, inputs, loss_fn, args.chunk_size)  # warm-up (kernels, thread pools)
    clear_grads(inputs)
    sync(args.device)
    result = {}
    if what == "time":
        pass
    elif args.device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step(path, inputs, loss_fn, args.chunk_size)
        sync(args.device)
        result["peak_mib"] = (torch.cuda.max_memory_allocated() - before) / 2**20
    else:
        HWM_RESET.write_text("5")  # reset the resident-set high-water mark to the current RSS
        before = rss_kib("VmRSS")
        step(path, inputs, loss_fn, args.chunk_size)
        result["peak_mib"] = (rss_kib("VmHWM") - before) / 2**10
    if what == "memory":
        return result
    times = []
    for _ in range(args.repeats):
        clear_grads(inputs)
        sync(args.device)
        start = time.perf_counter()
        step(path, inputs, loss_fn, args.chunk_size)
        sync(args.device)
        times.append(time.perf_counter() - start)
    # Best of N: on a shared machine the slow outliers measure other processes, not this code.
    result["time_ms"] = 1e3 * min(times)
    return result


def run_isolated(args: argparse.Namespace, path: str, vocab: int, argv: list[str]) -> dict[str, float]:
    """CPU: each measurement in a fresh process so one run's heap cannot hide in another's peak.

    Memory is measured with mmap-served allocations (exact resident-set accounting); time with the
    default allocator, since forcing mmap makes every allocation page-fault and distorts timings.
    """
    result = {}
    for what, extra_env in (("memory", {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}), ("time", {})):
        command = [sys.executable, __file__, *argv, "--worker", path, str(vocab), what]
        done = subprocess.run(command, env={**os.environ, **extra_env}, capture_output=True, text=True, check=True)
        result.update(json.loads(done.stdout.strip().splitlines()[-1]))
    return result


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(measure(args, args.worker[0], int(args.worker[1]), args.worker[2])))
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but CUDA is not available")
    print(f"loss={args.loss} device={args.device} dtype={args.dtype} tokens={args.tokens} hidden={args.hidden} "
          f"chunk_size={args.chunk_size} threads={torch.get_num_threads()} "
          f"memory={'cuda max_memory_allocated' if args.device == 'cuda' else 'VmHWM - VmRSS (fresh process)'}")
    header = f"{'vocab':>7} | {'plain MiB':>10} | {'chunked MiB':>11} | {'mem ratio':>9} | " \
             f"{'plain ms':>9} | {'chunked ms':>10} | {'time ratio':>10}"
    print(header)
    print("-" * len(header))
    for vocab in args.vocab:
        results = {}
        for path in ("plain", "chunked"):
            if args.device == "cuda":
                results[path] = measure(args, path, vocab)
                torch.cuda.empty_cache()
            else:
                results[path] = run_isolated(args, path, vocab, argv)
        plain, chunked = results["plain"], results["chunked"]
        print(f"{vocab:>7} | {plain['peak_mib']:>10.1f} | {chunked['peak_mib']:>11.1f} | "
              f"{chunked['peak_mib'] / plain['peak_mib']:>9.3f} | {plain['time_ms']:>9.1f} | "
              f"{chunked['time_ms']:>10.1f} | {chunked['time_ms'] / plain['time_ms']:>10.3f}", flush=True)


if __name__ == "__main__":
    main()
