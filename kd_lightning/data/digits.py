"""scikit-learn's bundled handwritten digits: a small offline classification task (1797 x 64, 10 classes).

Useful for distilling an MLP teacher into a smaller one in seconds, e.g. to check a loss end to end.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from typing_extensions import override

from kd_lightning.data.base import BaseDataModule, DictDataset, check_fractions

NUM_FEATURES = 64  # 8 x 8 pixels
NUM_CLASSES = 10
MAX_PIXEL = 16.0  # pixel values are counts 0..16


class DigitsDataModule(BaseDataModule):
    """Batches ``{"inputs": FloatTensor [B, 64] in [0, 1], "labels": LongTensor [B]}``.

    Args:
        val_fraction, test_fraction: held-out shares; the split is stratified by class and seeded.
        batch_size, eval_batch_size, num_workers, seed: see ``BaseDataModule``.
    """

    task = "classification"

    def __init__(
        self,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, seed)
        self.save_hyperparameters()
        check_fractions(val_fraction, test_fraction)
        if val_fraction <= 0 or test_fraction <= 0:
            raise ValueError(
                f"dataset.val_fraction={val_fraction!r}, dataset.test_fraction={test_fraction!r}: both must be > 0"
            )
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.num_features, self.num_classes = NUM_FEATURES, NUM_CLASSES
        self.tokenizer = None

    @override
    def _load(self) -> dict[str, DictDataset]:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        inputs, labels = load_digits(return_X_y=True)
        inputs = (inputs / MAX_PIXEL).astype(np.float32)
        indices = np.arange(len(labels))
        num_val = round(self.val_fraction * len(labels))
        num_test = round(self.test_fraction * len(labels))
        rest, test = train_test_split(indices, test_size=num_test, random_state=self.seed, stratify=labels)
        train, val = train_test_split(rest, test_size=num_val, random_state=self.seed, stratify=labels[rest])
        return {
            split: DictDataset(inputs=torch.from_numpy(inputs[order]), labels=torch.from_numpy(labels[order]).long())
            for split, order in (("train", train), ("val", val), ("test", test))
        }

    @override
    def _identity(self) -> dict[str, Any]:
        # The data ship inside scikit-learn and do not change; only the split does.
        return {"val_fraction": self.val_fraction, "test_fraction": self.test_fraction, "seed": self.seed}
