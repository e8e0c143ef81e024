"""What runs around the training steps: stopping on a signal, the seeded data order, the learning-rate
schedule, atomic JSON files, and the errors that end a run."""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import torch


class TrainingDiverged(RuntimeError):
    """Too many steps in a row had a NaN or inf loss or gradient."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped the run; the message says what was kept and how to continue."""


class Signals:
    """SIGINT and SIGTERM during training: the first asks the run to stop after the step in progress (which then
    writes a checkpoint); a second one, or one outside the step loop, abandons at once. Handlers are installed only
    in the main thread and restored afterwards."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.signum: int | None = None
        self.in_loop = False
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> Signals:
        if self.enabled and threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None or not self.in_loop:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: stopping after this step and writing a checkpoint (again: stop now)",
              file=sys.stderr, flush=True)  # fmt: skip


class DataOrder:
    """Seeded order over ``n`` training examples, reshuffled every epoch; its state is ``(epoch, position)``."""

    def __init__(self, n: int, seed: int, epoch: int = 0, position: int = 0) -> None:
        self.n, self.seed, self.epoch, self.position = n, seed, epoch, position

    def _order(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 7919 + self.epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def take(self, k: int) -> list[int]:
        out: list[int] = []
        while len(out) < k:
            order = self._order()
            chunk = order[self.position : self.position + k - len(out)]
            out += chunk
            self.position += len(chunk)
            if self.position >= self.n:
                self.epoch, self.position = self.epoch + 1, 0
        return out

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}


def schedule(kind: str, warmup: int, total: int):
    """The learning-rate factor at each update: linear warm-up over ``warmup`` updates, then ``constant``,
    ``linear`` (to 0 at ``total``) or ``cosine``."""

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if kind == "linear":
            return 1.0 - progress
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    return factor


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` to ``path`` atomically (a reader never sees half a file)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


class NoLog:
    """What a process other than rank 0 logs: nothing (rank 0 writes the run's files)."""

    def write(self, metrics: dict[str, Any]) -> None:
        pass

    def samples(self, records: list[dict[str, Any]]) -> None:
        pass

    def close(self) -> None:
        pass
