"""W&B with a key but no network decides up front (issue #24): offline unless the service answers
quickly, and the log says which. Before, `wandb.init` waited about 100 s and ended in a CommError."""

from __future__ import annotations

import logging
import socket
import time
from pathlib import Path

import pytest

import kd_lightning.loggers as loggers


@pytest.fixture
def with_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.delenv("WANDB_MODE", raising=False)


def test_a_key_without_network_logs_offline_at_once_and_says_so(with_key, monkeypatch, tmp_path: Path, caplog) -> None:
    def no_network(address, timeout=None):
        raise OSError(101, "Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", no_network)
    start = time.perf_counter()
    with caplog.at_level(logging.INFO, logger="kd_lightning.loggers"):
        logger = loggers.wandb_logger(save_dir=str(tmp_path), project="p")
    assert time.perf_counter() - start < 5
    assert logger._offline is True
    assert (f"W&B: api.wandb.ai does not answer within 3 s (Network is unreachable): logging offline to "
            f"{tmp_path}/wandb; upload later with `wandb sync") in caplog.text


def test_a_key_and_an_answering_service_log_online(with_key, monkeypatch, tmp_path: Path, caplog) -> None:
    class Connection:
        def close(self) -> None:
            pass

    monkeypatch.setattr(socket, "create_connection", lambda address, timeout=None: Connection())
    with caplog.at_level(logging.INFO, logger="kd_lightning.loggers"):
        logger = loggers.wandb_logger(save_dir=str(tmp_path), project="p")
    assert logger._offline is False and "W&B: the service answers: logging online" in caplog.text
