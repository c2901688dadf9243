"""strategy=fsdp builds models on the meta device and fills each process's shards after sharding
(kd_lightning/infra/shard_init.py): a `from_pretrained` model reads only its rows of each tensor from
the safetensors file, a model built from config is initialised on rank 0 and scattered. Either way
the sharded model holds exactly the values (and gives exactly the logits) of the model one process
builds whole. One process in the fast tier, two gloo processes in the slow one."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from kd_lightning.infra.shard_init import BuiltOnRank0, SafetensorsWeights, defer, is_meta, local_index, shard_bounds

VOCAB = 50  # not a multiple of 2 or 4: the last shard of the embeddings is shorter


def test_shard_bounds_split_rows_as_torch_chunk() -> None:
    for size in (0, 1, 5, 7, 8, 50):
        for parts in (1, 2, 3, 4):
            rows = torch.arange(size)
            chunks = list(torch.chunk(rows, parts)) if size else []
            for index in range(parts):
                start, stop = shard_bounds(size, parts, index)
                expected = chunks[index].tolist() if index < len(chunks) else []
                assert rows[start:stop].tolist() == expected, (size, parts, index)
    assert local_index(torch.zeros(3, 4)) == (slice(0, 3), slice(0, 4))  # a plain tensor: all of it


def tiny_llama(seed: int, tie: bool) -> torch.nn.Module:
    from transformers import LlamaConfig

    from kd_lightning.models import build_causal_lm

    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tie)
    return build_causal_lm(config, vocab_size=VOCAB, seed=seed)


def meta_copy(directory: Path | None, seed: int, tie: bool) -> torch.nn.Module:
    """The deferred model the builders make under strategy=fsdp: shapes only, plus where its weights are."""
    with torch.device("meta"):
        if directory is not None:
            from kd_lightning.models import from_pretrained

            model = from_pretrained(str(directory))
        else:
            model = tiny_llama(seed, tie)
    source = SafetensorsWeights(directory) if directory is not None else BuiltOnRank0(lambda: tiny_llama(seed, tie))
    return defer(model, source)


def check_sharded_equals_whole(rank: int, world: int, store_dir: str, directory: str | None, tie: bool) -> None:
    """In each process: shard a deferred model with FSDP2, materialise it, compare with the whole one."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from kd_lightning.infra.sharding import full_state_dict, reshard_frozen, shard_model

    if world > 1:  # a spawned process; in the test's own process the thread count stays as it is
        torch.set_num_threads(1)
    store = dist.FileStore(os.path.join(store_dir, "store"), world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    try:
        whole = tiny_llama(seed=3, tie=tie)
        model = meta_copy(Path(directory) if directory else None, seed=3, tie=tie)
        assert is_meta(model)
        shard_model(model, init_device_mesh("cpu", (world,)), device="cpu")
        assert not is_meta(model)
        local = model.model.embed_tokens.weight.to_local()
        assert local.shape[0] == shard_bounds(VOCAB, world, rank)[1] - shard_bounds(VOCAB, world, rank)[0]
        if tie:
            assert model.lm_head.weight is model.model.embed_tokens.weight
        gathered = full_state_dict(model, all_ranks=True)
        expected = whole.state_dict()
        assert gathered.keys() == expected.keys()
        for key in expected:
            assert torch.equal(gathered[key], expected[key]), key
        for name, buffer in whole.named_buffers():  # rotary inv_freq: not in the state dict, computed again
            assert torch.equal(model.get_buffer(name), buffer), name
        ids = torch.arange(3, 3 + 2 * 9).reshape(2, 9) % VOCAB
        with torch.no_grad():
            assert torch.allclose(model(input_ids=ids).logits, whole(input_ids=ids).logits, atol=1e-6)
        reshard_frozen(model)
    finally:
        dist.destroy_process_group()


def run_in_processes(world: int, tmp_path: Path, directory: Path | None, tie: bool) -> None:
    if world == 1:
        check_sharded_equals_whole(0, 1, str(tmp_path), str(directory) if directory else None, tie)
        return
    import torch.multiprocessing as mp

    mp.start_processes(check_sharded_equals_whole, args=(world, str(tmp_path), str(directory) if directory else None, tie),
                       nprocs=world, start_method="spawn")


def saved(tmp_path: Path, tie: bool) -> Path:
    directory = tmp_path / "pretrained"
    tiny_llama(seed=3, tie=tie).save_pretrained(directory, safe_serialization=True)
    return directory


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_pretrained_meta_model_reads_its_shard_from_safetensors(tmp_path: Path, tie: bool) -> None:
    run_in_processes(1, tmp_path, saved(tmp_path, tie), tie)


def test_config_meta_model_is_initialised_once_and_scattered(tmp_path: Path) -> None:
    run_in_processes(1, tmp_path, None, tie=False)


def test_missing_lists_what_the_files_lack(tmp_path: Path) -> None:
    directory = saved(tmp_path, tie=False)
    assert SafetensorsWeights(directory).missing(tiny_llama(seed=3, tie=False)) == []
    bigger = tiny_llama(seed=3, tie=False)
    bigger.register_parameter("extra", torch.nn.Parameter(torch.zeros(2)))
    assert SafetensorsWeights(directory).missing(bigger) == ["extra"]


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.parametrize("source", ["safetensors", "rank0"])
def test_two_processes_each_hold_their_shard_of_the_whole_model(tmp_path: Path, source: str) -> None:
    run_in_processes(2, tmp_path, saved(tmp_path, tie=True) if source == "safetensors" else None, tie=True)


def test_cpu_fsdp_returns_freed_tensors_to_the_system() -> None:
    """`mmap_large_allocations` (set by strategy=fsdp on CPU): a freed 64 MiB tensor leaves the resident
    set at once (in a fresh process: the setting stays for the life of a process)."""
    import subprocess
    import sys

    code = """
import torch
from pathlib import Path
from kd_lightning.infra.shard_init import mmap_large_allocations
def rss():
    line = next(l for l in Path('/proc/self/status').read_text().splitlines() if l.startswith('VmRSS'))
    return int(line.split()[1]) / 1024
assert mmap_large_allocations()
for _ in range(3):  # freed once, a block would otherwise stay in the heap for the next
    before = rss(); block = torch.ones(2**24); held = rss(); del block; after = rss()
    assert held - before > 50 and after - before < 8, (before, held, after)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert done.returncode == 0, done.stderr[-2000:]
