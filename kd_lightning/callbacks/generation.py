"""Training on the student's own outputs: GKD-style on-policy batches and DistiLLM's adaptive
off-policy replay. Both replace the batch in `on_train_batch_start` (in place); the module's normal
step then scores the new sequences with the teacher.

Randomness: each callback owns a seeded `torch.Generator` (seed + global rank, so DDP ranks differ)
that decides every step and seeds each `generate` call inside `torch.random.fork_rng`, so sampling
neither depends on nor disturbs the global RNG (dropout, shuffling).
"""

from __future__ import annotations

import math
import time
from collections import deque
from typing import Any

import torch
from lightning import Callback, LightningModule, Trainer
from typing_extensions import override
from torch import Tensor, nn

from kd_lightning.callbacks.common import total_steps
from kd_lightning.data.step_tokens import STEP_TOKENS_KEY
from kd_lightning.infra.distributed import all_reduce_sums, rank_seed
from kd_lightning.interface import require_distillation_module
from kd_lightning.infra.sharding import ShardedDataParallel
from kd_lightning.tasks import IGNORE_INDEX



def special_ids(model: nn.Module) -> tuple[int, list[int]]:
    """(pad id, EOS ids) from the model's generation config, falling back to its config."""
    sources = [getattr(model, "generation_config", None), getattr(model, "config", None)]
    eos = next((s.eos_token_id for s in sources if s is not None and getattr(s, "eos_token_id", None) is not None), None)
    eos_ids = [] if eos is None else [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]
    pad = next((s.pad_token_id for s in sources if s is not None and getattr(s, "pad_token_id", None) is not None), None)
    return int(pad if pad is not None else (eos_ids[0] if eos_ids else 0)), eos_ids


def prompt_lengths_of(batch: dict[str, Tensor], prompt_length: int) -> Tensor:
    """Prompt length per row [B]: the batch's `prompt_lengths` (prompt/response data, rows
    right-padded), or `prompt_length` tokens when it has none or they are all 0 (packed corpus).
    At least 1 (generation needs context) and at most the row's real length."""
    ids = batch["input_ids"]
    real = batch["attention_mask"].sum(-1) if "attention_mask" in batch else torch.full_like(ids[:, 0], ids.shape[1])
    given = batch.get("prompt_lengths")
    if given is None or not bool((given > 0).any()):
        given = torch.full_like(real, prompt_length)
    return torch.minimum(given.to(real), real).clamp(min=1)


@torch.no_grad()
def sample_from_student(student: nn.Module, batch: dict[str, Tensor], *, prompt_length: int,
                        max_new_tokens: int | None, sampling_temperature: float, seed: int,
                        synced: bool = False) -> dict[str, Tensor]:
    """Keep each row's prompt, replace the rest by the student's own sample (ancestral sampling,
    top-k 0, top-p 1). Returns right-padded `input_ids`, `attention_mask`, `labels` (-100 on the
    prompt and after the first EOS, which itself counts) and `prompt_lengths`, no wider than the
    input (new tokens are cut at the original length L).

    `synced` (a sharded student, `strategy=fsdp`: each forward is a collective): every process calls
    `generate` with `synced_gpus=True`, so one that is done keeps stepping until all are, and a
    process with nothing to generate still takes part (its samples are discarded)."""
    ids = batch["input_ids"]
    B, L = ids.shape
    lengths = prompt_lengths_of(batch, prompt_length)  # [B]
    pad_id, eos_ids = special_ids(student)
    P = int(lengths.max())
    # Left-pad the prompts so that every row continues at the same position.
    source = torch.arange(P, device=ids.device)[None] - (P - lengths)[:, None]  # [B, P]
    in_prompt = source >= 0
    prompts = torch.where(in_prompt, ids.gather(1, source.clamp(min=0)), pad_id)
    budget = L - int(lengths.min())
    new_tokens = budget if max_new_tokens is None else min(int(max_new_tokens), budget)
    generated = ids.new_zeros((B, 0))
    anyone = int(all_reduce_sums([float(new_tokens)])[0]) if synced else new_tokens
    if anyone > 0:
        was_training = student.training
        student.eval()
        devices = [ids.device.index or 0] if ids.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed)
                out = student.generate(input_ids=prompts, attention_mask=in_prompt.long(), do_sample=True,
                                       temperature=sampling_temperature, top_k=0, top_p=1.0,
                                       max_new_tokens=max(new_tokens, 1), pad_token_id=pad_id,
                                       eos_token_id=eos_ids or None, synced_gpus=synced)
        finally:
            student.train(was_training)
        generated = out[:, P:P + new_tokens]  # [B, n]
    is_eos = torch.isin(generated, torch.tensor(eos_ids, device=ids.device, dtype=ids.dtype))
    kept = ((is_eos.long().cumsum(-1) - is_eos.long()) == 0).sum(-1)  # up to and including the first EOS
    total = (lengths + kept).clamp(max=L)  # [B]
    width = int(total.max())
    column = torch.arange(width, device=ids.device)[None]  # [1, W]
    from_prompt = column < lengths[:, None]
    real = column < total[:, None]
    if generated.shape[1] > 0:
        gen_index = (column - lengths[:, None]).clamp(0, generated.shape[1] - 1)
        tokens = torch.where(from_prompt, ids[:, :width], generated.gather(1, gen_index.expand(B, -1)))
    else:
        tokens = ids[:, :width]
    tokens = torch.where(real, tokens, pad_id)
    return {"input_ids": tokens, "attention_mask": real.long(), "lengths": total,
            "labels": torch.where(real & ~from_prompt, tokens, IGNORE_INDEX), "prompt_lengths": lengths}


