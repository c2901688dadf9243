"""`ResumableCSVLogger`: the rows logged before an interruption survive a resume (Lightning's
CSVLogger deletes `metrics.csv` when its directory is not empty)."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from kd_lightning.loggers import ResumableCSVLogger


class Regression(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.layer(x), y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/loss", torch.nn.functional.mse_loss(self.layer(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def loader() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=generator)
    return DataLoader(TensorDataset(x, x.sum(-1, keepdim=True)), batch_size=4)


def fit(out: Path, logger_cls: type, max_steps: int, ckpt: str | None = None) -> None:
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(
        max_steps=max_steps, val_check_interval=3, limit_val_batches=1, log_every_n_steps=1, accelerator="cpu",
        logger=logger_cls(save_dir=out, name="csv", version=""), enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=out,
        callbacks=[ModelCheckpoint(dirpath=out / "checkpoints", filename="step{step}", every_n_train_steps=3,
                                   save_top_k=-1, auto_insert_metric_name=False)])
    trainer.fit(Regression(), train_dataloaders=loader(), val_dataloaders=loader(), ckpt_path=ckpt, weights_only=True)


def rows(out: Path) -> list[dict[str, str]]:
    with open(out / "csv" / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def interrupted_then_resumed(out: Path, logger_cls: type) -> list[dict[str, str]]:
    fit(out, logger_cls, max_steps=5)  # "interrupted" after step 5; the last checkpoint is at step 3
    assert (out / "checkpoints" / "step3.ckpt").exists()
    fit(out, logger_cls, max_steps=8, ckpt=str(out / "checkpoints" / "step3.ckpt"))
    return rows(out)


def test_resumed_run_keeps_rows_from_before_the_interruption(tmp_path: Path) -> None:
    fit(tmp_path / "straight", ResumableCSVLogger, max_steps=8)
    straight = rows(tmp_path / "straight")
    resumed = interrupted_then_resumed(tmp_path / "resumed", ResumableCSVLogger)
    # Every step once, in order; the rows logged after the step-3 checkpoint are replaced, not doubled.
    assert [r["step"] for r in resumed] == [r["step"] for r in straight]
    assert resumed[0].keys() == straight[0].keys()
    # The rows from before the checkpoint are the first run's (a plain DataLoader restarts its epoch
    # on resume, so later values may differ from the uninterrupted run's).
    before = [r for r in straight if int(r["step"]) < 3]
    assert before and resumed[: len(before)] == before


def test_lightning_csv_logger_loses_rows_on_resume(tmp_path: Path) -> None:
    """Why the subclass exists: with Lightning's own logger the first run's rows are gone."""
    with pytest.warns(UserWarning, match="will be deleted"):
        resumed = interrupted_then_resumed(tmp_path, CSVLogger)
    assert min(int(r["step"]) for r in resumed) >= 3
