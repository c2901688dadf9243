"""Multi-teacher weighting strategies: callbacks that set `pl_module.teacher_weight_fn` in `setup`.

Every strategy maps per-example statistics to weights [B, K] whose rows sum to 1 (K = entries of
the aligned `teacher_logits`, i.e. teachers, or draws of a stochastic teacher). For LMs an example is
a sequence and its statistics are masked token means. The module logs the batch-mean weights as
`train/teacher_weight/<name>`. Static weighting needs no callback: equal weights are the default and
fixed ones are `distill.teacher_weights=[...]`.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from lightning import Callback, LightningModule, Trainer
from typing_extensions import override
from torch import Tensor, nn

from kd_lightning.interface import DistillationHost, require_distillation_module
from kd_lightning.losses.common import log_probs
from kd_lightning.tasks import IGNORE_INDEX
from kd_lightning.infra.distributed import rank_seeded_generator


def per_example_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of `values` [B, ...] over the counted positions of each example -> [B] (0 if none)."""
    batch = values.shape[0]
    weights = mask.reshape(batch, -1).to(values.dtype)
    return (values.reshape(batch, -1) * weights).sum(1) / weights.sum(1).clamp_min(1.0)


def cross_entropy_and_entropy(logits: Tensor, labels: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Per-example CE against the labels and entropy of softmax(logits), both at T = 1 -> ([B], [B])."""
    logp = log_probs(logits)
    token_ce = -logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    token_entropy = torch.special.entr(logp.exp()).sum(-1)
    return per_example_mean(token_ce, mask), per_example_mean(token_entropy, mask)


@torch.no_grad()
def example_statistics(teacher_logits: dict[str, Tensor], student_logits: Tensor, labels: Tensor,
                       mask: Tensor) -> dict[str, Tensor]:
    """`teacher_ce`, `teacher_entropy` [B, K]; `student_ce`, `student_entropy` [B] (aligned inputs)."""
    teachers = [cross_entropy_and_entropy(t, labels, mask) for t in teacher_logits.values()]
    student_ce, student_entropy = cross_entropy_and_entropy(student_logits, labels, mask)
    return {"teacher_ce": torch.stack([ce for ce, _ in teachers], -1),
            "teacher_entropy": torch.stack([h for _, h in teachers], -1),
            "student_ce": student_ce, "student_entropy": student_entropy}


def equal_weights(like: Tensor) -> Tensor:
    return torch.full_like(like, 1.0 / like.shape[-1])


class TeacherWeighting(Callback):
    """Base: installs itself as the module's `teacher_weight_fn`; subclasses define `weights`."""

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        module = require_distillation_module(pl_module, self)
        current = module.teacher_weight_fn
        if current is not None and current is not self:
            raise ValueError(f"{type(self).__name__}: the module's teacher_weight_fn is already set by "
                             f"{type(current).__name__}; choose one teacher-weighting callback")
        if len(module.teachers) == 0:
            raise ValueError(f"{type(self).__name__} needs teachers to weight (teacher=ensemble)")
        module.teacher_weight_fn = self

    def __call__(self, teacher_logits: dict[str, Tensor], student_logits: Tensor, labels: Tensor,
                 mask: Tensor) -> Tensor:
        stats = example_statistics(teacher_logits, student_logits, labels, mask)
        with torch.no_grad():
            return self.weights(stats)

    def weights(self, stats: dict[str, Tensor]) -> Tensor:
        raise NotImplementedError


class ConfidenceWeighting(TeacherWeighting):
    """Entropy-based weighting (EBKD, as in the CA-MKD code), normalised to sum 1:
    w_k = (1 − H_k / Σ_j H_j) / (K − 1), H_k the teacher's mean predictive entropy on the example;
    more confident (lower-entropy) teachers get more weight. Equal weights when Σ_j H_j = 0."""

    @override
    def weights(self, stats: dict[str, Tensor]) -> Tensor:
        entropy = stats["teacher_entropy"]
        k = entropy.shape[-1]
        if k == 1:
            return torch.ones_like(entropy)
        total = entropy.sum(-1, keepdim=True)
        weights = (1.0 - entropy / total.clamp_min(1e-12)) / (k - 1)
        return torch.where(total > 0, weights, equal_weights(entropy))


class CAMKDWeighting(TeacherWeighting):
    """CA-MKD ("Confidence-Aware Multi-Teacher Knowledge Distillation", Zhang, Chen, Wang, ICASSP
    2022): w_k = (1 − softmax_k(CE_k)) / (K − 1), CE_k the teacher's cross-entropy against the
    labels on the example; a teacher that is wrong gets less weight (K = 2: softmax(−CE))."""

    @override
    def weights(self, stats: dict[str, Tensor]) -> Tensor:
        ce = stats["teacher_ce"]
        k = ce.shape[-1]
        if k == 1:
            return torch.ones_like(ce)
        return (1.0 - torch.softmax(ce, dim=-1)) / (k - 1)


class PerformanceGapWeighting(TeacherWeighting):
    """Performance-gap filtering after ClassroomKD's knowledge filtering ("Classroom-Inspired
    Multi-Mentor Distillation with Adaptive Learning Strategies", Sarode et al.) — our design, the
    paper's formulas were not available: teachers with CE_k ≥ CE_student − margin on the example are
    dropped; the rest get softmax(−CE_k / temperature). When no teacher beats the student,
    `fallback="equal"` (default) gives equal weights, `"softmax"` softmax(−CE/temperature) over all.
    (A CE-only fallback would need rows of zeros, which the weight contract excludes.)"""

    def __init__(self, temperature: float = 1.0, margin: float = 0.0, fallback: str = "equal") -> None:
        if temperature <= 0:
            raise ValueError(f"PerformanceGapWeighting: temperature={temperature!r} must be > 0")
        if fallback not in ("equal", "softmax"):
            raise ValueError(f"PerformanceGapWeighting: fallback={fallback!r} must be 'equal' or 'softmax'")
        self.temperature, self.margin, self.fallback = float(temperature), float(margin), fallback

    @override
    def weights(self, stats: dict[str, Tensor]) -> Tensor:
        ce = stats["teacher_ce"]
        active = ce < (stats["student_ce"] - self.margin).unsqueeze(-1)
        scores = -ce / self.temperature
        filtered = torch.softmax(scores.masked_fill(~active, float("-inf")), dim=-1)
        fallback = equal_weights(ce) if self.fallback == "equal" else torch.softmax(scores, dim=-1)
        return torch.where(active.any(-1, keepdim=True), filtered, fallback)


class ReinforcedWeighting(TeacherWeighting):
    """Reinforced teacher selection after "Reinforced Multi-Teacher Selection for Knowledge
    Distillation" (Yuan et al., AAAI 2021); the details are our design.

    For every example i and teacher k a state s_ik = [CE_k, H_k, CE_S, H_S, CE_k − CE_S] (teacher and
    student cross-entropy and entropy) feeds a policy π_ik = σ(w·s_ik + b) shared by all teachers;
    each teacher is selected with a_ik ~ Bernoulli(π_ik) (seeded torch generator, offset per rank) and
    the weights are the selected teachers averaged (all teachers when none is selected). After the
    optimizer step the reward r_i = CE_S before − CE_S after on the same example (the student's
    improvement on the batch) updates the policy by REINFORCE with a moving-average baseline b̄:
    loss = −mean_i (r_i − b̄) Σ_k log π(a_ik | s_ik). Costs one extra student forward per step.
    Policy, its optimizer, the baseline and the generator state are in `state_dict`.
    """

    num_features = 5

    def __init__(self, lr: float = 1e-2, baseline_momentum: float = 0.9, init_select_logit: float = 2.0,
                 seed: int | None = None) -> None:
        if lr <= 0:
            raise ValueError(f"ReinforcedWeighting: lr={lr!r} must be > 0")
        if not 0.0 <= baseline_momentum < 1.0:
            raise ValueError(f"ReinforcedWeighting: baseline_momentum={baseline_momentum!r} must be in [0, 1)")
        self.policy = nn.Linear(self.num_features, 1)
        nn.init.zeros_(self.policy.weight)
        nn.init.constant_(self.policy.bias, float(init_select_logit))
        self.optimizer = torch.optim.Adam(self.policy.parameters(), lr=float(lr))
        self.baseline_momentum = float(baseline_momentum)
        self.baseline: float | None = None
        self.updates = 0
        self.seed = int(torch.initial_seed() if seed is None else seed) % (2**63)
        self.generator: torch.Generator | None = None
        self._generator_state: Tensor | None = None
        self._pending: tuple[Tensor, Tensor, Tensor] | None = None

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self.policy.to(pl_module.device)

    def features(self, stats: dict[str, Tensor]) -> Tensor:
        ce, entropy = stats["teacher_ce"], stats["teacher_entropy"]
        student_ce = stats["student_ce"].unsqueeze(-1).expand_as(ce)
        student_entropy = stats["student_entropy"].unsqueeze(-1).expand_as(ce)
        return torch.stack([ce, entropy, student_ce, student_entropy, ce - student_ce], -1).float()  # [B, K, F]

    def selection_probs(self, states: Tensor) -> Tensor:
        return torch.sigmoid(self.policy(states.to(self.policy.weight.device)).squeeze(-1))

    def _generator(self, device: torch.device) -> torch.Generator:
        if self.generator is None or self.generator.device != device:
            self.generator = rank_seeded_generator(self.seed, device)
            if self._generator_state is not None:
                self.generator.set_state(self._generator_state)
                self._generator_state = None
        return self.generator

    @override
    def weights(self, stats: dict[str, Tensor]) -> Tensor:
        states = self.features(stats)
        probs = self.selection_probs(states)
        actions = torch.bernoulli(probs, generator=self._generator(probs.device))
        count = actions.sum(-1, keepdim=True)
        weights = torch.where(count > 0, actions / count.clamp_min(1.0), equal_weights(actions))
        self._pending = (states.detach(), actions.detach(), stats["student_ce"].detach())
        return weights

    def update(self, states: Tensor, actions: Tensor, reward: Tensor,
               reduce: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        """One REINFORCE step on a batch of (state [B, K, F], action [B, K], reward [B]); returns the
        policy loss. `reduce` averages gradients over DDP ranks so that their policies stay equal."""
        reward = reward.float().to(self.policy.weight.device)
        if self.baseline is None:
            self.baseline = float(reward.mean())
        advantage = reward - self.baseline
        with torch.enable_grad():
            logits = self.policy(states.to(self.policy.weight.device)).squeeze(-1)
            neg_log_prob = F.binary_cross_entropy_with_logits(logits, actions.to(logits), reduction="none")
            loss = (advantage.unsqueeze(-1) * neg_log_prob).sum(-1).mean()
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        if reduce is not None:
            for p in self.policy.parameters():
                if p.grad is not None:
                    p.grad = reduce(p.grad)
        self.optimizer.step()
        m = self.baseline_momentum
        self.baseline = m * self.baseline + (1.0 - m) * float(reward.mean())
        self.updates += 1
        return loss.detach()

    @torch.no_grad()
    def student_ce(self, module: DistillationHost, batch: dict[str, Tensor]) -> Tensor:
        logits, labels = module.align(module.student_logits(batch), batch["labels"])
        mask = labels != IGNORE_INDEX
        token_ce = -log_probs(logits).gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        return per_example_mean(token_ce, mask)

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._pending is None:
            return
        states, actions, before = self._pending
        self._pending = None
        reward = before - self.student_ce(pl_module, batch)
        self.update(states, actions, reward, lambda grad: trainer.strategy.reduce(grad, reduce_op="mean"))
        pl_module.log("train/policy_reward", reward.mean(), on_step=True, on_epoch=False)
        pl_module.log("train/policy_baseline", float(self.baseline), on_step=True, on_epoch=False)

    @override
    def state_dict(self) -> dict[str, Any]:
        generator_state = self.generator.get_state() if self.generator is not None else self._generator_state
        return {"policy": {k: v.detach().cpu() for k, v in self.policy.state_dict().items()},
                "optimizer": self.optimizer.state_dict(), "baseline": self.baseline, "updates": self.updates,
                "seed": self.seed, "generator": generator_state}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.policy.load_state_dict(state_dict["policy"])
        self.optimizer.load_state_dict(state_dict["optimizer"])
        self.baseline = state_dict["baseline"]
        self.updates = int(state_dict["updates"])
        self.seed = int(state_dict["seed"])
        self.generator = None
        self._generator_state = state_dict["generator"]