def replace_batch(batch: dict[str, Tensor], new: dict[str, Tensor]) -> None:
    """Swap the sequence entries of `batch` in place (the Trainer keeps using the same dict)."""
    for key in ("input_ids", "attention_mask", "labels", "prompt_lengths"):
        batch[key] = new[key].to(batch["input_ids"].device)
    # Generated labels count other tokens than the loader stamped for the step: such a batch keeps
    # its own token mean (kd_lightning.data.step_tokens).
    batch.pop(STEP_TOKENS_KEY, None)


class _StudentSampler(Callback):
    """What both generation callbacks share: argument checks, a rank-aware seeded generator that
    round-trips through checkpoints, and timed sampling from the student."""

    generates_inputs = True  # the teacher sees new sequences: teacher_outputs.reuse is off

    def __init__(self, *, max_new_tokens: int | None, sampling_temperature: float, prompt_length: int,
                 seed: int) -> None:
        name = type(self).__name__
        if max_new_tokens is not None and (isinstance(max_new_tokens, bool) or int(max_new_tokens) < 1):
            raise ValueError(f"{name}: max_new_tokens={max_new_tokens!r} must be a positive integer (or null)")
        if not (math.isfinite(sampling_temperature) and sampling_temperature > 0):
            raise ValueError(f"{name}: sampling_temperature={sampling_temperature!r} must be > 0")
        if isinstance(prompt_length, bool) or int(prompt_length) < 1:
            raise ValueError(f"{name}: prompt_length={prompt_length!r} must be a positive integer")
        self.max_new_tokens = None if max_new_tokens is None else int(max_new_tokens)
        self.sampling_temperature = float(sampling_temperature)
        self.prompt_length, self.seed = int(prompt_length), int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)
        self.restored = False
        self.synced = False
        self._broadcast: Any = None

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        module = require_distillation_module(pl_module, self)
        # strategy=fsdp: generating is a collective (every forward gathers weights), so every process
        # must make the same choice each step (rank 0's) and generate in lockstep
        self.synced = isinstance(trainer.strategy, ShardedDataParallel) and trainer.world_size > 1
        self._broadcast = trainer.strategy.broadcast if self.synced else None
        if module.task != "causal_lm" or not hasattr(module.student, "generate"):
            raise ValueError(f"{type(self).__name__} needs a causal LM student with `generate` (task causal_lm), "
                             f"got task {module.task!r}")
        if not self.restored:
            self.generator.manual_seed(rank_seed(self.seed, trainer.global_rank))

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # A checkpoint holds rank 0's generator; other ranks branch off it so they stay distinct.
        if self.restored and trainer.global_rank > 0:
            offset = int(torch.randint(2**62, (), generator=self.generator))
            self.generator.manual_seed(rank_seed(offset, trainer.global_rank))

    def uniform(self) -> float:
        return float(torch.rand((), generator=self.generator))

    def agreed(self, choice: Any) -> Any:
        """This process's `choice`, or rank 0's when generation is synced (`strategy=fsdp`)."""
        return self._broadcast(choice, 0) if self.synced else choice

    def sample(self, pl_module: LightningModule, batch: dict[str, Tensor]) -> tuple[dict[str, Tensor], float]:
        """Student samples for the batch's prompts and the seconds it took."""
        start = time.perf_counter()
        new = sample_from_student(pl_module.student, batch, prompt_length=self.prompt_length,
                                  max_new_tokens=self.max_new_tokens, sampling_temperature=self.sampling_temperature,
                                  seed=int(torch.randint(2**62, (), generator=self.generator)), synced=self.synced)
        return new, time.perf_counter() - start

    def log_step(self, pl_module: LightningModule, batch_size: int, **values: float) -> None:
        for key, value in values.items():
            pl_module.log(f"train/{key}", float(value), on_step=True, on_epoch=False, batch_size=batch_size)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.generator.set_state(state_dict["generator"])
        self.restored = True


