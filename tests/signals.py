"""A signal at a known training step, for the tests that stop a run from outside: ``PauseAt`` holds the training
loop at a step until the test has sent its signal, so no test races a run's speed."""

from __future__ import annotations

import os
import time
from pathlib import Path

import lightning as L


def pause_at(step: int, ledger: Path, run: int = 1) -> str:
    """The override that adds ``PauseAt`` to ``lmlab train``'s callbacks."""
    return f"+callbacks.pause={{_target_:tests.signals.PauseAt,step:{step},ledger:'{ledger}',run:{run}}}"


class PauseAt(L.Callback):
    """After global step ``step`` of the ``run``-th training run to reach it, writes ``ledger``.pid (this process's
    id) and waits there until a SIGTERM (which Lightning acts on after the step) or a SIGKILL arrives, or until the
file ``ledger``.go exists (then training goes on). Each run that
    reaches the step appends a line to the file ``ledger``: the same command run again passes straight through."""

    def __init__(self, step: int, ledger: str, run: int = 1, wait_s: float = 600) -> None:
        self.step, self.ledger, self.run, self.wait_s = step, Path(ledger), run, wait_s

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step != self.step:
            return
        with open(self.ledger, "a") as f:
            f.write(f"{os.getpid()}\n")
        if len(self.ledger.read_text().splitlines()) != self.run:
            return
        tmp = Path(f"{self.ledger}.pid.tmp")
        tmp.write_text(str(os.getpid()))
        os.replace(tmp, f"{self.ledger}.pid")  # whole or absent
        deadline = time.monotonic() + self.wait_s
        go = Path(f"{self.ledger}.go")
        while not (trainer.received_sigterm or go.exists()):
            if time.monotonic() > deadline:
                raise RuntimeError(f"no signal arrived within {self.wait_s} s of step {self.step}")
            time.sleep(0.02)


def wait_for_pause(ledger: Path, proc, timeout: float = 900) -> None:
    """Waits until the run ``proc`` is held at its step by ``PauseAt`` (fails if it ends first)."""
    marker = Path(f"{ledger}.pid")
    deadline = time.monotonic() + timeout
    while not marker.exists():
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before it reached the step"
        assert time.monotonic() < deadline, f"the run did not reach the step within {timeout} s"
        time.sleep(0.05)
    assert int(marker.read_text()) == proc.pid, "the pause is in another process than the one started"
