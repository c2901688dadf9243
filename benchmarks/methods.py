"""Method comparison: KD divergences, temperature schedules and MoE-teacher methods at a fixed budget.

Every arm is a Hydra multirun of `train.py` (basic launcher, run as a subprocess), one multirun per
(arm, seed) so that `--jobs 2` can run two of them side by side; `kd_lightning.report` then builds
the mean ± std table of each arm over seeds, and this script adds one combined table with the
teacher and the CE-only student (`baseline=true`, cached per seed) as reference rows.

Arms (the same student, data and number of student steps in every run, so the same token budget):

- `losses`: kl, reverse_kl, skew_kl, skew_reverse_kl, js, gjsd, tvd, akl, taid, sparse_kl
  (`uld` is left out: it is for teachers and students with different vocabularies, and here both
  share the byte vocabulary, where it is only a weaker distance between sorted distributions).
- `temperature`: `temperature=constant temperature.initial=1,2,4` against `temperature=dts`.
- `moe`: plain `teacher=moe`, `teacher=moe_ka distill.teacher_combine=losses` (Knowledge
  Augmentation) and `callbacks=sar` (Student-Aware Router), all with the default forward KL.

All runs share one `paths.cache_dir` (default `<out>/cache`), so the MoE teacher is pre-trained once
per seed (600 steps, about 3 minutes each on one CPU core) and the CE-only baseline once per seed.

    python benchmarks/methods.py --quick                      # 1 seed, tiny budget: a smoke test (~75 s)
    python benchmarks/methods.py --steps 150 --jobs 2         # 3 seeds, every arm
    python benchmarks/methods.py --arms losses --steps 150    # one arm

Run with OMP_NUM_THREADS=1 on a small CPU machine (two torch threads per process on a shared 2-core
machine are many times slower). Trailing arguments are extra Hydra overrides for every run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kd_lightning.report import ReportError, aggregate, fmt, load_runs, markdown_table, write_report  # noqa: E402

LOSSES = ["kl", "reverse_kl", "skew_kl", "skew_reverse_kl", "js", "gjsd", "tvd", "akl", "taid", "sparse_kl"]

# arm -> list of (name of the sub-multirun, its sweep overrides)
ARMS: dict[str, list[tuple[str, list[str]]]] = {
    "losses": [("losses", ["loss=" + ",".join(LOSSES)])],
    "temperature": [("constant", ["temperature=constant", "temperature.initial=1.0,2.0,4.0"]),
                    ("dts", ["temperature=dts"])],
    "moe": [("plain", ["teacher=moe"]),
            ("ka", ["teacher=moe_ka", "distill.teacher_combine=losses"]),
            ("sar", ["callbacks=sar"])],
}
QUICK_ARMS: dict[str, list[tuple[str, list[str]]]] = {
    "losses": [("losses", ["loss=kl,skew_kl"])],
    "temperature": [("dts", ["temperature=dts"])],
    "moe": [("ka", ["teacher=moe_ka", "distill.teacher_combine=losses"])],  # SAR is ~8x slower per step
}


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="1 seed, 2 losses + DTS + KA, 60-step teacher, 20 student steps (about 75 s on 2 cores)")
    p.add_argument("--steps", type=int, default=None, help="student steps per run (default 400, the README default; 20 with --quick)")
    p.add_argument("--val-every", type=int, default=None, help="trainer.val_check_interval (default steps // 2)")
    p.add_argument("--eval-tokens", type=int, default=32768,
                   help="dataset.max_eval_tokens (default 32768: 256 windows of 128 bytes per eval split)")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default 0,1,2; 0 with --quick)")
    p.add_argument("--arms", default="losses,temperature,moe", help="comma-separated subset of: " + ", ".join(ARMS))
    p.add_argument("--variants", default=None,
                   help="comma-separated sub-multiruns to keep (losses; constant, dts; plain, ka, sar; default all)")
    p.add_argument("--out", default=None, help="output directory (default outputs/methods/<date>_<time>)")
    p.add_argument("--cache-dir", default=None, help="paths.cache_dir shared by every run (default <out>/cache)")
    p.add_argument("--jobs", type=int, default=1, help="multiruns at the same time (each one process; default 1)")
    p.add_argument("--python", default=sys.executable, help="interpreter for train.py")
    p.add_argument("--dry-run", action="store_true", help="print the commands only")
    p.add_argument("--report-only", action="store_true", help="only rebuild the tables of an existing --out")
    return p.parse_known_args(argv)


def commands(args: argparse.Namespace, extra: list[str]) -> list[tuple[str, Path, list[str]]]:
    """(arm, sweep dir, argv) for every multirun, ordered arm by arm, seed by seed."""
    out = Path(args.out)
    steps = args.steps if args.steps is not None else (20 if args.quick else 400)
    val_every = args.val_every or max(1, steps // 2)
    seeds = [int(s) for s in (args.seeds or ("0" if args.quick else "0,1,2")).split(",")]
    arms = QUICK_ARMS if args.quick else ARMS
    common = [f"trainer.max_steps={steps}", f"trainer.val_check_interval={val_every}",
              f"dataset.max_eval_tokens={args.eval_tokens}", f"paths.cache_dir={args.cache_dir}",
              "baseline=true", "trainer.enable_progress_bar=false"]
    if args.quick:
        common += ["teacher.pretrain.max_steps=60", "trainer.limit_val_batches=4"]
    runs = []
    for arm in args.arms.split(","):
        if arm not in arms:
            raise SystemExit(f"unknown arm {arm!r}; choose from {', '.join(arms)}")
        keep = [(n, sw) for n, sw in arms[arm] if args.variants is None or n in args.variants.split(",")]
        for name, sweep in keep:  # sub-multirun by sub-multirun, so the costly ones (SAR) come last
            for seed in seeds:
                sweep_dir = out / arm / f"seed{seed}" / name
                argv = [args.python, str(ROOT / "train.py"), "-m", *sweep, f"seed={seed}", *common, *extra,
                        f"hydra.sweep.dir={sweep_dir}"]
                runs.append((arm, sweep_dir, argv))
    return runs


def run_one(arm: str, sweep_dir: Path, argv: list[str]) -> tuple[str, Path, int, float]:
    sweep_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(sweep_dir / "multirun.log", "w") as log:
        rc = subprocess.call(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                             env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    return arm, sweep_dir, rc, time.perf_counter() - start


def reference_rows(runs) -> list[list[str]]:
    """Teacher and CE-only rows (mean ± std over seeds, one value per seed) from the summaries."""
    per_seed: dict[str, dict[int, dict]] = {"teacher": {}, "student (CE only)": {}}
    for run in runs:
        models = run.summary.get("models", {})
        for key, row in models.items():
            name = "teacher" if key.startswith("teacher") else key
            if name in per_seed and run.seed is not None:
                per_seed[name].setdefault(run.seed, row)
    rows = []
    for name, by_seed in per_seed.items():
        if not by_seed:
            continue
        cells = []
        for key, spec in (("loss", ".4f"), ("ppl", ".3f"), ("teacher_agreement", ".3f"), ("ece", ".4f")):
            vals = [float(r[key]) for r in by_seed.values() if r.get(key) is not None]
            cells.append(_mean_std(vals, spec))
        base = per_seed["student (CE only)"]
        delta = _mean_std([float(r["loss"]) - float(base[seed]["loss"]) for seed, r in by_seed.items() if seed in base], "+.4f")
        rows.append([f"*{name}*", ",".join(map(str, sorted(by_seed))), cells[0], delta, *cells[1:], "–"])
    return rows


def _mean_std(vals: list[float], spec: str) -> str:
    if not vals:
        return "–"
    mean = sum(vals) / len(vals)
    if len(vals) == 1:
        return fmt(mean, spec)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))
    return f"{fmt(mean, spec)} ± {fmt(std, spec.lstrip('+'))}"


def combined_table(out: Path, arms: list[str]) -> str:
    parts = []
    for arm in arms:
        root = out / arm
        if not root.is_dir():
            continue
        try:
            runs, unfinished = load_runs(root)
            write_report(root, plot=True)
        except ReportError as err:
            parts.append(f"### {arm}\n\nno results: {err}\n")
            continue
        # the test split is drawn per seed, so seed-to-seed spread of the loss is mostly the split;
        # the paired difference to the same seed's CE-only student removes it
        deltas: dict[str, list[float]] = {}
        for run in runs:
            if run.values.get("loss") is not None and run.values.get("baseline_loss") is not None:
                deltas.setdefault(run.method, []).append(run.values["loss"] - run.values["baseline_loss"])
        rows = [[f"`{r['method']}`", ",".join(map(str, r["seeds"])),
                 *(fmt(r[k][0], s) + ("" if math.isnan(r[k][1]) else " ± " + fmt(r[k][1], s))
                   for k, s in (("loss", ".4f"),)),
                 _mean_std(deltas.get(r["method"], []), "+.4f"),
                 *(fmt(r[k][0], s) + ("" if math.isnan(r[k][1]) else " ± " + fmt(r[k][1], s))
                   for k, s in (("ppl", ".3f"), ("teacher_agreement", ".3f"), ("ece", ".4f"),
                                ("tokens_per_second", ",.0f")))] for r in aggregate(runs)]
        rows += reference_rows(runs)
        header = ["method", "seeds", "held-out loss", "Δ loss vs CE-only (paired)", "perplexity", "teacher agreement",
                  "ECE", "tokens/s"]
        text = f"### {arm}\n\n" + markdown_table(header, rows) + "\n"
        if unfinished:
            text += "\nunfinished (no summary.json): " + ", ".join(str(p.relative_to(root)) for p in unfinished) + "\n"
        parts.append(text)
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> None:
    args, extra = parse_args(argv)
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    args.out = str(Path(args.out or ROOT / "outputs" / "methods" / stamp).resolve())
    args.cache_dir = str(Path(args.cache_dir or Path(args.out) / "cache").resolve())
    if args.report_only:
        text = combined_table(Path(args.out), args.arms.split(","))
        (Path(args.out) / "methods.md").write_text(text)
        print(text)
        return
    todo = commands(args, extra)
    for _, _, cmd in todo:
        print(" ".join(cmd[1:]), flush=True)
    if args.dry_run:
        return
    start = time.perf_counter()
    # the teacher (and baseline) of a seed is trained by whichever job gets there first; run one job
    # per seed alone first so parallel jobs never train the same teacher twice
    first_of_seed: dict[str, int] = {}
    for i, (_, sweep_dir, _) in enumerate(todo):
        first_of_seed.setdefault(sweep_dir.parent.name, i)
    first = [todo[i] for i in sorted(first_of_seed.values())]
    rest = [t for i, t in enumerate(todo) if i not in first_of_seed.values()]
    timings = {}
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for batch in (first, rest):
            for arm, sweep_dir, rc, seconds in pool.map(lambda t: run_one(*t), batch):
                timings[str(sweep_dir)] = {"rc": rc, "seconds": round(seconds, 1)}
                print(f"[{rc}] {seconds:7.1f} s  {sweep_dir}", flush=True)
    total = time.perf_counter() - start
    arms = args.arms.split(",")
    text = combined_table(Path(args.out), arms)
    (Path(args.out) / "methods.md").write_text(text)
    (Path(args.out) / "timings.json").write_text(json.dumps({"total_seconds": round(total, 1), "multiruns": timings}, indent=2))
    print(text)
    print(f"total wall time {total:.0f} s; tables in {args.out}/methods.md and {args.out}/<arm>/results.md")


if __name__ == "__main__":
    main()
