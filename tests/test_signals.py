"""`kd_lightning.infra.signals.exit_on_sigterm`: SIGTERM in any stage -> one line and exit status 143."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest

from kd_lightning.infra.signals import EXIT_SIGTERM, exit_on_sigterm
from tests.conftest import REPO

SCRIPT = textwrap.dedent("""
    import json, logging, os, signal, sys, time
    import lightning as L, torch
    from torch.utils.data import DataLoader, TensorDataset
    from kd_lightning.infra.signals import exit_on_sigterm

    # One start-up (the imports take seconds) for every mode: a forked child per mode, each with its own
    # stdout/stderr files, runs the mode as the rest of this script and exits however the mode makes
    # Python exit; the parent waits and writes each child's exit status to OUT/status.json.
    out, modes = sys.argv[1], sys.argv[2:]
    children = {}
    for mode in modes:
        os.makedirs(os.path.join(out, mode))
        pid = os.fork()
        if pid == 0:
            for fd, name in ((1, "stdout"), (2, "stderr")):
                os.dup2(os.open(os.path.join(out, mode, name), os.O_WRONLY | os.O_CREAT, 0o644), fd)
            out = os.path.join(out, mode)
            break
        children[mode] = pid
    else:
        status = {mode: os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for mode, pid in children.items()}
        open(os.path.join(out, "status.json"), "w").write(json.dumps(status))
        sys.exit(0)

    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)
        def training_step(self, batch, batch_idx):
            if self.global_step == 2 and batch_idx == 2:
                os.kill(os.getpid(), signal.SIGTERM)  # Lightning defers it to the end of this batch
                self.after_signal = True
            return self.layer(batch[0]).pow(2).mean()
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    def fit(trainer):
        data = DataLoader(TensorDataset(torch.randn(64, 2)), batch_size=2)
        trainer.fit(Tiny(), data)

    trainer = L.Trainer(max_steps=20, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")

    def save():
        path = os.path.join(out, "step.txt")
        open(path, "w").write(str(trainer.global_step))
        return path

    if mode == "bare_fit":  # today's teacher pre-training / baseline / TAKD: no handling at all
        fit(trainer)
    elif mode == "fit":
        with exit_on_sigterm("teacher pre-training", saved=save):
            fit(trainer)
    elif mode == "outside_fit":  # e.g. writing stage=cache_teacher shards: no Trainer is running
        with exit_on_sigterm("stage=cache_teacher"):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)
            print("not interrupted")
    print("finished normally")
""")
MODES = ("fit", "bare_fit", "outside_fit")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, SimpleNamespace]:
    """Each mode of SCRIPT in a process of its own (forked from one that imported Lightning once):
    mode -> its exit status, stdout, stderr and output directory."""
    out = tmp_path_factory.mktemp("signals")
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    driver = subprocess.run([sys.executable, "-c", SCRIPT, str(out), *MODES], env=env, capture_output=True, text=True,
                            timeout=120)
    assert driver.returncode == 0, driver.stderr[-2000:]
    status = json.loads((out / "status.json").read_text())
    return {mode: SimpleNamespace(returncode=status[mode], stdout=(out / mode / "stdout").read_text(),
                                  stderr=(out / mode / "stderr").read_text(), out=out / mode) for mode in MODES}


def test_sigterm_during_a_fit_finishes_the_batch_then_exits_143(runs) -> None:
    done = runs["fit"]
    assert done.returncode == EXIT_SIGTERM, done.stderr[-2000:]
    assert f"SIGTERM during teacher pre-training: saved {done.out / 'step.txt'}; rerun the same command with " \
           "resume=auto to continue" in done.stderr
    assert (done.out / "step.txt").read_text() == "3"  # the batch that got the signal finished its step
    assert "finished normally" not in done.stdout


def test_without_the_guard_a_sigterm_during_a_fit_exits_0_silently(runs) -> None:
    """Why the guard exists: Lightning's SIGTERMException is a SystemExit with no code."""
    done = runs["bare_fit"]
    assert done.returncode == 0 and "SIGTERM during" not in done.stderr


def test_sigterm_outside_a_fit_exits_143_at_once(runs) -> None:
    done = runs["outside_fit"]
    assert done.returncode == EXIT_SIGTERM, done.stderr[-2000:]
    assert "SIGTERM during stage=cache_teacher: nothing partial was kept" in done.stderr
    assert "not interrupted" not in done.stdout


def test_previous_handler_is_restored_and_other_errors_pass() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyError):
        with exit_on_sigterm("distillation"):
            assert signal.getsignal(signal.SIGTERM) is not before
            raise KeyError("not a signal")
    assert signal.getsignal(signal.SIGTERM) is before
