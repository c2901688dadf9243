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

`--pair smollm2` (row 2 of issue #22, sub-word to sub-word): the real SmolLM2-135M-Instruct teacher
(49k BPE) on offline prose into the small student with an 8k BPE of the prose training documents
(`experiment=smollm2_cross`, CE + KD at weights 1 and 1): arms `xtoken_kl`, `alm`, `span_kl` (and
`uld` with `--arms`), each with its CE-only 8k student; `kl` is the same student body on the
teacher's own tokenizer with forward KL (`experiment=smollm2`, same weights), whose gain is the
"same-tokenizer gain" the shares are taken of. 300 steps by default (~3.5 s a step on one thread):

    OMP_NUM_THREADS=1 python benchmarks/cross_tokenizer.py --pair smollm2 --seeds 1
    OMP_NUM_THREADS=1 python benchmarks/cross_tokenizer.py --pair smollm2 --quick   # 3 steps (smoke)

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
WEIGHTS = ["distill.kd_weight=1.0", "distill.ce_weight=1.0"]
SMOLLM2_ARMS = {
    "xtoken_kl": ["experiment=smollm2_cross", "loss=xtoken_kl"],
    "alm": ["experiment=smollm2_cross", "loss=alm"],
    "span_kl": ["experiment=smollm2_cross", "loss=span_kl"],
    "uld": ["experiment=smollm2_cross", "loss=uld"],
    # the same student body on the teacher's own 49k tokenizer, forward KL, the same cap per window
    # (its windows are packed across documents, the dual ones end at document ends)
    "kl": ["experiment=smollm2", "loss=kl", "dataset.seq_len=320", *WEIGHTS],
}
# A smoke: 3 steps, one validation batch, a small test split (the real teacher reads ~430 tokens/s).
SMOLLM2_QUICK = ["trainer.val_check_interval=3", "trainer.log_every_n_steps=1", "trainer.limit_val_batches=1",
                 "dataset.max_train_tokens=20000", "dataset.max_eval_tokens=2048"]
PAIRS = {"embedded": (ARMS, DEFAULT_ARMS, QUICK, 400, 20),
         "smollm2": (SMOLLM2_ARMS, "xtoken_kl,alm,span_kl,kl", SMOLLM2_QUICK, 300, 3)}


def run_arm(arms: dict[str, list[str]], arm: str, seed: int, steps: int, out: Path, cache: Path,
            extra: list[str]) -> dict:
    run_dir = out / f"{arm}-seed{seed}"
    summary_path = run_dir / "summary.json"
    if not summary_path.exists():  # a finished run is reused when the script is re-run
        command = [sys.executable, str(ROOT / "train.py"), *arms[arm], f"seed={seed}", f"trainer.max_steps={steps}",
                   f"hydra.run.dir={run_dir}", f"paths.cache_dir={cache}", "trainer.enable_progress_bar=false", *extra]
        started = time.time()
        subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        print(f"  {arm} seed {seed}: {time.time() - started:.0f} s wall", flush=True)
    return json.loads(summary_path.read_text())


def step_cost(overrides: list[str], cache: Path, steps: int = 20, warmup: int = 3) -> float:
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
        cfg = compose("train", overrides=[*overrides, f"paths.cache_dir={cache}", "dataset.max_train_tokens=60000",
                                          "dataset.max_eval_tokens=4096"])
    data = hydra.utils.instantiate(cfg.dataset)
    torch.manual_seed(0)
    teacher = build_model(cfg.teacher.model, data.teacher_data(), 0)
    student = build_model(cfg.student.model, data, 0)
    module = build_module(cfg, student, {cfg.teacher.name: teacher}, **teacher_tokenization_args(data, str(cache)))
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
    parser.add_argument("--pair", choices=list(PAIRS), default="embedded",
                        help="embedded: byte MoE teacher <-> 4k BPE; smollm2: SmolLM2 teacher -> 8k BPE student")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=None, help="default 400 (embedded), 300 (smollm2)")
    parser.add_argument("--out", type=Path, default=None, help="default outputs/bench_cross_tokenizer[_smollm2]")
    parser.add_argument("--cache", type=Path, default=None, help="paths.cache_dir (default <out>/cache)")
    parser.add_argument("--quick", action="store_true", help="1 seed, 20 steps, small data: a smoke test")
    parser.add_argument("--arms", default=None, help=f"comma-separated subset of {','.join(ARMS)} (embedded) or "
                        f"{','.join(SMOLLM2_ARMS)} (smollm2); kl is always run")
    parser.add_argument("--kl-seeds", type=int, default=None,
                        help="seeds of the same-tokenizer kl arm (default: --seeds); fewer saves time, its gain is "
                             "then the mean over those")
    args, extra = parser.parse_known_args()
    pair_arms, default_arms, quick, default_steps, quick_steps = PAIRS[args.pair]
    arms = list(dict.fromkeys([*(args.arms or default_arms).split(","), "kl"]))
    unknown = [a for a in arms if a not in pair_arms]
    if unknown:
        parser.error(f"unknown arm(s) {unknown}; choose from {list(pair_arms)}")
    seeds, steps = (1, quick_steps) if args.quick else (args.seeds, args.steps or default_steps)
    extra = (quick if args.quick else []) + extra
    if args.out is None:
        args.out = ROOT / "outputs" / ("bench_cross_tokenizer" + ("" if args.pair == "embedded" else f"_{args.pair}"))
    cache = args.cache or args.out / "cache"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    results: dict[str, list[dict]] = {arm: [] for arm in arms}
    for seed in range(seeds):
        for arm in arms:
            if arm == "kl" and args.kl_seeds is not None and seed >= args.kl_seeds and not args.quick:
                continue
            results[arm].append(run_arm(pair_arms, arm, seed, steps, args.out, cache, extra))

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
    cost_steps, cost_warmup = (2, 1) if args.quick and args.pair != "embedded" else (20, 3)
    cpu = {arm: step_cost(pair_arms[arm], cache, cost_steps, cost_warmup) for arm in arms}
    print(f"\nCPU seconds per training step (1 thread, {cost_steps} steps after {cost_warmup} warm-up): "
          + ", ".join(f"{arm} {seconds:.3f}" for arm, seconds in cpu.items()))
    for arm in (a for a in arms if a != "kl"):
        kept = mean(gains[arm]) / mean(gains["kl"]) if mean(gains["kl"]) else float("nan")
        print(f"{arm}: keeps {kept:.2f} of same-tokenizer kl's gain; step cost {cpu[arm] / cpu['kl']:.2f}x kl's "
              f"(CPU time), {wall_step[arm] / wall_step['kl']:.2f}x (seed-0 fit wall time)")


if __name__ == "__main__":
    main()
