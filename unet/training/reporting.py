"""What a training loop tells the world: the *reporter* protocol (``on_step``, ``on_validation``,
``on_checkpoint``, ``should_stop``, ``on_phase``), implemented by the CLI (tqdm), the background worker (database
rows) and the tests (lists). Losses arrive in groups: :class:`unet.training.train.Trainer` reads them back from
the device every few steps (:data:`unet.training.train.LOSS_EVERY`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol


class Reporter(Protocol):
    def on_step(self, step: int, loss: float, lr: float, seconds: float) -> None: ...
    def on_validation(self, step: int, metrics: dict[str, float], seconds: float) -> None: ...
    def on_checkpoint(self, kind: str, path: Path, step: int, metrics: dict[str, float]) -> None: ...
    def should_stop(self) -> bool: ...
    def on_phase(self, text: str) -> None: ...


class NullReporter:
    """A reporter that ignores everything; subclass it and override what you need."""

    def on_step(self, step: int, loss: float, lr: float, seconds: float) -> None:
        pass

    def on_validation(self, step: int, metrics: dict[str, float], seconds: float) -> None:
        pass

    def on_checkpoint(self, kind: str, path: Path, step: int, metrics: dict[str, float]) -> None:
        pass

    def should_stop(self) -> bool:
        return False

    def on_phase(self, text: str) -> None:
        """What the trainer does now ("training", "validating slice 2 of 3"), for a progress display."""


@dataclass
class ListReporter(NullReporter):
    """Keeps everything in lists; ``stop_at`` asks the loop to stop once that step's loss is reported (losses
    arrive every :data:`unet.training.train.LOSS_EVERY` steps)."""

    steps: list[tuple[int, float]] = field(default_factory=list)
    validations: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    checkpoints: list[tuple[str, Path, int]] = field(default_factory=list)
    stop_at: int | None = None

    def on_step(self, step: int, loss: float, lr: float, seconds: float) -> None:
        self.steps.append((step, loss))

    def on_validation(self, step: int, metrics: dict[str, float], seconds: float) -> None:
        self.validations.append((step, metrics))

    def on_checkpoint(self, kind: str, path: Path, step: int, metrics: dict[str, float]) -> None:
        self.checkpoints.append((kind, path, step))

    def should_stop(self) -> bool:
        return self.stop_at is not None and bool(self.steps) and self.steps[-1][0] >= self.stop_at
