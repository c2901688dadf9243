"""Teacher-store encodings at a realistic vocabulary: how compact, how close to online KD?

The embedded corpus (Python's standard library) tokenized with a byte-level BPE of `--vocab` entries
(`kd_lightning.data.stdlib.stdlib_bpe_tokenizer`, trained on the training files only), a tiny Mixtral
MoE teacher pre-trained with CE (once, cached under --out), then for each seed a tiny Llama student
distilled (0.5 CE + 0.5 forward KL, T = 1) from:

  online        the teacher run every step (reference);
  <encoding>    the teacher store (`kd_lightning.teachers.store`) filled once for the training
                windows and read back. `full-*` arms decode to dense log-probabilities (dense forward
                KL, as every dense loss reads them); `topk*` and `sample*` arms use what
                `teacher=cached loss=sparse_kl` uses: the sparse targets and the module's kernel
                (`fast_sparse_kd_terms`, CE from the same log-probabilities). A topk arm's suffix is
                its tail (`teacher_cache.tail`): `-bucket` = one extra bin (the default), `-drop` =
                head renormalised, none = spread uniformly over the V - k other ids (the same value
                and gradient as the dense decode the earlier figures used).

Printed per method: bytes per token (from the store's files), held-out loss in nats per byte
(validation CE per token x tokens per byte), its gap to online KD (mean over seeds), the student step
time relative to a CE-only step, and the store's write throughput.

    python benchmarks/store_encodings.py --quick                 # smoke test, about 1 minute
    nice -n 10 python benchmarks/store_encodings.py --out /tmp/store_bench   # the docs/benchmarks.md figures
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kd_lightning.losses import forward_kl  # noqa: E402
from kd_lightning.losses.fast import fast_sparse_kd_terms  # noqa: E402
from kd_lightning.teachers.encodings import Encoding  # noqa: E402
from kd_lightning.teachers.store import TeacherOutputStore, bytes_per_token, row_keys, store_identity  # noqa: E402

ENCODINGS = {
    "full-f32": Encoding("full", "float32"), "full-f16": Encoding("full", "float16"),
    "topk8-u8": Encoding("topk", "uint8", k=8), "topk32-u8": Encoding("topk", "uint8", k=32),
    "topk128-u8": Encoding("topk", "uint8", k=128), "topk32-f16": Encoding("topk", "float16", k=32),
    "sample32": Encoding("sample", k=32, num_draws=32), "sample64": Encoding("sample", k=64, num_draws=64),
}
TAILS = ("bucket", "drop")
QUICK = ("full-f32", "topk32-u8", "topk32-u8-bucket", "sample32")


def arm(name: str) -> tuple[str, str | None]:
    """(store encoding name, topk tail mode or None) of a benchmark arm."""
    base, _, suffix = name.rpartition("-")
    if suffix in TAILS and base in ENCODINGS:
        return base, suffix
    if name not in ENCODINGS:
        raise ValueError(f"unknown arm {name!r}: an encoding of {list(ENCODINGS)}, topk ones optionally with -{'/-'.join(TAILS)}")
    return name, ("uniform" if ENCODINGS[name].encoding == "topk" else None)


def windows(tokenizer, files: list[str], max_tokens: int, seq_len: int) -> tuple[torch.Tensor, int]:
    """Non-overlapping windows [N, seq_len] of the files' tokens and the UTF-8 bytes they decode to."""
    ids: list[int] = []
    for path in files:
        ids.extend(tokenizer(Path(path).read_bytes().decode("utf-8", errors="replace"))["input_ids"])
        if len(ids) >= max_tokens:
            break
    ids = ids[:max_tokens - max_tokens % seq_len]
    return torch.tensor(ids).view(-1, seq_len), len(tokenizer.decode(ids).encode("utf-8"))


def build(kind: str, vocab: int, seed: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    if kind == "teacher":
        return MixtralForCausalLM(MixtralConfig(vocab_size=vocab, hidden_size=96, intermediate_size=128,
                                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=256,
                                                tie_word_embeddings=True))
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=48, intermediate_size=96, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                        tie_word_embeddings=True))


