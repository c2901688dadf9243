"""How the online KD training step scales: time and peak memory vs student size, teacher size,
sequence length and number of teachers.

Each row is the default config (`python train.py`: MoE teacher hidden 128, tiny Llama student hidden
64, batch 16 x 128 byte tokens, one teacher) with ONE thing changed. A step is the full KD training
step of `benchmarks/speed.py` (`DistillationModule._step`, backward, AdamW step) on random byte ids;
models are random-init (only cost matters). Several teachers are copies of the MoE teacher with
different seeds, distilled from their mixture.

Memory (CPU, Linux/glibc), measured honestly in one process:
- glibc is told (mallopt M_MMAP_THRESHOLD = 128 KiB) to serve every large allocation with mmap,
  so a freed tensor leaves the resident set at once and the resident set follows live tensors;
  between rows Python garbage is collected and `malloc_trim` returns the rest.
- the kernel's resident high-water mark (VmHWM) is reset through /proc/self/clear_refs before a
  row is built; `peak` = VmHWM - VmRSS at that moment: everything the row added at its highest
  point (weights, gradients, AdamW state, activations, teacher logits).
- `step` = the same for one more step once the row's models and optimizer state exist: the
  transient memory of a step alone (activations, logits, gradients of the step).
Times are taken after the memory steps with the usual allocator behaviour (large blocks reused
from the heap): fresh mmaps for every tensor cost page faults. Small allocations (< 128 KiB) still
go through the heap and a few MiB of per-thread kernel
scratch count, so treat differences below ~5 MiB as noise. tracemalloc cannot see torch's
allocations and is not used. With `--device cuda` the numbers are torch.cuda.max_memory_allocated
instead (untested on this CPU-only machine).

    python benchmarks/scale.py --quick                      # 6 rows, < 2 minutes on 2 CPU cores
    python benchmarks/scale.py                              # 13 rows, < 10 minutes
    python benchmarks/scale.py --threads 0 --clock wall     # torch's threads, elapsed time (quiet machine)

TODO: DDP with 2 processes against 1 (`strategy=ddp trainer.devices=2`, gloo on CPU) is not in the
table: on a 2-core machine shared with other jobs the comparison measures the neighbours.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from speed import benchmark_args, build_kd_module, compose_config, interleaved_times, training_step

CLEAR_REFS = Path("/proc/self/clear_refs")
M_MMAP_THRESHOLD = -3  # glibc mallopt parameter number
MMAP_EXACT, MMAP_FAST = 128 * 1024, 32 * 2**20  # 32 MiB: the most glibc's own dynamic threshold reaches

# (axis, label, Hydra overrides, number of teachers, sequence length); the first row is the default.
DEFAULT = ("default", "S64 T128 L128 K1", [], 1, 128)


def student(hidden: int) -> list[str]:
    return [f"student.model.config.hidden_size={hidden}", f"student.model.config.intermediate_size={3 * hidden}"]


def teacher(hidden: int) -> list[str]:
    return [f"teacher.model.config.hidden_size={hidden}", f"teacher.model.config.intermediate_size={2 * hidden}"]


def rows(quick: bool) -> list[tuple[str, str, list[str], int, int]]:
    students = [256] if quick else [128, 256, 512]
    teachers = [256] if quick else [64, 256, 512]
    seq_lens = [64, 256] if quick else [64, 256, 512, 1024]
    counts = [2] if quick else [2, 4]
    return ([DEFAULT] + [("student", f"student hidden {h}", student(h), 1, 128) for h in students]
            + [("teacher", f"teacher hidden {h}", teacher(h), 1, 128) for h in teachers]
            + [("seq_len", f"seq len {n}", [], 1, n) for n in seq_lens]
            + [("teachers", f"{k} teachers", [], k, 128) for k in counts])


class Memory:
    """Resident-set high-water marks on Linux (see the module docstring)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.libc = ctypes.CDLL("libc.so.6") if sys.platform == "linux" and device == "cpu" else None

    def exact(self, on: bool) -> None:
        """mmap every allocation above 128 KiB (exact resident set, slower: every tensor is fresh,
        zeroed pages) or only above 32 MiB (what glibc does once warm; used while timing)."""
        if self.libc is not None:
            self.libc.mallopt(M_MMAP_THRESHOLD, MMAP_EXACT if on else MMAP_FAST)

    def _kib(self, field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise RuntimeError(f"/proc/self/status has no {field}")

    def start(self) -> float:
        """Collect garbage, reset the high-water mark; returns the current usage (MiB)."""
        gc.collect()
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            return torch.cuda.memory_allocated() / 2**20
        if self.libc is not None:
            self.libc.malloc_trim(0)
        CLEAR_REFS.write_text("5")
        return self._kib("VmRSS") / 2**10

    def peak(self) -> float:
        if self.device.startswith("cuda"):
            return torch.cuda.max_memory_allocated() / 2**20
        return self._kib("VmHWM") / 2**10


def random_batch(batch_size: int, seq_len: int, vocab: int, device: str) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, vocab, (batch_size, seq_len), generator=torch.Generator().manual_seed(0)).to(device)
    return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}


