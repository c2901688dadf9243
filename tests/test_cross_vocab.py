"""Cross-tokenizer losses: ULD as published (answer spans per tokenization) and span-aligned KL."""

from __future__ import annotations

import math

import pytest
import torch

import kd_lightning.losses as L
from kd_lightning.losses.align import VocabMap, span_groups
from kd_lightning.losses.cross_vocab import CrossTokenTargets, cross_token_targets
from test_losses import kl_ref, softmax_ref
from test_losses_adaptive import uld_ref

VS, VT = 9, 13
# Shifted targets of two tokenizations of one 12-character text (EOS at (12, 12)), and a padded one.
STUDENT_OFFSETS = [
    [(0, 2), (2, 3), (3, 6), (6, 7), (7, 8), (8, 10), (10, 12), (12, 12)],
    [(0, 1), (1, 3), (3, 4), (4, 4), (-1, -1), (-1, -1), (-1, -1), (-1, -1)],
]
TEACHER_OFFSETS = [
    [(0, 2), (2, 4), (4, 6), (6, 7), (7, 8), (8, 9), (9, 10), (10, 12), (12, 12)],
    [(0, 1), (1, 3), (3, 4), (4, 4), (-1, -1), (-1, -1), (-1, -1), (-1, -1), (-1, -1)],
]
MAP = VocabMap(torch.tensor([1, 2, 3, 4, 5]), torch.tensor([7, 3, 9, 0, 2]))
# 1:1 groups get ids that match through MAP, except (seq 0, student 4) whose id 6 is not shared.
STUDENT_LABELS = [[1, 8, 8, 2, 6, 8, 3, 4], [-100, 5, 1, 4, -100, -100, -100, -100]]
TEACHER_LABELS = [[7, 8, 8, 3, 5, 8, 8, 9, 0], [-100, 2, 7, 0, -100, -100, -100, -100, -100]]


