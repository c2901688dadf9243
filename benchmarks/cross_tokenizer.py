"""Cross-tokenizer distillation on the embedded data: does it beat CE-only, and how much of
same-tokenizer KD's gain does it keep?

Arms (each a `train.py` subprocess with `baseline=true`, per seed; the same tiny student
architecture, optimiser and number of steps everywhere; one shared `paths.cache_dir`, so the
byte-level MoE teacher is pre-trained once per seed and every arm reads the same cached teacher):

- `uld`      `experiment=cross_tokenizer loss=uld`       byte teacher -> 4k-BPE student
- `span_kl`  `experiment=cross_tokenizer loss=span_kl`   byte teacher -> 4k-BPE student
- `kl`       `loss=kl` (the default run)                 byte teacher -> byte student (same tokenizer)
- `alm` `experiment=cross_tokenizer loss=alm`; `alm_reverse`, `byte_kl_reverse` (`--arms`): the
  losses of issue #22 (approximate likelihood matching; exact next-byte targets for a byte student)
- `uld_reverse`, `span_kl_reverse` (`--arms`)  `experiment=cross_tokenizer_reverse`: a 4k-BPE MoE
  teacher, pre-trained on its own tokens, -> the byte student

Each run also reports its CE-only student (the BPE one is cached and shared by `uld` and
`span_kl`). Held-out loss is compared in nats per byte of text (`loss_per_byte`), so the BPE and
byte students are on one scale. Printed: per arm the mean over seeds of KD and CE-only nats/byte,
the paired gain (CE-only - KD) and how many seeds it was positive; the share of the
same-tokenizer gain each cross-tokenizer loss keeps (mean gain / mean `kl` gain); and the step
cost of each cross-tokenizer loss relative to `kl`: CPU seconds (`time.process_time`, one thread,
so neighbours on a shared machine do not distort it) of `training_step` + backward + AdamW step on
the arm's real batches, models at random init (only cost matters), measured in this invocation.
The `s/step` column (fit wall seconds / steps of the seed-0 run) is shown too but is only
meaningful on a quiet machine.

    OMP_NUM_THREADS=1 python benchmarks/cross_tokenizer.py                 # 3 seeds, 400 steps
    OMP_NUM_THREADS=1 python benchmarks/cross_tokenizer.py --quick         # 1 seed, 20 steps (smoke)

Trailing arguments are extra Hydra overrides for every run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from statistics import mean

ROOT = Path(__file__).resolve().parent.parent

ARMS = {
    "uld": ["experiment=cross_tokenizer", "loss=uld"],
    "span_kl": ["experiment=cross_tokenizer", "loss=span_kl"],
    "kl": ["loss=kl"],
    # the reverse direction: a 4k-BPE MoE teacher (pre-trained on its own tokens) -> the byte student
    "uld_reverse": ["experiment=cross_tokenizer_reverse", "loss=uld"],
    "span_kl_reverse": ["experiment=cross_tokenizer_reverse", "loss=span_kl"],
    # issue #22: approximate likelihood matching (both directions), exact next-byte targets (byte student)
    "alm": ["experiment=cross_tokenizer", "loss=alm"],
    "alm_reverse": ["experiment=cross_tokenizer_reverse", "loss=alm"],
    "byte_kl_reverse": ["experiment=cross_tokenizer_reverse", "loss=byte_kl"],
}
DEFAULT_ARMS = "uld,span_kl,kl"
QUICK = ["trainer.max_steps=20", "teacher.pretrain.max_steps=20", "trainer.val_check_interval=10",
         "trainer.limit_val_batches=2", "dataset.max_train_tokens=200000", "dataset.max_eval_tokens=8192"]


def run_arm(arm: str, seed: int, steps: int, out: Path, cache: Path, extra: list[str]) -> dict:
    run_dir = out / f"{arm}-seed{seed}"
    summary_path = run_dir / "summary.json"
    if not summary_path.exists():  # a finished run is reused when the script is re-run
        command = [sys.executable, str(ROOT / "train.py"), *ARMS[arm], f"seed={seed}", f"trainer.max_steps={steps}",
                   f"hydra.run.dir={run_dir}", f"paths.cache_dir={cache}", "trainer.enable_progress_bar=false", *extra]
        started = time.time()
        subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        print(f"  {arm} seed {seed}: {time.time() - started:.0f} s wall", flush=True)
    return json.loads(summary_path.read_text())


def step_cost(arm: str, cache: Path, steps: int = 20, warmup: int = 3) -> float:
    """CPU seconds per training step (forward, KD/CE terms, backward, AdamW) of an arm, in-process."""
    import hydra
    import torch
    from hydra import compose, initialize_config_dir

    sys.path.insert(0, str(ROOT))
    from kd_lightning.run import CONFIG_DIR
    from kd_lightning.cross_tokenizer import teacher_tokenization_args
    from kd_lightning.run.builders import build_model
    from kd_lightning.run.distill import build_module

    torch.set_num_threads(1)
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[*ARMS[arm], f"paths.cache_dir={cache}", "dataset.max_train_tokens=60000",
                                          "dataset.max_eval_tokens=4096"])
    data = hydra.utils.instantiate(cfg.dataset)
    torch.manual_seed(0)
    teacher = build_model(cfg.teacher.model, data.teacher_data(), 0)
    student = build_model(cfg.student.model, data, 0)
    module = build_module(cfg, student, {"moe": teacher}, **teacher_tokenization_args(data, str(cache)))
    module.log = lambda *args, **kwargs: None  # outside a Trainer: nothing to log to
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
    batches = iter(data.train_dataloader())
    elapsed = 0.0
    for step in range(warmup + steps):
        batch = next(batches)
        started = time.process_time()
        module.training_step(batch, step).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= warmup:
            elapsed += time.process_time() - started
    return elapsed / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench_cross_tokenizer")
    parser.add_argument("--cache", type=Path, default=None, help="paths.cache_dir (default <out>/cache)")
    parser.add_argument("--quick", action="store_true", help="1 seed, 20 steps, small data: a smoke test")
    parser.add_argument("--arms", default=DEFAULT_ARMS, help=f"comma-separated subset of {','.join(ARMS)} (kl is always run)")
    args, extra = parser.parse_known_args()
    arms = list(dict.fromkeys([*args.arms.split(","), "kl"]))
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        parser.error(f"unknown arm(s) {unknown}; choose from {list(ARMS)}")
    seeds, steps = (1, 20) if args.quick else (args.seeds, args.steps)
    extra = (QUICK if args.quick else []) + extra
    cache = args.cache or args.out / "cache"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    results: dict[str, list[dict]] = {arm: [] for arm in arms}
    for seed in range(seeds):
        for arm in arms:
            results[arm].append(run_arm(arm, seed, steps, args.out, cache, extra))

    def per_byte(summary: dict, row: str) -> float:
        return float(summary["models"][row]["loss_per_byte"])

    print(f"\n{seeds} seed(s), {steps} student steps; held-out nats/byte (test split)\n")
    print("| arm | teacher | KD student | CE-only student | gain (CE - KD) | seeds KD < CE | s/step |")
    print("|---|---|---|---|---|---|---|")
    gains, wall_step = {}, {}
    for arm, runs in results.items():
        kd = [per_byte(r, "student (KD)") for r in runs]
        ce = [per_byte(r, "student (CE only)") for r in runs]
        teacher = [per_byte(r, next(k for k in r["models"] if k.startswith("teacher:"))) for r in runs]
        gains[arm] = [c - k for k, c in zip(kd, ce)]
        wall_step[arm] = runs[0]["timing"]["fit_seconds"] / steps
        print(f"| {arm} | {mean(teacher):.4f} | {mean(kd):.4f} | {mean(ce):.4f} | {mean(gains[arm]):+.4f} | "
              f"{sum(g > 0 for g in gains[arm])}/{len(runs)} | {wall_step[arm]:.3f} |")
    cpu = {arm: step_cost(arm, cache) for arm in arms}
    print("\nCPU seconds per training step (1 thread, 20 steps after 3 warm-up): "
          + ", ".join(f"{arm} {seconds:.3f}" for arm, seconds in cpu.items()))
    for arm in (a for a in arms if a != "kl"):
        kept = mean(gains[arm]) / mean(gains["kl"]) if mean(gains["kl"]) else float("nan")
        print(f"{arm}: keeps {kept:.2f} of same-tokenizer kl's gain; step cost {cpu[arm] / cpu['kl']:.2f}x kl's "
              f"(CPU time), {wall_step[arm] / wall_step['kl']:.2f}x (seed-0 fit wall time)")


if __name__ == "__main__":
    main()
