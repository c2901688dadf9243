"""Every conf/loss/*.yaml instantiates to a working loss whose configured parameters are real."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
from hydra.utils import get_method, instantiate
from omegaconf import OmegaConf

import kd_lightning.losses as L

LOSS_CONFIGS = sorted((Path(__file__).resolve().parents[1] / "conf" / "loss").glob("*.yaml"))


def test_every_loss_option_has_a_config():
    names = {path.stem for path in LOSS_CONFIGS}
    assert {"kl", "reverse_kl", "skew_kl", "skew_reverse_kl", "js", "gjsd", "tvd", "akl", "taid", "uld", "span_kl",
            "sparse_kl"} <= names


@pytest.mark.parametrize("path", LOSS_CONFIGS, ids=lambda path: path.stem)
def test_loss_config(path):
    cfg = OmegaConf.load(path)
    assert cfg.name == path.stem and "chunk_size" in cfg
    target = get_method(cfg.fn._target_)
    signature = inspect.signature(target).parameters
    for key, value in cfg.fn.items():
        if key.startswith("_"):
            continue
        assert key in signature, f"{path.name}: {key} is not a parameter of {cfg.fn._target_}"
        assert value == signature[key].default, f"{path.name}: {key}={value} differs from the code default"
    fn = instantiate(cfg.fn)
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(2, 3, 8, generator=gen)
    teacher_vocab = 11 if cfg.get("cross_vocab", False) else 8
    teacher = torch.randn(2, 3, teacher_vocab, generator=gen)
    mask = torch.tensor([[True, True, False], [True, False, True]])
    extra = {"interpolation": 0.5} if path.stem == "taid" else {}
    if path.stem in TOKENIZATION_LOSSES:  # they need both tokenizations: here one shared by both sides
        extra = {"targets": TOKENIZATION_LOSSES[path.stem](student, mask)}
        if path.stem == "byte_kl":
            student, teacher = byte_kl_logits(gen)
    value = fn(student, teacher, mask, temperature=2.0, **extra)
    assert value.ndim == 0 and torch.isfinite(value) and value > 0
    assert cfg.get("cross_vocab", False) == (path.stem in {"uld", "span_kl", *TOKENIZATION_LOSSES})


def shared_targets(student, mask):
    from kd_lightning.losses.cross_vocab import CrossTokenTargets

    labels = torch.where(mask, torch.arange(student.shape[1]).expand_as(mask), -100)
    offsets = torch.tensor([[(i, i + 1) for i in range(student.shape[1])]] * student.shape[0])
    return CrossTokenTargets(teacher_labels=labels, student_labels=labels, student_offsets=offsets,
                             teacher_offsets=offsets)


def byte_targets(student, mask):
    from kd_lightning.data.tokenizer import byte_tokenizer
    from kd_lightning.data.vocab_map import build_next_byte_map

    targets = shared_targets(student, mask)
    labels = torch.where(mask, targets.student_labels + 3, -100)
    return targets._replace(student_labels=labels, teacher_labels=labels,
                            next_byte=build_next_byte_map(byte_tokenizer(), byte_tokenizer()))


def byte_kl_logits(gen):
    return torch.randn(2, 3, 259, generator=gen), torch.randn(2, 3, 259, generator=gen)


def projection_targets(student, mask):
    from kd_lightning.losses.align import VocabProjection

    ids = torch.arange(student.shape[-1])  # the identity onto the first ids; the teacher's others fold to id 0
    fold = torch.cat([ids, torch.zeros(3, dtype=torch.long)])
    return shared_targets(student, mask)._replace(
        projection=VocabProjection(ids, ids, torch.ones(len(ids), dtype=torch.float64), fold))


TOKENIZATION_LOSSES = {"alm": shared_targets, "byte_kl": byte_targets, "xtoken_kl": projection_targets}


def test_taid_config_requires_the_callback():
    fn = instantiate(OmegaConf.load(next(p for p in LOSS_CONFIGS if p.stem == "taid")).fn)
    with pytest.raises(ValueError, match="callback"):
        fn(torch.randn(2, 5), torch.randn(2, 5))
