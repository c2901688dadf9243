"""DDP on 2 processes against 1: throughput, step time and memory of the embedded default run.

Runs `train.py` (MoE teacher pre-trained once and cached first, not timed; tiny student; KD with the
default loss; no baseline, no validation) three times, one after the other:

  (1) 1 process (`strategy=cpu`), batch 16 per step;
  (2) DDP, 2 processes (`strategy=ddp`, gloo on CPU), batch 16 per process: 32 per optimizer step;
  (3) DDP, 2 processes, batch 8 per process: the same 16 per optimizer step as (1);

each with one torch thread per process (`cpu_threads=1`), and prints fit wall time, ms per
optimizer step, training tokens/s (all ranks), the speed-up of tokens/s over (1) and the peak
resident memory of the largest process (rank 0 holds the teacher like every rank: frozen teachers
are replicated, not sharded, under DDP).

On a 2-core machine the 2 DDP processes take both cores, so anything else running shows up
directly in these numbers; the script prints the load average before and after.

    python benchmarks/ddp.py --quick      # 30 steps per run (under 2 minutes on 2 CPU cores, teacher cached)
    python benchmarks/ddp.py              # 150 steps per run

Trailing arguments are extra Hydra overrides for every run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Runs the command, then prints the largest resident set of it and its descendants (KiB on Linux).
MEASURE = ("import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
           "print('MAXRSS_KIB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(rc)")


def run(python: str, argv: list[str], log: Path) -> int:
    """Run train.py with `argv`; returns the peak RSS (KiB) of its largest process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([python, "-c", MEASURE, python, str(ROOT / "train.py"), *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    log.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"train.py {' '.join(argv)} failed (exit {proc.returncode}); see {log}")
    return int(next(line.split()[1] for line in proc.stdout.splitlines() if line.startswith("MAXRSS_KIB")))


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="30 steps per run, 60-step teacher (under 2 minutes)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 150; 30 with --quick)")
    p.add_argument("--out", default=None, help="output directory (default: a temporary one)")
    p.add_argument("--python", default=sys.executable)
    args, extra = p.parse_known_args(argv)
    out = Path(args.out or tempfile.mkdtemp(prefix="kd_ddp-")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    steps = args.steps or (30 if args.quick else 150)
    common = [f"paths.cache_dir={out / 'cache'}", "baseline=false", "trainer.enable_progress_bar=false",
              f"trainer.max_steps={steps}", "trainer.limit_val_batches=0", "cpu_threads=1",
              "dataset.max_eval_tokens=4096", "seed=0"]
    if args.quick:
        common += ["teacher.pretrain.max_steps=60"]
    common += extra
    print(f"load average before: {os.getloadavg()}", flush=True)
    run(args.python, ["stage=teacher", *common, f"hydra.run.dir={out / 'teacher'}"], out / "teacher.log")
    configs = [("1 process", 1, 16, ["strategy=cpu", "dataset.batch_size=16"]),
               ("DDP 2 processes, 16 per process", 2, 32, ["strategy=ddp", "trainer.devices=2", "dataset.batch_size=16"]),
               ("DDP 2 processes, 8 per process", 2, 16, ["strategy=ddp", "trainer.devices=2", "dataset.batch_size=8"])]
    rows = []
    for name, procs, global_batch, overrides in configs:
        run_dir = out / name.split(",")[0].replace(" ", "_") / str(global_batch)
        rss = run(args.python, [*common, *overrides, f"hydra.run.dir={run_dir}"], run_dir.with_suffix(".log"))
        timing = json.loads((run_dir / "summary.json").read_text())["timing"]
        rows.append({"run": name, "processes": procs, "global_batch": global_batch, "fit_seconds": timing["fit_seconds"],
                     "ms_per_step": 1000 * timing["fit_seconds"] / steps, "tokens_per_second": timing["tokens_per_second"],
                     "peak_rss_mib": rss / 1024})
        print(f"{name}: {timing['fit_seconds']:.1f} s", flush=True)
    print(f"load average after: {os.getloadavg()}")
    base = rows[0]["tokens_per_second"]
    print(f"\n| run ({steps} steps, 1 thread per process) | global batch | fit s | ms/step | tokens/s | speed-up | peak RSS MiB (largest process) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['global_batch']} | {r['fit_seconds']:.1f} | {r['ms_per_step']:.1f} | "
              f"{r['tokens_per_second']:,.0f} | {r['tokens_per_second'] / base:.2f}x | {r['peak_rss_mib']:.0f} |")
    (out / "ddp.json").write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
