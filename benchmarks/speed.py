"""Online-KD overhead: does a KD training step cost more than "teacher forward + student step"?

In ONE process, on the same batch of the embedded default (`python train.py`: the MoE teacher,
random-init here since only time matters, and the tiny student, both built from conf/), times

  (a) the full online KD training step: `DistillationModule._step` (teacher forward under no_grad,
      student forward, KD + CE terms, the per-teacher statistics the callbacks read), backward and
      the optimizer step;
  (b) the teacher forward alone (no_grad);
  (c) the student's CE-only training step alone (a teacher-less `DistillationModule`, the code path
      of the no-KD baseline), backward and optimizer step;

interleaved (a, b, c, a, b, c, ...) so that load on a shared machine hits all three alike, and
prints medians, the ratio (a) / ((b) + (c)) (target <= 1.05) and tokens/s of the KD step. Lightning's
loop and logger are not in any of the three (`self.log` without a Trainer returns at once).

    python benchmarks/speed.py --quick        # < 2 minutes on 2 CPU cores (1 thread, CPU time)
    python benchmarks/speed.py --quick --pieces   # also the loss and statistics pieces alone
    python benchmarks/speed.py                # more repeats
    python benchmarks/speed.py --threads 0 --clock wall    # torch's threads, elapsed time (quiet machine)
    python benchmarks/speed.py --device cuda --repeats 200

`--device cuda` synchronises around every timed call (untested on this CPU-only machine).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
# `self.log` outside a Trainer warns once per call site; the benchmark calls `_step` on purpose.
warnings.filterwarnings("ignore", message=r".*self\.trainer. reference is not registered.*")
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")


def compose_config(overrides: Sequence[str] = ()) -> Any:
    """The project's Hydra config (conf/train.yaml) with `overrides`, outside a Hydra app."""
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides))
    with open_dict(cfg):
        cfg.paths.output_dir = str(REPO / "outputs" / "benchmarks")
        cfg.paths.cache_dir = str(REPO / "outputs" / "benchmarks" / "cache")
    return cfg


def lm_vocabulary() -> Any:
    """A stand-in datamodule for `build_model`: the byte tokenizer of the embedded corpus."""
    from kd_lightning.data.tokenizer import byte_tokenizer

    tokenizer = byte_tokenizer()
    return type("Vocabulary", (), {"task": "causal_lm", "vocab_size": len(tokenizer), "tokenizer": tokenizer})()


def build_kd_module(cfg: Any, num_teachers: int = 1, device: str = "cpu") -> Any:
    """The KD module `kd_lightning.run.distill` builds from `cfg`, with `num_teachers` copies of the
    configured teacher (seeds seed, seed+1, ...) and its optimizer as `module.bench_optimizer`."""
    from kd_lightning.run.builders import build_model
    from kd_lightning.run.distill import build_module

    vocabulary, seed = lm_vocabulary(), int(cfg.seed)
    teachers = {f"{cfg.teacher.name}{k or ''}": build_model(cfg.teacher.model, vocabulary, seed + k) for k in range(num_teachers)}
    module = build_module(cfg, build_model(cfg.student.model, vocabulary, seed), teachers).to(device).train()
    module.bench_optimizer = hydra_optimizer(cfg, module.trainable_parameters())
    return module


def build_ce_module(cfg: Any, student: torch.nn.Module, device: str = "cpu") -> Any:
    """A teacher-less (CE-only, the no-KD baseline's) module training `student`."""
    from kd_lightning.module import DistillationModule

    module = DistillationModule(student, None, ce_weight=1.0, kd_weight=0.0).to(device).train()
    module.bench_optimizer = hydra_optimizer(cfg, module.trainable_parameters())
    return module


