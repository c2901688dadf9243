"""`strategy.student_activation_checkpointing=true`: the sharded student recomputes each block's
activations in backward, and its gradients equal those of the student that keeps them (1 process in
the fast tier, 2 gloo processes in the slow one)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

VOCAB = 50


def student(seed: int = 0) -> torch.nn.Module:
    from transformers import LlamaConfig

    from kd_lightning.models import build_causal_lm

    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                         num_key_value_heads=2, max_position_embeddings=64)
    return build_causal_lm(config, vocab_size=VOCAB, seed=seed)


def gradients(checkpointed: bool, world: int, rank: int) -> dict[str, torch.Tensor]:
    from torch.distributed.device_mesh import init_device_mesh

    from kd_lightning.infra.sharding import checkpoint_activations, full_tensor, shard_model

    model = student()
    if checkpointed:
        checkpoint_activations(model)
        assert model.is_gradient_checkpointing
    shard_model(model, init_device_mesh("cpu", (world,)))
    model.train()
    ids = (torch.arange(4 * 11).reshape(4, 11) * 7 + rank) % VOCAB  # each rank its own rows
    model(input_ids=ids, labels=ids).loss.backward()
    return {name: full_tensor(p.grad).clone() for name, p in model.named_parameters()}


def compare(rank: int, world: int, store_dir: str) -> None:
    import torch.distributed as dist

    if world > 1:  # a spawned process; in the test's own process the thread count stays as it is
        torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(os.path.join(store_dir, "store"), world), rank=rank,
                            world_size=world)
    try:
        kept, recomputed = gradients(False, world, rank), gradients(True, world, rank)
        assert kept.keys() == recomputed.keys()
        for name in kept:
            assert torch.allclose(kept[name], recomputed[name], rtol=1e-5, atol=1e-7), name
    finally:
        dist.destroy_process_group()


def test_checkpointed_student_has_the_same_gradients_one_process(tmp_path: Path) -> None:
    compare(0, 1, str(tmp_path))


@pytest.mark.slow
@pytest.mark.dist
def test_checkpointed_student_has_the_same_gradients_two_processes(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    mp.start_processes(compare, args=(2, str(tmp_path)), nprocs=2, start_method="spawn")


def test_checkpointing_refuses_a_model_without_blocks() -> None:
    from kd_lightning.infra.sharding import checkpoint_activations

    with pytest.raises(ValueError, match="student_activation_checkpointing"):
        checkpoint_activations(torch.nn.Linear(2, 2))