def train(model, data: torch.Tensor, steps: int, batch: int, seed: int, teacher_fn=None, lr: float = 3e-3,
          sparse_fn=None) -> float:
    """AdamW steps of CE (or 0.5 CE + 0.5 forward KL against `teacher_fn(rows)`, or 0.5 CE + 0.5
    sparse_kl against `sparse_fn(rows, x)` = (SparseTargets, tail mode)); seconds per step."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    model.train()
    start = time.process_time()
    for _ in range(steps):
        rows = torch.randint(0, len(data), (batch,), generator=g)
        x = data[rows]
        logits = model(input_ids=x).logits[:, :-1]
        if sparse_fn is not None:  # the module's SparseKD path: one kernel gives the KD and CE sums
            from kd_lightning.losses.sparse import SparseTargets
            targets, tail = sparse_fn(rows, x)
            rows_v = logits.reshape(-1, logits.shape[-1])
            flat = SparseTargets(targets.indices[:, :-1].reshape(-1, targets.indices.shape[-1]),
                                 targets.probs[:, :-1].reshape(-1, targets.probs.shape[-1]),
                                 None if targets.tail is None else targets.tail[:, :-1].reshape(-1))
            terms = fast_sparse_kd_terms(rows_v, flat, x[:, 1:].reshape(-1), temperature=1.0, ce=True, tail=tail or "bucket")
            count = rows_v.shape[0]
            loss = 0.5 * terms.ce_sum / count + 0.5 * terms.kd_sum / count
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            continue
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        if teacher_fn is not None:
            loss = 0.5 * loss + 0.5 * forward_kl(logits, teacher_fn(rows, x)[:, :-1])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return (time.process_time() - start) / max(steps, 1)


@torch.no_grad()
def nats_per_token(model, data: torch.Tensor) -> float:
    model.eval()
    total = 0.0
    for chunk in data.split(16):
        logits = model(input_ids=chunk).logits[:, :-1]
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1), reduction="sum"))
    return total / (data.shape[0] * (data.shape[1] - 1))


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 encodings, 1 seed, few steps, vocab 4000")
    parser.add_argument("--vocab", type=int, default=None, help="BPE vocabulary size (default 32000; quick 4000)")
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="student steps")
    parser.add_argument("--teacher-steps", type=int, default=None)
    parser.add_argument("--encodings", default=None,
                        help=f"comma-separated arms: {','.join(ENCODINGS)}; topk ones also with -bucket or -drop "
                             "(online always runs first)")
    parser.add_argument("--student-tokens", type=int, default=32768,
                        help="training tokens the students (and stores) use; the teacher trains on more")
    parser.add_argument("--out", default=None, help="work directory (tokenizer, teacher, stores, results.json)")
    args = parser.parse_args(argv)
    quick = args.quick
    vocab = args.vocab or (4000 if quick else 32000)
    seeds = range(args.seeds or (1 if quick else 3))
    steps, teacher_steps = args.steps or (8 if quick else 150), args.teacher_steps or (10 if quick else 400)
    batch, seq_len = 8, 128
    arms = tuple(a for a in args.encodings.split(",") if a != "online") if args.encodings else QUICK if quick else tuple(ENCODINGS)
    names = tuple(dict.fromkeys(arm(a)[0] for a in arms))  # the stores to fill
    out = Path(args.out or tempfile.mkdtemp(prefix="store_bench_"))
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)

    from kd_lightning.data.stdlib import stdlib_bpe_tokenizer
    from kd_lightning.data.stdlib import StdlibDataModule

    tokenizer = stdlib_bpe_tokenizer(out / "tokenizers", vocab)
    split = StdlibDataModule(val_fraction=0.05, test_fraction=0.05, seed=0)._split_files()
    train_data, _ = windows(tokenizer, split["train"], 60_000 if quick else 400_000, seq_len)
    val_data, val_bytes = windows(tokenizer, split["val"], 8_000 if quick else 60_000, seq_len)
    bytes_per_tok = val_bytes / val_data.numel()
    student_data = train_data[:max(args.student_tokens // seq_len, 1)]
    V = len(tokenizer)

    teacher_path = out / f"teacher-{V}-{teacher_steps}.pt"
    teacher = build("teacher", V, 0)
    if teacher_path.is_file():
        teacher.load_state_dict(torch.load(teacher_path, weights_only=True))
    else:
        train(teacher, train_data, teacher_steps, 16, 0, lr=3e-3)
        torch.save(teacher.state_dict(), teacher_path)
    teacher.eval().requires_grad_(False)
    results: dict = {"vocab": V, "bytes_per_token_text": bytes_per_tok, "steps": steps, "teacher_steps": teacher_steps,
                     "teacher_nats_per_byte": nats_per_token(teacher, val_data) / bytes_per_tok, "methods": {}}

    def online(rows, x):
        with torch.no_grad():
            return teacher(input_ids=x).logits

    stores = {}
    for name in names:  # fill each store once for every training window
        directory = out / f"store-{V}-{name}"
        identity = store_identity(weights=f"bench-{teacher_steps}", model_config=None, precision="32-true",
                                  accelerator="cpu", vocab_size=V, encoding=ENCODINGS[name])
        store = TeacherOutputStore(directory, identity, flush_rows=256)
        start, written = time.perf_counter(), 0
        for chunk in student_data.split(32):
            keys = row_keys(chunk, None)
            if store.missing(keys):
                with torch.no_grad():
                    logits = teacher(input_ids=chunk).logits
                t0 = time.perf_counter()
                store.put(keys, logits, 0.0)
                written += time.perf_counter() - t0
        store.flush()
        stores[name] = store
        results["methods"][name] = {"bytes_per_token": bytes_per_token(directory),
                                    "write_tokens_per_s": student_data.numel() / written if written else None}

    def from_store(store):
        def fn(rows, x):
            out = store.get(row_keys(x, None), x.shape[1])
            assert out is not None, "store misses a training window"
            return out
        return fn

    def sparse_from_store(store, tail):
        def fn(rows, x):
            out = store.targets(row_keys(x, None), x.shape[1], tail or "bucket")
            assert out is not None, "store misses a training window"
            return out, tail
        return fn

    ce_times, runs = [], {name: [] for name in ("online", *arms)}
    step_times: dict[str, list[float]] = {name: [] for name in runs}
    for seed in seeds:
        student = build("student", V, 100 + seed)
        ce_times.append(train(student, student_data, steps, batch, seed))
        results.setdefault("ce_only", []).append(nats_per_token(student, val_data) / bytes_per_tok)
        for name in runs:
            student = build("student", V, 100 + seed)
            if name == "online":
                step_times[name].append(train(student, student_data, steps, batch, seed, online))
            else:
                store_name, tail = arm(name)
                if ENCODINGS[store_name].encoding == "full":
                    step_times[name].append(train(student, student_data, steps, batch, seed, from_store(stores[store_name])))
                else:
                    step_times[name].append(train(student, student_data, steps, batch, seed,
                                                  sparse_fn=sparse_from_store(stores[store_name], tail)))
            runs[name].append(nats_per_token(student, val_data) / bytes_per_tok)
            print(f"seed {seed} {name:<18} {runs[name][-1]:.4f} nats/byte  {time.strftime('%H:%M:%S')}", flush=True)
            partial = {"seeds_started": seed + 1, "nats_per_byte": runs, "step_seconds": step_times, "ce_step_seconds": ce_times}
            (out / "partial.json").write_text(json.dumps({**results, **partial}, indent=2))  # a long run can be read early
    ce_step = statistics.mean(ce_times)
    ref = statistics.mean(runs["online"])
    print(f"\nvocab={V} text bytes/token={bytes_per_tok:.2f} teacher {results['teacher_nats_per_byte']:.3f} nats/byte, "
          f"CE-only student {statistics.mean(results['ce_only']):.4f}; {len(seeds)} seed(s) x {steps} steps of "
          f"{batch}x{seq_len} over {student_data.numel()} training tokens; CE-only step {1e3 * ce_step:.0f} ms")
    print(f"{'method':<18}{'bytes/token':>12}{'nats/byte':>11}{'vs online':>11}{'step/CE':>9}{'write tok/s':>13}")
    for name in runs:
        stored = results["methods"].get(arm(name)[0], {}) if name != "online" else {}
        entry = results["methods"].setdefault(name, {"bytes_per_token": stored.get("bytes_per_token"),
                                                     "write_tokens_per_s": stored.get("write_tokens_per_s")})
        entry.update(nats_per_byte=statistics.mean(runs[name]), per_seed=runs[name],
                     gap_to_online=statistics.mean(runs[name]) - ref, step_vs_ce=statistics.mean(step_times[name]) / ce_step)
        size = "-" if entry["bytes_per_token"] is None else f"{entry['bytes_per_token']:.0f}"
        write = "-" if not entry["write_tokens_per_s"] else f"{entry['write_tokens_per_s']:.0f}"
        print(f"{name:<18}{size:>12}{entry['nats_per_byte']:>11.4f}{entry['gap_to_online']:>+11.4f}"
              f"{entry['step_vs_ce']:>9.2f}{write:>13}")
    (out / "results.json").write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