def measure(overrides: list[str], num_teachers: int, seq_len: int, args: argparse.Namespace, memory: Memory) -> dict[str, Any]:
    from kd_lightning.models import count_parameters

    cfg = compose_config([f"dataset.seq_len={seq_len}", *overrides, *args.overrides])
    memory.exact(True)
    base = memory.start()
    module = build_kd_module(cfg, num_teachers, args.device)
    batch = random_batch(int(cfg.dataset.batch_size), seq_len, module.student.config.vocab_size, args.device)
    training_step(module, batch)  # the first step also creates the AdamW state
    peak = memory.peak() - base
    before_step = memory.start()
    training_step(module, batch)
    step = memory.peak() - before_step
    memory.exact(False)
    times = interleaved_times({"kd": lambda: training_step(module, batch)}, args.repeats, args.warmup, args.device, args.clock)["kd"]
    result = {"student_params": count_parameters(module.student),
              "teacher_params": sum(count_parameters(t) for t in module.teachers.values()),
              "ms": 1e3 * statistics.median(times), "tokens_per_s": batch["input_ids"].numel() / statistics.median(times),
              "peak_mib": peak, "step_mib": step}
    del module, batch
    return result


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    args = benchmark_args(argv, __doc__.splitlines()[0], quick_help="6 rows, fewer repeats (< 2 minutes on 2 CPU cores)",
                          repeats=(8, 3), warmup=1)
    memory = Memory(args.device)
    unit = "cuda max_memory_allocated" if args.device.startswith("cuda") else "VmHWM - VmRSS"
    print(f"device={args.device} threads={torch.get_num_threads()} batch=16 repeats={args.repeats} clock={args.clock} "
          f"memory={unit} (MiB), torch {torch.__version__}")
    header = f"{'axis':<9}{'row':<20}{'student':>10}{'teachers':>11}{'ms/step':>10}{'tokens/s':>10}{'peak MiB':>10}{'step MiB':>10}"
    print(header + "\n" + "-" * len(header))
    # One untimed row first: one-time costs (lazy imports, kernel and thread-pool set-up) would
    # otherwise land in the first row's memory.
    measure([], 1, 64, argparse.Namespace(**{**vars(args), "repeats": 1, "warmup": 0}), memory)
    results = []
    for axis, label, overrides, num_teachers, seq_len in rows(args.quick):
        r = measure(overrides, num_teachers, seq_len, args, memory)
        results.append({"axis": axis, "row": label, **r})
        print(f"{axis:<9}{label:<20}{r['student_params'] / 1e6:>9.2f}M{r['teacher_params'] / 1e6:>10.2f}M{r['ms']:>10.1f}"
              f"{r['tokens_per_s']:>10,.0f}{r['peak_mib']:>10.1f}{r['step_mib']:>10.1f}", flush=True)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
