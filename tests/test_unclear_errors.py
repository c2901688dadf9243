"""The "Unclear" items of issue #24: each fails saying what to do, before any compute where it can."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from kd_lightning.errors import ConfigError
from kd_lightning.run.pipeline import run


def a_file(tmp_path: Path) -> Path:
    """A path component that is a file: no directory can be made below it (even as root)."""
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    return blocker


def test_an_unwritable_run_dir_is_refused_before_hydra_starts(tmp_path: Path, monkeypatch, capsys) -> None:
    from kd_lightning.run import cli

    target = a_file(tmp_path) / "run"
    monkeypatch.setattr(sys, "argv", ["train.py", f"hydra.run.dir={target}", "baseline=false"])
    monkeypatch.setattr(cli, "hydra_main", lambda: pytest.fail("Hydra started"))
    with pytest.raises(SystemExit) as stopped:
        cli.main()
    assert str(stopped.value.code) == (f"ConfigError: hydra.run.dir='{target}': cannot write there "
                                       f"({target.parent} is a file, not a directory); set hydra.run.dir to a "
                                       "writable directory")


@pytest.mark.parametrize("overrides, key", [
    (("stage=cache_teacher", "teacher_cache.dir={bad}"), "teacher_cache.dir"),
    (("teacher_outputs.reuse=true", "teacher_outputs.dir={bad}"), "teacher_outputs.dir"),
], ids=["teacher_cache", "teacher_outputs"])
def test_an_unwritable_store_dir_is_named_before_any_teacher_pretraining(make_cfg, tmp_path: Path, overrides, key) -> None:
    bad = a_file(tmp_path) / "store"
    cfg = make_cfg("baseline=false", *(o.format(bad=bad) for o in overrides), output_dir=tmp_path / "run")
    with pytest.raises(ConfigError, match=rf"{key}='.*a_file/store': cannot write there"):
        run(cfg)
    assert not (tmp_path / "run" / "teacher_moe").exists()  # no teacher pre-training began


def test_a_relative_pretrained_path_that_does_not_exist_says_so_and_that_hub_ids_need_network(
        make_cfg, tmp_path: Path, monkeypatch) -> None:
    import socket

    from huggingface_hub import constants

    monkeypatch.chdir(tmp_path)
    cfg = make_cfg("teacher=hf", "teacher.model.pretrained=models/my_teacher", "baseline=false",
                   output_dir=tmp_path / "run")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConfigError, match=rf"teacher\.model\.pretrained='models/my_teacher': no such directory "
                                          rf"\({tmp_path / 'models' / 'my_teacher'}\); taken as a hub id it cannot be "
                                          r"fetched \(HF_HUB_OFFLINE is set\): hub ids need network access"):
        run(cfg)

    def no_network(*args, **kwargs):
        raise OSError(101, "Network is unreachable")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(socket, "create_connection", no_network)
    with pytest.raises(ConfigError, match=r"cannot be reached: Network is unreachable\): hub ids need network access"):
        run(cfg)


def test_a_truncated_cached_teacher_raises_damaged_file_error_with_the_file_and_the_fix(tmp_path: Path) -> None:
    from kd_lightning.infra.safeload import DamagedFileError
    from tests.test_run_reliability import tiny_teacher_cfg

    cache = tmp_path / "cache"
    run(tiny_teacher_cfg(tmp_path / "first", cache))
    (weights,) = cache.glob("**/model.safetensors")
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(DamagedFileError, match=rf"{weights} is not a readable safetensors file .*: it is truncated or "
                                               rf"damaged; delete the cache entry {weights.parent} \(rm -r\); the model "
                                               "is trained again"):
        run(tiny_teacher_cfg(tmp_path / "second", cache))


def test_a_wrong_number_of_ensemble_weights_is_refused_before_any_teacher_pretraining(make_cfg, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = make_cfg("teacher=ensemble", "distill.teacher_weights=[0.5,0.3,0.2]", "baseline=false", output_dir=out)
    cfg.paths.cache_dir = str(tmp_path / "cache")  # nothing cached: a teacher would be pre-trained first
    with pytest.raises(ConfigError, match=r"distill\.teacher_weights=\[0\.5, 0\.3, 0\.2\]: needs 2 non-negative "
                                          r"number\(s\), one per teacher in this order: moe, dense \(not all 0\); got 3"):
        run(cfg)
    assert not list((tmp_path / "cache").glob("**/kd_manifest.json")) and not (out / "teacher_moe").exists()


class SlowTokenizerWithSurrogates:
    """A tokenizer without offsets (no fast backend) whose vocabulary holds lone surrogates."""

    eos_token_id, bos_token_id, all_special_ids = 0, None, [0]

    def get_vocab(self) -> dict[str, int]:
        return {"</s>": 0, "a": 1, "\ud83d": 2, "\ude00": 3, "ab": 4}

    def __len__(self) -> int:
        return 5


def test_a_vocabulary_with_surrogates_does_not_crash_the_byte_mapping() -> None:
    from kd_lightning.data.vocab_map import token_byte_lengths, token_bytes

    mapped = token_bytes(SlowTokenizerWithSurrogates())  # before: UnicodeEncodeError (surrogates not allowed)
    assert mapped[1] == b"a" and mapped[4] == b"ab" and mapped[0] == b"<eos>"
    assert mapped[2] != mapped[3] and len(mapped[2]) == 3
    assert token_byte_lengths(SlowTokenizerWithSurrogates()).tolist()[:2] == [1, 1]


def test_a_single_file_checkpoint_resumed_under_fsdp_is_refused_naming_both_layouts(make_cfg, tmp_path: Path) -> None:
    out = tmp_path / "run"
    common = ("baseline=false", "trainer.max_steps=4", "trainer.val_check_interval=2")
    with pytest.raises(SystemExit):
        run(make_cfg(*common, "+callbacks.kill._target_=tests.test_resume.SigtermAt", "+callbacks.kill.step=2",
                     output_dir=out))
    last = out / "checkpoints" / "last.ckpt"
    assert last.is_file()
    with pytest.raises(ConfigError, match=rf"resume=auto: {last} is a single-file checkpoint \(strategy=ddp, cpu or "
                                          r"another whole-model strategy\), but this run uses strategy=fsdp, which loads "
                                          r"sharded checkpoint directories; a checkpoint cannot move between the two"):
        run(make_cfg(*common, "strategy=fsdp", "resume=auto", "+resume_allow_changes=true", output_dir=out))
