"""Student-Aware Router (SAR): train the MoE teacher's routers towards the student.

From "Every Expert Matters: Towards Effective Knowledge Distillation for Mixture-of-Experts Language
Models" (Kim, Chu, Yang, 2025), §3: every expert contributes (top-k = number of experts on every
router) and, before each student step, one router step lowers

    L_router = KL(p_T ‖ q_S) + balance_weight · Σ_layers CV²(importance)

with the student's logits detached and the gradient reaching only the routers' parameters; the
experts and every other teacher weight stay frozen (bit-identical).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from lightning import Callback, LightningModule, Trainer
from typing_extensions import override
from torch import Tensor, nn

from kd_lightning.interface import DistillationHost, require_distillation_module
from kd_lightning.losses.common import kl_sum, log_probs
from kd_lightning.tasks import IGNORE_INDEX
from kd_lightning.teachers.moe import find_router_gates, router_parameters, set_router_top_k


def coefficient_of_variation_squared(x: Tensor, eps: float = 1e-10) -> Tensor:
    """CV² = variance / mean² (the LLaMA-MoE gate's balance statistic; 0 for a perfectly even x)."""
    x = x.float()
    return x.var() / (x.mean() ** 2 + eps)


def importance_balance_loss(router_logits: list[Tensor], token_mask: Tensor | None) -> Tensor:
    """Σ over MoE layers of CV² of the expert importance (summed routing probability over the
    counted tokens). With every expert active the load term of the paper's balance loss is
    constant, so only the importance term remains."""
    total = router_logits[0].new_zeros((), dtype=torch.float32)
    for logits in router_logits:
        probs = torch.softmax(logits.float(), dim=-1)  # [N, E]
        if token_mask is not None:
            probs = probs[token_mask.reshape(-1).to(torch.bool)]
        total = total + coefficient_of_variation_squared(probs.sum(0))
    return total


class StudentAwareRouter(Callback):
    """Student-Aware Router training of an MoE teacher, alternating with the student's steps.

    In `setup`: every router of the teacher gets `top_k = num_experts`, its parameters (and only
    those) are declared with `module.train_teacher_parameters` (gradients on, kept in checkpoints) and an
    AdamW optimizer of their own. Every `every_n_steps` training steps, before the student's step:
    teacher in train mode, student logits under no_grad, one optimizer step on
    KL(p_T ‖ q_S) + balance_weight · balance (token-mean over counted positions, T = 1), teacher
    back to eval; logs `train/router_loss` (the KL) and `train/router_balance_loss`.
    The router optimizer's state is this callback's `state_dict`. Cost per router step: one extra
    student forward and one teacher forward + backward.

    Args:
        lr: router learning rate (the paper's code: 1e-6 for billion-parameter teachers).
        balance_weight: weight of the balance loss (paper: 0.01).
        every_n_steps: router step frequency in training steps.
        teacher: name of the teacher to train (None: the only teacher).
        weight_decay: AdamW weight decay of the router optimizer.
    """

    modifies_teacher = True  # teacher_outputs.reuse is off for the teacher it trains

    def __init__(self, lr: float = 1e-4, balance_weight: float = 0.01, every_n_steps: int = 1,
                 teacher: str | None = None, weight_decay: float = 0.0) -> None:
        if lr <= 0:
            raise ValueError(f"StudentAwareRouter: lr={lr!r} must be > 0")
        if balance_weight < 0:
            raise ValueError(f"StudentAwareRouter: balance_weight={balance_weight!r} must be >= 0")
        if int(every_n_steps) < 1:
            raise ValueError(f"StudentAwareRouter: every_n_steps={every_n_steps!r} must be >= 1")
        self.lr, self.balance_weight, self.weight_decay = float(lr), float(balance_weight), float(weight_decay)
        self.every_n_steps = int(every_n_steps)
        self.teacher_name = teacher
        self.optimizer: torch.optim.Optimizer | None = None
        self.router_params: list[nn.Parameter] = []
        self.gates: list[nn.Module] = []
        self.router_steps = 0
        self._pending_optimizer_state: dict[str, Any] | None = None
        self._reduce: Callable[[Tensor], Tensor] = lambda grad: grad

    # ------------------------------------------------------------------ set-up
    def attach(self, module: DistillationHost) -> None:
        """Open the routers of the chosen teacher for training (also usable without a Trainer)."""
        names = list(module.teachers)
        if module.task != "causal_lm":
            raise ValueError("StudentAwareRouter needs a causal-LM MoE teacher (task causal_lm), "
                             f"got task {module.task!r}")
        if self.teacher_name is None:
            if len(names) != 1:
                raise ValueError(f"StudentAwareRouter: several teachers {names}; choose one with teacher=<name>")
            self.teacher_name = names[0]
        if self.teacher_name not in names:
            raise ValueError(f"StudentAwareRouter: teacher={self.teacher_name!r} is not one of {names}")
        teacher = module.teachers[self.teacher_name]
        params = router_parameters(teacher)
        if self.optimizer is not None and [id(p) for p in params] == [id(p) for p in self.router_params]:
            return  # set up again for another stage (validate, test): keep the optimizer state
        self.gates, self.router_params = [gate for _, gate in find_router_gates(teacher)], params
        set_router_top_k(teacher, None)  # every expert is weighted while the routers learn
        module.train_teacher_parameters(self.teacher_name, self.router_params)
        self.optimizer = torch.optim.AdamW(self.router_params, lr=self.lr, weight_decay=self.weight_decay)
        if self._pending_optimizer_state is not None:
            self.optimizer.load_state_dict(self._pending_optimizer_state)
            self._pending_optimizer_state = None

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.attach(require_distillation_module(pl_module, self))
        self._reduce = lambda grad: trainer.strategy.reduce(grad, reduce_op="mean")

    # ------------------------------------------------------------------ the router step
    def router_step(self, module: DistillationHost, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """One optimizer step of the routers on `batch`; returns (KL, balance loss), detached."""
        if self.optimizer is None:
            raise RuntimeError("StudentAwareRouter.router_step before setup/attach")
        teacher = module.teachers[self.teacher_name]
        with torch.no_grad():
            student_logits = module.student_logits(batch)
        router_logits: list[Tensor] = []
        hooks = [gate.register_forward_hook(lambda _m, _i, out: router_logits.append(out[0])) for gate in self.gates]
        teacher.train()
        try:
            with torch.enable_grad():
                teacher_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
                student, labels = module.align(student_logits, batch["labels"])
                teacher_aligned, _ = module.align(teacher_logits, batch["labels"])
                mask = labels != IGNORE_INDEX
                if mask.any():
                    kl = kl_sum(log_probs(teacher_aligned[mask]), log_probs(student[mask])).mean()
                else:
                    kl = teacher_aligned.sum() * 0.0
                balance = importance_balance_loss(router_logits, batch.get("attention_mask"))
                loss = kl + self.balance_weight * balance
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for p in self.router_params:
                if p.grad is not None:
                    p.grad = self._reduce(p.grad)
            self.optimizer.step()
        finally:
            for hook in hooks:
                hook.remove()
            teacher.eval()
        self.router_steps += 1
        return kl.detach(), balance.detach()

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            kl, balance = self.router_step(pl_module, batch)
            pl_module.log("train/router_loss", kl, on_step=True, on_epoch=False)
            pl_module.log("train/router_balance_loss", balance, on_step=True, on_epoch=False)

    # ------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"router_steps": self.router_steps}
        if self.optimizer is not None:
            state["optimizer"] = self.optimizer.state_dict()
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.router_steps = int(state_dict.get("router_steps", 0))
        optimizer_state = state_dict.get("optimizer")
        if optimizer_state is None:
            return
        if self.optimizer is not None:
            self.optimizer.load_state_dict(optimizer_state)
        else:  # restored before setup: applied when the optimizer is built
            self._pending_optimizer_state = optimizer_state