class OnPolicyGeneration(_StudentSampler):
    """GKD-style on-policy distillation ("On-Policy Distillation of Language Models: Learning from
    Self-Generated Mistakes", Agarwal et al., ICLR 2024): with probability `lambda_on_policy` per
    step, the batch's responses are replaced by the student's own samples for the same prompts.

    Prompts are the rows' `prompt_lengths` (prompt/response data) or the first `prompt_length`
    tokens of each window (packed corpus). Logs `train/on_policy` (1/0) and
    `train/generation_seconds`.

    Args:
        lambda_on_policy: probability λ of an on-policy step (GKD default 0.5).
        max_new_tokens: most tokens sampled per row (also capped by the batch's sequence length).
        sampling_temperature: generation temperature (GKD default 0.9), not the KD temperature.
        prompt_length: prompt tokens taken from each window of data without prompts.
        seed: base seed; rank r uses seed + r.
    """

    def __init__(self, lambda_on_policy: float = 0.5, max_new_tokens: int | None = 32,
                 sampling_temperature: float = 0.9, prompt_length: int = 32, seed: int = 0) -> None:
        super().__init__(max_new_tokens=max_new_tokens, sampling_temperature=sampling_temperature,
                         prompt_length=prompt_length, seed=seed)
        if not 0.0 <= lambda_on_policy <= 1.0:
            raise ValueError(f"OnPolicyGeneration: lambda_on_policy={lambda_on_policy!r} must be in [0, 1]")
        self.lambda_on_policy = float(lambda_on_policy)

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        on_policy = self.agreed(self.uniform() < self.lambda_on_policy)
        seconds = 0.0
        if on_policy:
            new, seconds = self.sample(pl_module, batch)
            replace_batch(batch, new)
        self.log_step(pl_module, batch["input_ids"].shape[0], on_policy=on_policy, generation_seconds=seconds)


REPLAY_RATIOS = ("decreasing", "increasing", "constant")
DATASET, FRESH, REPLAY = 0, 1, 2


