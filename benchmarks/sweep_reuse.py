"""Teacher outputs once per sweep: how much wall time does `teacher_outputs.reuse` save a sweep?

Runs the same `+sweep=losses` multirun (a few losses, `--seeds` seeds, the embedded default: MoE teacher,
tiny student, stdlib bytes) twice, one after the other, with shared and already pre-trained teachers
(`stage=teacher` for every seed first, not timed):

  (A) `teacher_outputs.reuse=false`: every run runs the teacher on every batch;
  (B) `teacher_outputs.reuse=true` with an empty store: the first run computes and stores the
      teacher's log-probabilities, the others read them;

and prints the wall time of each multirun, the ratio B / A, the time saved that `kd-report` shows
for B, and the largest difference of a student's held-out loss between A and B (float32 store, the
default: float rounding only; with `teacher_outputs.dtype=float16` reverse KL moved by ~5e-3).

    python benchmarks/sweep_reuse.py --quick      # 2 losses x 20 steps (under 2 minutes on 2 CPU cores)
    python benchmarks/sweep_reuse.py              # 4 losses x 100 steps
    python benchmarks/sweep_reuse.py --seeds 3    # 4 losses x 3 seeds x 100 steps (issue #14's sweep)

Run with OMP_NUM_THREADS=1 on a small CPU machine. Trailing arguments are extra Hydra overrides.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kd_lightning.report import load_runs, reuse_section, write_report  # noqa: E402


def multirun(python: str, args: list[str], log: Path) -> float:
    start = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.call([python, str(ROOT / "train.py"), *args], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                             env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    if rc != 0:
        raise SystemExit(f"train.py failed (exit {rc}); see {log}")
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="2 losses x 20 steps, 60-step teacher (under 2 minutes)")
    p.add_argument("--steps", type=int, default=None, help="student steps per run (default 100; 20 with --quick)")
    p.add_argument("--losses", default=None, help="comma-separated losses (default kl,reverse_kl,skew_kl,js; kl,reverse_kl with --quick)")
    p.add_argument("--out", default=None, help="output directory (default: a temporary one)")
    p.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1 of every loss (default 1; the issue's sweep: 3)")
    p.add_argument("--python", default=sys.executable)
    args, extra = p.parse_known_args(argv)
    out = Path(args.out or tempfile.mkdtemp(prefix="kd_sweep_reuse-")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    steps = args.steps or (20 if args.quick else 100)
    losses = args.losses or ("kl,reverse_kl" if args.quick else "kl,reverse_kl,skew_kl,js")
    common = [f"paths.cache_dir={out / 'cache'}", "baseline=false", "trainer.enable_progress_bar=false",
              f"trainer.max_steps={steps}", f"trainer.val_check_interval={max(1, steps // 2)}"]
    seeds = ",".join(str(s) for s in range(args.seeds))
    if args.quick:
        common += ["teacher.pretrain.max_steps=60", "trainer.limit_val_batches=4", "dataset.max_eval_tokens=16384"]
    common += extra
    print(f"pre-training the teacher (not timed) into {out / 'cache'}", flush=True)
    multirun(args.python, ["-m", "stage=teacher", f"seed={seeds}", *common, f"hydra.sweep.dir={out / 'teacher'}"],
             out / "teacher.log")  # one teacher per seed, cached before the timed sweeps
    sweep = ["-m", "+sweep=losses", f"loss={losses}", f"seed={seeds}"]
    times = {}
    for name, reuse in (("A_online", ["teacher_outputs.reuse=false"]),
                        ("B_reuse", ["teacher_outputs.reuse=true", f"teacher_outputs.dir={out / 'store'}"])):
        times[name] = multirun(args.python, [*sweep, *common, *reuse, f"hydra.sweep.dir={out / name}"], out / f"{name}.log")
        print(f"{name}: {times[name]:.1f} s", flush=True)
    write_report(out / "B_reuse", plot=False)
    online, reused = (load_runs(out / n)[0] for n in ("A_online", "B_reuse"))
    by_run = {(r.summary["loss"], r.summary["seed"]): r.values["loss"] for r in online}
    diff = max(abs(r.values["loss"] - by_run[r.summary["loss"], r.summary["seed"]]) for r in reused)
    section = reuse_section(reused)
    store_mib = sum(f.stat().st_size for f in (out / "store").rglob("*.safetensors")) / 2**20
    ratio = times["B_reuse"] / times["A_online"]
    n = len(losses.split(","))
    print()
    print(f"| multirun ({n} losses x {args.seeds} seed(s) x {steps} steps) | wall s |")
    print("|---|---|")
    print(f"| (A) teacher_outputs.reuse=false | {times['A_online']:.1f} |")
    print(f"| (B) teacher_outputs.reuse=true (empty store) | {times['B_reuse']:.1f} |")
    print(f"\nratio B / A = {ratio:.3f}; wall time saved {times['A_online'] - times['B_reuse']:.1f} s; "
          f"store {store_mib:.0f} MiB; max |held-out loss B - A| = {diff:.2e}")
    print("kd-report on B:", section[-1] if section else "(no reuse statistics)")
    result = {"a_seconds": times["A_online"], "b_seconds": times["B_reuse"], "ratio": ratio, "max_loss_diff": diff,
              "store_mib": store_mib}
    (out / "sweep_reuse.json").write_text(json.dumps(result, indent=2))
    print(f"outputs in {out}")
    return result


if __name__ == "__main__":
    main()