def make_batch(seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(2, 8, VS, generator=gen, dtype=dtype) * 1.5
    teacher = torch.randn(2, 9, VT, generator=gen, dtype=dtype) * 2.0
    teacher[0, 2, 4] = -math.inf  # a zero-probability teacher token
    targets = CrossTokenTargets(
        teacher_labels=torch.tensor(TEACHER_LABELS), student_labels=torch.tensor(STUDENT_LABELS),
        student_offsets=torch.tensor(STUDENT_OFFSETS), teacher_offsets=torch.tensor(TEACHER_OFFSETS), vocab_map=MAP,
    )
    return student, teacher, targets.student_labels != -100, targets


# ----------------------------------------------------------------------------------------------
# Straightforward float64 references
# ----------------------------------------------------------------------------------------------
def uld_published_ref(student, teacher, student_mask, teacher_mask, seq_mean=False):
    per_seq, values = [], []
    for b in range(student.shape[0]):
        s_pos = [i for i in range(student.shape[1]) if student_mask[b, i]]
        t_pos = [i for i in range(teacher.shape[1]) if teacher_mask[b, i]]
        rows = [uld_ref(softmax_ref(student[b, i].tolist()), softmax_ref(teacher[b, j].tolist()))
                for i, j in zip(s_pos, t_pos)]
        values += rows
        if rows:
            per_seq.append(sum(rows) / len(rows))
    if seq_mean:
        return sum(per_seq) / max(len(per_seq), 1)
    return sum(values) / max(len(values), 1)


def span_kl_ref(student, teacher, targets, fallback_weight=1.0):
    pairs = dict(zip(targets.vocab_map.student_ids.tolist(), targets.vocab_map.teacher_ids.tolist()))
    values = []
    for b in range(student.shape[0]):
        s_lab, t_lab = targets.student_labels[b].tolist(), targets.teacher_labels[b].tolist()
        for g in span_groups(targets.student_offsets[b], targets.teacher_offsets[b]):
            s_range, t_range = range(g.student_start, g.student_end), range(g.teacher_start, g.teacher_end)
            counted = all(s_lab[i] != -100 for i in s_range) and all(t_lab[j] != -100 for j in t_range)
            if not s_range or not t_range or not counted:
                continue
            if len(s_range) == len(t_range) and all(pairs.get(s_lab[i]) == t_lab[j] for i, j in zip(s_range, t_range)):
                for i, j in zip(s_range, t_range):
                    s_row, t_row = student[b, i].tolist(), teacher[b, j].tolist()
                    q = softmax_ref([s_row[k] for k in pairs])
                    p = softmax_ref([t_row[k] for k in pairs.values()])
                    values.append(kl_ref(p, q))
                continue
            s_row, t_row = student[b, g.student_start].tolist(), teacher[b, g.teacher_start].tolist()
            if fallback_weight:
                values.append(fallback_weight * uld_ref(softmax_ref(s_row), softmax_ref(t_row)))
    return sum(values) / max(len(values), 1)


# ----------------------------------------------------------------------------------------------
# ULD as published
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reduction", ["mean", "seq_mean"])
def test_uld_published_matches_reference(reduction):
    student, teacher, mask, targets = make_batch()
    got = L.uld(student, teacher, mask, targets=targets, reduction=reduction)
    want = uld_published_ref(student, teacher, mask, targets.teacher_labels != -100, seq_mean=reduction == "seq_mean")
    assert got.item() == pytest.approx(want, rel=1e-9)


def test_uld_truncates_to_the_shorter_span_and_skips_eos():
    student, teacher, mask, targets = make_batch()
    got = L.uld(student, teacher, mask, targets=targets, skip_student_eos=True, skip_teacher_eos=True)
    s_mask, t_mask = mask.clone(), targets.teacher_labels != -100
    for m in (s_mask, t_mask):
        for b in range(2):
            m[b, m[b].nonzero().max()] = False
    assert got.item() == pytest.approx(uld_published_ref(student, teacher, s_mask, t_mask), rel=1e-9)
    per_position = L.uld(student, teacher, mask, targets=targets, reduction="none")
    assert per_position.shape == mask.shape and (per_position[~mask] == 0).all()
    assert (per_position[0] != 0).sum() == 8 and (per_position[1] != 0).sum() == 3  # min(8, 9) and min(3, 3)


def test_uld_published_equals_index_aligned_on_one_tokenization():
    student, teacher, mask, _ = make_batch()
    same = CrossTokenTargets(teacher_labels=torch.where(mask, 0, -100))
    teacher = teacher[:, :8]
    torch.testing.assert_close(L.uld(student, teacher, mask, targets=same), L.uld_index_aligned(student, teacher, mask))
    torch.testing.assert_close(L.uld(student, teacher, mask), L.uld_index_aligned(student, teacher, mask))


def test_uld_invariant_to_vocabulary_permutations():
    student, teacher, mask, targets = make_batch()
    value = L.uld(student, teacher, mask, targets=targets)
    torch.testing.assert_close(L.uld(student[..., torch.randperm(VS)], teacher, mask, targets=targets), value)
    torch.testing.assert_close(L.uld(student, teacher[..., torch.randperm(VT)], mask, targets=targets), value)


# ----------------------------------------------------------------------------------------------
# span_kl
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fallback_weight", [1.0, 0.5, 0.0])
def test_span_kl_matches_reference(fallback_weight):
    student, teacher, mask, targets = make_batch()
    got = L.span_kl(student, teacher, mask, targets=targets, fallback_weight=fallback_weight)
    assert got.item() == pytest.approx(span_kl_ref(student, teacher, targets, fallback_weight), rel=1e-9)


def test_span_kl_coverage_statistics():
    student, teacher, mask, targets = make_batch()
    stats: dict = {}
    L.span_kl(student, teacher, mask, targets=targets, out_stats=stats)
    # Counted student targets: 8 + 3. Exact: (0,2) "1->7", (6,7) "2->3", (10,12) "3->9", EOS "4->0",
    # seq 1: "5->2", "1->7", "4->0". Fallback groups: chars 2-6 (2 student tokens), 7-8 (id 6 unshared),
    # 8-10 (1 student token, 2 teacher tokens).
    assert stats == {"exact_fraction": 7 / 11, "fallback_fraction": 4 / 11, "exact_terms": 7, "fallback_terms": 3}


def test_span_kl_equals_the_divergence_on_identical_tokenizations():
    student, _, mask, targets = make_batch()
    teacher = torch.randn(2, 8, VS, dtype=torch.float64)
    labels = torch.where(mask, torch.arange(8).expand(2, 8) % VS, -100)
    identical = CrossTokenTargets(
        teacher_labels=labels, student_labels=labels, student_offsets=targets.student_offsets,
        teacher_offsets=targets.student_offsets, vocab_map=VocabMap(torch.arange(VS), torch.arange(VS)),
    )
    for divergence in (L.forward_kl, L.reverse_kl):
        want = divergence(student, teacher, mask)
        torch.testing.assert_close(L.span_kl(student, teacher, mask, targets=identical, divergence=divergence), want)
        torch.testing.assert_close(L.span_kl(student, teacher, mask, divergence=divergence), want)
    torch.testing.assert_close(L.span_kl(student, teacher, mask, targets=identical, reduction="seq_mean"),
                               L.forward_kl(student, teacher, mask, reduction="seq_mean"))


@pytest.mark.parametrize("loss", ["uld", "span_kl"])
def test_masks_respected_and_only_the_student_gets_gradient(loss):
    fn = getattr(L, loss)
    student, teacher, mask, targets = make_batch()
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    value = fn(student, teacher, mask, targets=targets)
    value.backward()
    assert teacher.grad is None and torch.isfinite(student.grad).all()
    assert (student.grad[~mask] == 0).all()
    noisy_student, noisy_teacher = student.detach().clone(), teacher.detach().clone()
    noisy_student[~mask] = float("nan")
    noisy_teacher[targets.teacher_labels == -100] = float("nan")
    torch.testing.assert_close(fn(noisy_student, noisy_teacher, mask, targets=targets), value.detach())


@pytest.mark.parametrize("loss", ["uld", "span_kl"])
def test_empty_spans_give_zero_with_a_graph(loss):
    student, teacher, mask, targets = make_batch()
    student.requires_grad_(True)
    empty = targets._replace(teacher_labels=torch.full_like(targets.teacher_labels, -100))
    value = getattr(L, loss)(student, teacher, mask, targets=empty)
    assert value.item() == 0.0 and not torch.isnan(value)
    value.backward()
    assert (student.grad == 0).all()


def test_span_kl_needs_offsets_and_a_vocab_map():
    student, teacher, mask, targets = make_batch()
    with pytest.raises(ValueError, match="vocab_map"):
        L.span_kl(student, teacher, mask, targets=targets._replace(vocab_map=None))


def test_cross_token_targets_shift_the_batch():
    batch = {"labels": torch.tensor([[5, 6, 7]]), "offsets": torch.tensor([[[0, 1], [1, 2], [2, 2]]]),
             "teacher_labels": torch.tensor([[-100, 9]]), "teacher_offsets": torch.tensor([[[0, 2], [2, 2]]])}
    targets = cross_token_targets(batch, MAP)
    assert targets.student_labels.tolist() == [[6, 7]] and targets.teacher_labels.tolist() == [[9]]
    assert targets.student_offsets.tolist() == [[[1, 2], [2, 2]]] and targets.vocab_map is MAP


def test_bf16_inputs_are_computed_in_float32():
    student, teacher, mask, targets = make_batch(dtype=torch.float32)
    for fn in (L.uld, L.span_kl):
        full = fn(student, teacher, mask, targets=targets)
        half = fn(student.bfloat16(), teacher.bfloat16(), mask, targets=targets)
        assert half.dtype == torch.float32 and half.item() == pytest.approx(full.item(), rel=5e-2)


# ----------------------------------------------------------------------------------------------
# End to end on real tokenizers: dual samples -> collate -> shifted targets -> losses
# ----------------------------------------------------------------------------------------------
def dual_batch(student_tokenizer, teacher_tokenizer, texts):
    from kd_lightning.data.dual import DualCollator, DualTextDataset

    dataset = DualTextDataset(texts, student_tokenizer, teacher_tokenizer, seq_len=48)
    return DualCollator.for_tokenizers(student_tokenizer, teacher_tokenizer)([dataset[i] for i in range(len(dataset))])


def test_end_to_end_on_real_tokenizers():
    from kd_lightning.data.bpe import train_bpe
    from kd_lightning.data.tokenizer import byte_tokenizer
    from kd_lightning.data.vocab_map import shared_vocab_map

    corpus = ["def area(radius):\n    return 3.14 * radius ** 2  # café €\n", "print(area(2))\n"] * 20
    bpe = train_bpe(corpus, 330)
    texts = [corpus[0], ("Q: area(2)? ", "A: 12.56, naïvely €\n")]
    gen = torch.Generator().manual_seed(0)
    for student_tok, teacher_tok in ((byte_tokenizer(), bpe), (bpe, bpe)):
        batch = dual_batch(student_tok, teacher_tok, texts)
        targets = cross_token_targets(batch, shared_vocab_map(student_tok, teacher_tok))
        student = torch.randn(*batch["input_ids"].shape, len(student_tok), generator=gen, dtype=torch.float64)
        teacher = torch.randn(*batch["teacher_input_ids"].shape, len(teacher_tok), generator=gen, dtype=torch.float64)
        mask = targets.student_labels != -100
        stats: dict = {}
        value = L.span_kl(student[:, :-1], teacher[:, :-1], mask, targets=targets, out_stats=stats)
        assert value.item() == pytest.approx(span_kl_ref(student[:, :-1], teacher[:, :-1], targets), rel=1e-9)
        assert torch.isfinite(L.uld(student[:, :-1], teacher[:, :-1], mask, targets=targets))
        if student_tok is teacher_tok:
            assert stats["exact_fraction"] == 1.0 and stats["fallback_terms"] == 0
            shared = targets.vocab_map.student_ids
            torch.testing.assert_close(value, L.forward_kl(student[:, :-1, shared], teacher[:, :-1, shared], mask))
        else:
            assert 0 < stats["exact_fraction"] < 1 and stats["fallback_terms"] > 0


def test_span_kl_config_takes_another_divergence():
    from pathlib import Path

    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "loss" / "span_kl.yaml")
    assert cfg.cross_vocab and cfg.chunk_size is None
    cfg.fn.divergence = {"_target_": "kd_lightning.losses.reverse_kl", "_partial_": True}
    fn = instantiate(cfg.fn)
    student, teacher, mask, targets = make_batch()
    torch.testing.assert_close(fn(student, teacher, mask, targets=targets),
                               L.span_kl(student, teacher, mask, targets=targets, divergence=L.reverse_kl))
    default = L.span_kl(student, teacher, mask, targets=targets)
    assert not torch.allclose(fn(student, teacher, mask, targets=targets), default)