class DistillmOffPolicy(_StudentSampler):
    """DistiLLM's adaptive off-policy student-generated outputs ("DistiLLM: Towards Streamlined
    Distillation for Large Language Models", Ko et al., ICML 2024), control flow of its code:

        samp = θ·(1 − s/S) ("decreasing") | θ·s/S ("increasing") | θ/2 ("constant");  r ~ U(0, 1)
        r < samp or (r < θ and buffer not full): fresh student samples, pushed to the buffer
        r < θ:                                   a uniform sample (no repeats) of the replay buffer
        otherwise:                               the dataset batch
        after each validation: if val/student_loss ≥ prev + loss_eps: θ ← min(θ + 0.1, 1), prev ← loss

    `prev` is set by the first validation (as TAID's port; the reference measures it before
    training) and otherwise changes only when θ rises. The buffer is a FIFO of at most `capacity`
    sequences on the CPU, saved in checkpoints.

    With the reference default `init_threshold=0` nothing is generated until validation loss rises
    by `loss_eps`, which on a healthy run may never happen; that is the paper's adaptive design.
    Start above 0 to always train partly on student outputs.

    Logs `train/student_data` (0 dataset, 1 fresh, 2 replay), `train/offpolicy_threshold`,
    `train/replay_buffer_size`, `train/generation_seconds`.

    Args:
        init_threshold: initial θ in [0, 1].
        capacity: replay buffer size in sequences (reference 1000).
        loss_eps: validation-loss increase that raises θ (reference 0.1).
        replay_ratio: "decreasing" (reference default), "increasing" or "constant".
        max_new_tokens: most tokens sampled per row; null fills each row up to the batch's length.
        sampling_temperature: generation temperature (reference 1.0).
        prompt_length: prompt tokens taken from each window of data without prompts.
        seed: base seed; rank r uses seed + r.
    """

    THRESHOLD_STEP = 0.1

    def __init__(self, init_threshold: float = 0.0, capacity: int = 1000, loss_eps: float = 0.1,
                 replay_ratio: str = "decreasing", max_new_tokens: int | None = None,
                 sampling_temperature: float = 1.0, prompt_length: int = 32, seed: int = 0) -> None:
        super().__init__(max_new_tokens=max_new_tokens, sampling_temperature=sampling_temperature,
                         prompt_length=prompt_length, seed=seed)
        if not 0.0 <= init_threshold <= 1.0:
            raise ValueError(f"DistillmOffPolicy: init_threshold={init_threshold!r} must be in [0, 1]")
        if isinstance(capacity, bool) or int(capacity) < 1:
            raise ValueError(f"DistillmOffPolicy: capacity={capacity!r} must be a positive integer")
        if not loss_eps >= 0:
            raise ValueError(f"DistillmOffPolicy: loss_eps={loss_eps!r} must be >= 0")
        if replay_ratio not in REPLAY_RATIOS:
            raise ValueError(f"DistillmOffPolicy: replay_ratio={replay_ratio!r} must be one of {REPLAY_RATIOS}")
        self.threshold, self.capacity = float(init_threshold), int(capacity)
        self.loss_eps, self.replay_ratio = float(loss_eps), replay_ratio
        self.prev_val_loss: float | None = None
        self.buffer: deque[dict[str, Tensor]] = deque(maxlen=self.capacity)
        self.pad_id = 0

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self.pad_id = special_ids(pl_module.student)[0]

    def fresh_fraction(self, step: int, total: int) -> float:
        if self.replay_ratio == "decreasing":
            return self.threshold * (1.0 - step / total)
        if self.replay_ratio == "increasing":
            return self.threshold * step / total
        return 0.5 * self.threshold

    def choose(self, step: int, total: int) -> int:
        """DATASET, FRESH or REPLAY for this step (one uniform draw)."""
        r = self.uniform()
        if r < self.fresh_fraction(step, total) or (r < self.threshold and len(self.buffer) < self.capacity):
            return FRESH
        return REPLAY if r < self.threshold else DATASET

    def push(self, new: dict[str, Tensor]) -> None:
        for row, length in enumerate(new["lengths"].tolist()):
            self.buffer.append({"input_ids": new["input_ids"][row, :length].cpu().clone(),
                                "labels": new["labels"][row, :length].cpu().clone(),
                                "prompt_lengths": new["prompt_lengths"][row].cpu().clone()})

    def replay(self, batch_size: int) -> dict[str, Tensor]:
        """Up to `batch_size` distinct buffer entries, right-padded into a batch."""
        picks = torch.randperm(len(self.buffer), generator=self.generator)[:batch_size].tolist()
        rows = [self.buffer[i] for i in picks]
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n], labels[i, :n], mask[i, :n] = r["input_ids"], r["labels"], 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels,
                "prompt_lengths": torch.stack([r["prompt_lengths"] for r in rows])}

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        source = self.agreed(self.choose(trainer.global_step, total_steps(trainer)))
        seconds = 0.0
        if source == FRESH:
            new, seconds = self.sample(pl_module, batch)
            self.push(new)
            replace_batch(batch, new)
        elif source == REPLAY:
            replace_batch(batch, self.replay(batch["input_ids"].shape[0]))
        self.log_step(pl_module, batch["input_ids"].shape[0], student_data=source, generation_seconds=seconds,
                      offpolicy_threshold=self.threshold, replay_buffer_size=len(self.buffer))

    def update_threshold(self, val_loss: float) -> None:
        if self.prev_val_loss is None:
            self.prev_val_loss = val_loss
        elif val_loss >= self.prev_val_loss + self.loss_eps:
            self.threshold = min(self.threshold + self.THRESHOLD_STEP, 1.0)
            self.prev_val_loss = val_loss

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        val_loss = trainer.callback_metrics.get("val/student_loss")
        if not trainer.sanity_checking and val_loss is not None:
            self.update_threshold(float(val_loss))

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "threshold": self.threshold, "prev_val_loss": self.prev_val_loss,
                "buffer": list(self.buffer)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.threshold = float(state_dict["threshold"])
        self.prev_val_loss = state_dict["prev_val_loss"]
        self.buffer = deque(state_dict["buffer"][-self.capacity:], maxlen=self.capacity)
