"""Mixture-of-Experts teachers: router discovery and Knowledge Augmentation (KA).

From "Every Expert Matters: Towards Effective Knowledge Distillation for Mixture-of-Experts Language
Models" (Kim, Chu, Yang, 2025). In `transformers` Mixtral, Qwen2-MoE and OLMoE (and their
relatives) every MoE layer's `mlp.gate` is a router module with integer `top_k` and `num_experts`
and a forward `hidden [N, H] -> (router_logits [N, E], routing_weights [N, k], expert_index [N, k])`;
the experts consume only the last two, so a forward hook that replaces them changes the routing
without touching the fused expert weights.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from kd_lightning.infra.distributed import rank_seeded_generator

RouterOutput = tuple[Tensor, Tensor, Tensor]


def is_router(name: str, module: nn.Module) -> bool:
    """A router gate: named `gate`/`router`, with integer `top_k` and `num_experts`."""
    leaf = name.rsplit(".", 1)[-1]
    return (leaf in ("gate", "router") and isinstance(getattr(module, "top_k", None), int)
            and isinstance(getattr(module, "num_experts", None), int))


def find_router_gates(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every MoE layer's router gate as `(qualified name, module)`, in layer order.

    Raises a ValueError naming the model class when none is found (e.g. a dense model)."""
    gates = [(name, module) for name, module in model.named_modules() if is_router(name, module)]
    if not gates:
        raise ValueError(
            f"no MoE router gates found in {type(model).__name__}: expected each MoE layer's `mlp.gate` "
            "router with integer `top_k` and `num_experts` (Mixtral / Qwen2-MoE / OLMoE-style transformers "
            "models); KA and SAR need a Mixture-of-Experts teacher"
        )
    return gates


def router_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of every router gate (the only teacher weights SAR trains)."""
    return [p for _, gate in find_router_gates(model) for p in gate.parameters()]


def set_router_top_k(model: nn.Module, top_k: int | None) -> list[int]:
    """Set `top_k` on every router (None: all experts); returns the previous values. Setting
    `config.num_experts_per_tok` after loading has no effect, the router's own `top_k` does."""
    previous = []
    for _, gate in find_router_gates(model):
        previous.append(gate.top_k)
        gate.top_k = gate.num_experts if top_k is None else min(int(top_k), gate.num_experts)
    return previous


def normalises_top_k(gate: nn.Module) -> bool:
    """Whether the router renormalises the selected weights to sum 1 (Mixtral always does; Qwen2-MoE
    and OLMoE follow `norm_topk_prob`)."""
    return bool(getattr(gate, "norm_topk_prob", True))