def hydra_optimizer(cfg: Any, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    import hydra

    return hydra.utils.instantiate(cfg.optimizer)(params)


def training_step(module: Any, batch: dict[str, torch.Tensor]) -> None:
    """One optimisation step as Lightning's automatic optimisation runs it (minus the loop)."""
    module.bench_optimizer.zero_grad(set_to_none=True)
    module.training_step(batch, 0).backward()
    module.bench_optimizer.step()


@torch.no_grad()
def teacher_forward(teacher: torch.nn.Module, batch: dict[str, torch.Tensor]) -> None:
    teacher(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def interleaved_times(fns: dict[str, Callable[[], None]], repeats: int, warmup: int, device: str,
                      clock: str = "wall") -> dict[str, list[float]]:
    """Seconds per call of each function, called round-robin `repeats` times after `warmup` rounds.
    `clock="cpu"` counts this process's CPU time (all threads): on a shared machine it does not
    grow when other processes take the cores, which wall time does."""
    now = CLOCKS[clock]
    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(warmup + repeats):
        for name, fn in fns.items():
            sync(device)
            start = now()
            fn()
            sync(device)
            if round_ >= warmup:
                times[name].append(now() - start)
    return times


def first_batch(cfg: Any, device: str) -> dict[str, torch.Tensor]:
    """The first training batch of the configured datamodule (the embedded stdlib corpus)."""
    import hydra

    datamodule = hydra.utils.instantiate(cfg.dataset)
    datamodule.prepare_data()
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def benchmark_args(argv: Sequence[str] | None, description: str, *, quick_help: str, repeats: tuple[int, int],
                   warmup: int, pieces: bool = False) -> argparse.Namespace:
    """The command line shared by speed.py and scale.py; `repeats` = (full, quick) defaults."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    if pieces:
        parser.add_argument("--pieces", action="store_true",
                            help="also time the pieces a KD step adds (loss forward + backward, teacher token CE)")
    parser.add_argument("--repeats", type=int, default=None, help=f"timed repeats (default {repeats[0]}; quick {repeats[1]})")
    parser.add_argument("--warmup", type=int, default=warmup, help="untimed repeats before the timed ones")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads; default 1 on CPU (0: torch's default, one per core)")
    parser.add_argument("--clock", default=None, choices=sorted(CLOCKS),
                        help="wall: elapsed time; cpu: this process's CPU time (default on CPU; wall on CUDA)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. loss=skew_kl dataset.seq_len=256")
    args = parser.parse_args(argv)
    args.repeats = args.repeats or (repeats[1] if args.quick else repeats[0])
    apply_clock_options(args)
    return args


def apply_clock_options(args: argparse.Namespace) -> None:
    """Single-threaded CPU time by default on CPU: on a machine shared with other jobs it neither
    grows when a neighbour takes a core nor suffers OpenMP's spin-waiting when a thread per core
    competes with them (both measured here: 2 threads under load ran a step 40x slower). On a
    quiet machine one thread's CPU time equals its wall time."""
    cuda = args.device.startswith("cuda")
    args.clock = args.clock or ("wall" if cuda else "cpu")
    if args.threads is None and not cuda:
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)


def kd_pieces(kd: Any, teacher: torch.nn.Module, batch: dict[str, torch.Tensor], args: argparse.Namespace) -> dict[str, float]:
    """`--pieces`: what the KD step adds to (b) + (c), each piece timed alone on the batch's shapes."""
    import torch.nn.functional as F

    labels = batch["labels"][:, 1:]
    mask = labels != -100
    with torch.no_grad():
        t_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits[:, :-1]
    s_logits = kd.student_logits(batch)[:, :-1].detach().requires_grad_(True)

    def loss_fb() -> None:
        kd.loss_fn(s_logits, t_logits, mask, temperature=kd.kd_temperature).backward()

    def kl_div_fb() -> None:
        F.kl_div(F.log_softmax(s_logits[mask], -1), F.log_softmax(t_logits[mask], -1), log_target=True,
                 reduction="batchmean").backward()

    fns = {"loss_fwd_bwd": loss_fb, "kl_div_fwd_bwd": kl_div_fb,
           "teacher_token_ce": lambda: F.cross_entropy(t_logits[mask].float(), labels[mask], reduction="none")}
    times = interleaved_times(fns, max(args.repeats, 30), args.warmup, args.device, args.clock)
    med = {name: 1e3 * statistics.median(ts) for name, ts in times.items()}
    print(f"pieces on [{int(mask.sum())} positions, {t_logits.shape[-1]} classes], median ms:")
    name = getattr(getattr(kd.loss_fn, "func", kd.loss_fn), "__name__", "loss")  # a partial or a function
    print(f"  loss={name} forward + backward        {med['loss_fwd_bwd']:7.2f}")
    print(f"  log_softmax + F.kl_div(log_target) f+b  {med['kl_div_fwd_bwd']:7.2f}   (reference, no zero-probability guard)")
    print(f"  teacher token CE (last_step statistics) {med['teacher_token_ce']:7.2f}")
    return {f"piece_{k}_ms": v for k, v in med.items()}


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    args = benchmark_args(argv, __doc__.splitlines()[0], quick_help="fewer repeats (< 2 minutes on 2 CPU cores)",
                          repeats=(60, 15), warmup=3, pieces=True)
    # Only one batch is needed: cap the corpus read (the batch shape is the default's).
    cfg = compose_config(["dataset.max_train_tokens=200000", "dataset.max_eval_tokens=4096", *args.overrides])
    torch.manual_seed(int(cfg.seed))
    batch = first_batch(cfg, args.device)
    kd = build_kd_module(cfg, device=args.device)
    ce = build_ce_module(cfg, copy.deepcopy(kd.student), args.device)  # the same initial student
    teacher = next(iter(kd.teachers.values()))
    fns = {"kd_step": lambda: training_step(kd, batch), "teacher_forward": lambda: teacher_forward(teacher, batch),
           "student_ce_step": lambda: training_step(ce, batch)}
    times = interleaved_times(fns, args.repeats, args.warmup, args.device, args.clock)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    low = {name: min(ts) for name, ts in times.items()}
    tokens = batch["input_ids"].numel()
    ratio = med["kd_step"] / (med["teacher_forward"] + med["student_ce_step"])
    print(f"device={args.device} threads={torch.get_num_threads()} batch={tuple(batch['input_ids'].shape)} "
          f"loss={cfg.loss.name} teacher={cfg.teacher.name} student={cfg.student.name} "
          f"repeats={args.repeats} (after {args.warmup} warm-up rounds) clock={args.clock}, torch {torch.__version__}")
    print(f"{'':<34}{'median ms':>12}{'min ms':>10}")
    for name, label in [("kd_step", "(a) KD step (fwd T+S, loss, bwd, opt)"), ("teacher_forward", "(b) teacher forward (no_grad)"),
                        ("student_ce_step", "(c) student CE step (fwd, bwd, opt)")]:
        print(f"{label:<34}{1e3 * med[name]:>12.2f}{1e3 * low[name]:>10.2f}")
    print(f"ratio (a) / ((b) + (c)): {ratio:.3f} median, "
          f"{low['kd_step'] / (low['teacher_forward'] + low['student_ce_step']):.3f} min   (target <= 1.05)")
    print(f"KD step overhead beyond (b) + (c): {1e3 * (med['kd_step'] - med['teacher_forward'] - med['student_ce_step']):.2f} ms")
    print(f"KD step throughput: {tokens / med['kd_step']:,.0f} tokens/s ({tokens} tokens per step)")
    pieces = kd_pieces(kd, teacher, batch, args) if args.pieces else {}
    return {**pieces, "ratio": ratio, "tokens_per_second": tokens / med["kd_step"], **{f"{k}_ms": 1e3 * v for k, v in med.items()}}


if __name__ == "__main__":
    main(sys.argv[1:])
