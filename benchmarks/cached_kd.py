"""Offline sparse KD overhead: does a step on cached teacher targets cost more than a CE-only step?

In ONE process, on the same batch of the embedded default (batch 16 x 128 of the stdlib corpus, the
tiny student built from conf/), times

  (a) a training step with cached sparse targets (`teacher=cached loss=sparse_kl`): the targets
      looked up by row key in the teacher store (memory-mapped safetensors part, decoded)
      (`kd_lightning.teachers.teacher_cache.CachedTeacher`), student forward, CE + `sparse_kl`, backward,
      optimizer step (`DistillationModule._step`, as `kd_lightning.run.distill` builds it);
  (b) the student's CE-only training step (the no-KD baseline's code path), backward, optimizer step;

interleaved (a, b, a, b, ...) and prints medians and the ratio (a) / (b) (target <= 1.05). The targets
are the store's encoding (`teacher_cache.*` of conf/train.yaml: encoding, k, num_draws, dtype) of the
random-init MoE teacher on that batch: only their shape matters for time. Also printed: the store's
bytes per token (from the files) and its write throughput.

    python benchmarks/cached_kd.py --quick        # < 1 minute on 2 CPU cores (1 thread, CPU time)
    python benchmarks/cached_kd.py                # more repeats
"""

from __future__ import annotations

import copy
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from kd_lightning.teachers.store import bytes_per_token
from speed import (benchmark_args, build_ce_module, compose_config, first_batch, hydra_optimizer, interleaved_times,
                   lm_vocabulary, training_step)


def cached_teacher(cfg, batch: dict[str, torch.Tensor], directory: Path):
    """A `CachedTeacher` reading the teacher store (memory-mapped parts) filled with the batch's rows;
    returns it and the store's write throughput (rows/s, encoding + part write)."""
    from kd_lightning.run.builders import build_model
    from kd_lightning.run.settings import encoding_options
    from kd_lightning.teachers.store import TeacherOutputStore, row_keys, store_identity
    from kd_lightning.teachers.teacher_cache import CachedTeacher

    teacher = build_model(cfg.teacher.model, lm_vocabulary(), int(cfg.seed)).eval()
    identity = store_identity(weights="bench", model_config=None, precision="32-true", accelerator="cpu",
                              vocab_size=lm_vocabulary().vocab_size, encoding=encoding_options(cfg.teacher_cache))
    writer = TeacherOutputStore(directory, identity)
    with torch.no_grad():
        logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    start = time.perf_counter()
    writer.put(row_keys(batch["input_ids"], batch["attention_mask"]), logits, 0.0)
    writer.flush()
    rows_per_s = len(logits) / (time.perf_counter() - start)
    return CachedTeacher(TeacherOutputStore(directory, None), sparse=True), rows_per_s


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    args = benchmark_args(argv, __doc__.splitlines()[0], quick_help="fewer repeats (< 1 minute on 2 CPU cores)",
                          repeats=(60, 15), warmup=3)
    cfg = compose_config(["dataset.max_train_tokens=200000", "dataset.max_eval_tokens=4096", "loss=sparse_kl",
                          *args.overrides])
    from kd_lightning.run.builders import build_model
    from kd_lightning.run.distill import build_module

    torch.manual_seed(int(cfg.seed))
    batch = first_batch(cfg, args.device)
    with tempfile.TemporaryDirectory() as tmp:  # parts are memory-mapped while the steps read them
        teacher, rows_per_s = cached_teacher(cfg, batch, Path(tmp))
        student = build_model(cfg.student.model, lm_vocabulary(), int(cfg.seed))
        kd = build_module(cfg, student, {"cached": teacher}).to(args.device).train()
        kd.bench_optimizer = hydra_optimizer(cfg, kd.trainable_parameters())
        ce = build_ce_module(cfg, copy.deepcopy(student), args.device)  # the same initial student
        fns = {"cached_step": lambda: training_step(kd, batch), "student_ce_step": lambda: training_step(ce, batch)}
        times = interleaved_times(fns, args.repeats, args.warmup, args.device, args.clock)
        per_token = bytes_per_token(tmp)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    low = {name: min(ts) for name, ts in times.items()}
    ratio = med["cached_step"] / med["student_ce_step"]
    print(f"device={args.device} threads={torch.get_num_threads()} batch={tuple(batch['input_ids'].shape)} "
          f"targets={teacher.store.encoding.identity()} student={cfg.student.name} "
          f"repeats={args.repeats} (after {args.warmup} warm-up rounds) clock={args.clock}, torch {torch.__version__}")
    print(f"{'':<44}{'median ms':>12}{'min ms':>10}")
    for name, label in [("cached_step", "(a) cached sparse-KD step (lookup, S fwd/bwd)"),
                        ("student_ce_step", "(b) student CE-only step (fwd, bwd, opt)")]:
        print(f"{label:<44}{1e3 * med[name]:>12.2f}{1e3 * low[name]:>10.2f}")
    print(f"ratio (a) / (b): {ratio:.3f} median, {low['cached_step'] / low['student_ce_step']:.3f} min   (target <= 1.05)")
    print(f"store: {per_token:.0f} bytes/token, write {rows_per_s:.0f} rows/s ({rows_per_s * batch['input_ids'].shape[1]:.0f} tokens/s)")
    return {"ratio": ratio, "bytes_per_token": per_token, "write_rows_per_s": rows_per_s,
            **{f"{k}_ms": 1e3 * v for k, v in med.items()}}


if __name__ == "__main__":
    main(sys.argv[1:])
