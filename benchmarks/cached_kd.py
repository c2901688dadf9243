"""Offline sparse KD overhead: does a step on cached teacher targets cost more than a CE-only step?

In ONE process, on the same batch of the embedded default (batch 16 x 128 of the stdlib corpus, the
tiny student built from conf/), times

  (a) a training step with cached sparse targets (`teacher=cached loss=sparse_kl`): the targets
      looked up by sample index in the in-memory table read from a safetensors shard
      (`kd_lightning.teachers.teacher_cache.CachedTeacher`), student forward, CE + `sparse_kl`, backward,
      optimizer step (`DistillationModule._step`, as `kd_lightning.train` builds it);
  (b) the student's CE-only training step (the no-KD baseline's code path), backward, optimizer step;

interleaved (a, b, a, b, ...) and prints medians and the ratio (a) / (b) (target <= 1.05). The targets
are Random-Sampling KD targets (`teacher_cache.*` of conf/train.yaml: k, num_draws) of the
random-init MoE teacher on that batch: only their shape matters for time.

    python benchmarks/cached_kd.py --quick        # < 1 minute on 2 CPU cores (1 thread, CPU time)
    python benchmarks/cached_kd.py                # more repeats
"""

from __future__ import annotations

import copy
import json
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file

from speed import (benchmark_args, build_ce_module, compose_config, first_batch, hydra_optimizer, interleaved_times,
                   lm_vocabulary, training_step)


def cached_teacher(cfg, batch: dict[str, torch.Tensor], directory: Path):
    """A `CachedTeacher` over one shard holding the batch's samples (indices renumbered 0..B-1)."""
    from kd_lightning.stages import build_model
    from kd_lightning.teachers.teacher_cache import FORMAT_VERSION, CachedTeacher, batch_targets, method_params

    teacher = build_model(cfg.teacher.model, lm_vocabulary(), int(cfg.seed)).eval()
    with torch.no_grad():
        targets = batch_targets(teacher, batch, method_params(cfg), torch.Generator().manual_seed(0))
    rows, k = targets.indices.shape[1:]
    save_file({"indices": targets.indices.flatten(0, 1).to(torch.int32).contiguous(),
               "probs": targets.probs.flatten(0, 1).float().contiguous()}, str(directory / "shard-00000.safetensors"))
    manifest = {"format_version": FORMAT_VERSION, "k": k, "positions_per_sample": rows, "vocab_size": lm_vocabulary().vocab_size,
                "num_samples": len(batch["input_ids"]),
                "shards": [{"file": "shard-00000.safetensors", "first_sample": 0, "num_samples": len(batch["input_ids"])}]}
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return CachedTeacher(directory, manifest)


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    args = benchmark_args(argv, __doc__.splitlines()[0], quick_help="fewer repeats (< 1 minute on 2 CPU cores)",
                          repeats=(60, 15), warmup=3)
    cfg = compose_config(["dataset.max_train_tokens=200000", "dataset.max_eval_tokens=4096", "loss=sparse_kl",
                          *args.overrides])
    from kd_lightning.stages import build_model
    from kd_lightning.train import build_module

    torch.manual_seed(int(cfg.seed))
    batch = first_batch(cfg, args.device)
    batch["index"] = torch.arange(len(batch["input_ids"]), device=args.device)
    with tempfile.TemporaryDirectory() as tmp:
        teacher = cached_teacher(cfg, batch, Path(tmp))
    student = build_model(cfg.student.model, lm_vocabulary(), int(cfg.seed))
    kd = build_module(cfg, student, {"cached": teacher}).to(args.device).train()
    kd.bench_optimizer = hydra_optimizer(cfg, kd.trainable_parameters())
    ce = build_ce_module(cfg, copy.deepcopy(student), args.device)  # the same initial student
    fns = {"cached_step": lambda: training_step(kd, batch), "student_ce_step": lambda: training_step(ce, batch)}
    times = interleaved_times(fns, args.repeats, args.warmup, args.device, args.clock)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    low = {name: min(ts) for name, ts in times.items()}
    ratio = med["cached_step"] / med["student_ce_step"]
    print(f"device={args.device} threads={torch.get_num_threads()} batch={tuple(batch['input_ids'].shape)} "
          f"targets={cfg.teacher_cache.method} k={teacher.indices.shape[-1]} student={cfg.student.name} "
          f"repeats={args.repeats} (after {args.warmup} warm-up rounds) clock={args.clock}, torch {torch.__version__}")
    print(f"{'':<44}{'median ms':>12}{'min ms':>10}")
    for name, label in [("cached_step", "(a) cached sparse-KD step (lookup, S fwd/bwd)"),
                        ("student_ce_step", "(b) student CE-only step (fwd, bwd, opt)")]:
        print(f"{label:<44}{1e3 * med[name]:>12.2f}{1e3 * low[name]:>10.2f}")
    print(f"ratio (a) / (b): {ratio:.3f} median, {low['cached_step'] / low['student_ce_step']:.3f} min   (target <= 1.05)")
    return {"ratio": ratio, **{f"{k}_ms": 1e3 * v for k, v in med.items()}}


if __name__ == "__main__":
    main(sys.argv[1:])
