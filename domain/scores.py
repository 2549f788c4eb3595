"""Held-out scores as they leave the store: a dataset's frozen held-out slices and a run's score on them, with
what it is compared to and which slices it leaves out (those its lineage trained on)."""

from __future__ import annotations

from dataclasses import dataclass, field

DECIDES = "rand_f"  # which metric picks the best run (pixel error breaks a tie): 1 − the adapted Rand error


@dataclass(frozen=True)
class HeldOut:
    version: int
    slices: list[int]
    mask_ids: list[int]
    seen_by: dict[int, list[int]] = field(default_factory=dict)  # slice → runs whose lineage trained on it


@dataclass(frozen=True)
class Score:
    """A run's held-out score on one dataset, with what it is compared to."""

    run_id: int
    dataset_id: int
    version: int
    metrics: dict[str, float]
    parent: dict[str, float] | None  # the parent checkpoint's score on the same slices, if any
    best: dict[str, float] | None  # the dataset's best run's score (this version)
    best_run_id: int | None
    worse_than_parent: list[str]  # metrics beyond tolerance
    worse_than_best: list[str]
    slices: tuple[int, ...] = ()  # the held-out slices this score is measured on
    seen: tuple[int, ...] = ()  # held-out slices left out: the run or a run it descends from trained on them
    decides: str = DECIDES  # the metric that chose the best run (pixel error where no run had DECIDES)

    @property
    def honest(self) -> bool:
        """Measured on every held-out slice, none of which the run's lineage saw (may be the best)."""
        return not self.seen and bool(self.slices)

    @property
    def flagged(self) -> bool:
        return bool(self.worse_than_parent)