def sample_routes(router_logits: Tensor, k: int, sampling_prob: float, router_temperature: float,
                  generator: torch.Generator, normalise: bool = True) -> tuple[Tensor, Tensor]:
    """KA routing for tokens [N, E]: each token, with probability `sampling_prob` (one Bernoulli per
    token shared by its k slots), takes k experts drawn without replacement from
    softmax(logits / router_temperature); otherwise the greedy top-k. Weights are the router's
    softmax(logits) at the chosen experts, renormalised over them when the model does so.
    Returns (weights [N, k] float32, expert index [N, k])."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    greedy = probs.topk(k, dim=-1).indices
    sampling = torch.softmax(router_logits.float() / router_temperature, dim=-1)
    # multinomial without replacement needs k non-zero entries; an underflowed expert stays (almost) never chosen
    sampling = sampling.clamp_min(torch.finfo(torch.float32).tiny)
    drawn = torch.multinomial(sampling, k, replacement=False, generator=generator)
    coin = torch.rand(router_logits.shape[0], device=router_logits.device, generator=generator) < sampling_prob
    index = torch.where(coin.unsqueeze(-1), drawn, greedy)
    weights = probs.gather(-1, index)
    if normalise:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights, index


class KnowledgeAugmentedMoE(nn.Module):
    """A MoE teacher whose routing is stochastic: Knowledge Augmentation (KA), §3 of "Every Expert
    Matters: Towards Effective Knowledge Distillation for Mixture-of-Experts Language Models".

    In every forward pass each token, with probability `sampling_prob` (λ), routes to
    `num_selects` experts sampled without replacement from softmax(router_logits /
    router_temperature) instead of the greedy top-k; the selected routing weights are renormalised
    as the model does. `num_samples` (M) tells `DistillationModule` to run the teacher M times per
    step, so with `distill.teacher_combine=losses` the KD term is (1/M) Σ_r D(q ‖ p^(r)).

    Randomness comes from a torch.Generator per device seeded with `seed` (None: the torch seed in
    effect when the wrapper is built, i.e. the run's `seed`) plus an offset per DDP rank.
    The wrapped model keeps its interface: `forward(input_ids=..., attention_mask=...)` returns
    the model's output (with `.logits`); other attributes (`config`, `generate`, ...) pass through.

    Args:
        model: a transformers MoE causal LM (Mixtral, Qwen2-MoE, OLMoE, ...).
        num_samples: M, teacher passes per training step (paper: 2 best of 1..32).
        sampling_prob: λ, per-token probability of sampled routing (paper: 0.05).
        num_selects: experts per token, for sampled and greedy routes alike (None: the model's
            top-k; the paper's code uses 15 of 16 / 7 of 8).
        router_temperature: temperature of the sampling distribution only (weights use T = 1).
        seed: base seed of the generator.
    """

    stochastic = True  # a new routing draw every pass: its outputs are never memoized (teacher_outputs)

    def __init__(self, model: nn.Module, num_samples: int = 2, sampling_prob: float = 0.05,
                 num_selects: int | None = None, router_temperature: float = 1.0, seed: int | None = None) -> None:
        super().__init__()
        if int(num_samples) < 1:
            raise ValueError(f"KnowledgeAugmentedMoE: num_samples={num_samples!r} must be >= 1")
        if not 0.0 <= float(sampling_prob) <= 1.0:
            raise ValueError(f"KnowledgeAugmentedMoE: sampling_prob={sampling_prob!r} must be in [0, 1]")
        if router_temperature <= 0:
            raise ValueError(f"KnowledgeAugmentedMoE: router_temperature={router_temperature!r} must be > 0")
        self.model = model
        self.gates = find_router_gates(model)  # fails clearly on a dense model
        fewest = min(gate.num_experts for _, gate in self.gates)
        if num_selects is not None and not 1 <= num_selects <= fewest:
            raise ValueError(f"KnowledgeAugmentedMoE: num_selects={num_selects} must be in [1, {fewest}]")
        self.num_samples = int(num_samples)
        self.sampling_prob = float(sampling_prob)
        self.num_selects = None if num_selects is None else int(num_selects)
        self.router_temperature = float(router_temperature)
        self.seed = int(torch.initial_seed() if seed is None else seed) % (2**63)
        self.enabled = True
        self._generators: dict[str, torch.Generator] = {}
        self._hooks = [gate.register_forward_hook(self._reroute) for _, gate in self.gates]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("model"), name)

    def generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self._generators:
            self._generators[key] = rank_seeded_generator(self.seed, device)
        return self._generators[key]

    @contextmanager
    def greedy(self) -> Iterator[None]:
        """Route as the plain model does (e.g. to compare with the augmented teacher)."""
        enabled, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = enabled

    def _reroute(self, gate: nn.Module, inputs: tuple[Any, ...], output: Any) -> RouterOutput | None:
        if not self.enabled:
            return None
        if not (isinstance(output, tuple) and len(output) == 3):
            raise TypeError(f"KnowledgeAugmentedMoE: router {type(gate).__name__} returned {type(output).__name__}; "
                            "expected (router_logits, routing_weights, expert_index)")
        router_logits, weights, _ = output
        k = self.num_selects or gate.top_k
        new_weights, index = sample_routes(router_logits, k, self.sampling_prob, self.router_temperature,
                                           self.generator(router_logits.device), normalises_top_k(gate))
        return router_logits, new_weights.to(weights.dtype), index

    def extra_repr(self) -> str:
        return (f"num_samples={self.num_samples}, sampling_prob={self.sampling_prob}, num_selects={self.num_selects}, "
                f"router_temperature={self.router_temperature}, routers={len(self.gates)}")
