"""What a live session looks like from outside the store: the session as the Annotate page shows it, and one
live prediction of a slice."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

import numpy as np

from domain.records import RunInfo

Region = tuple[int, int, int, int]  # (y0, x0, h, w) of a slice


@dataclass(frozen=True)
class LiveInfo:
    """A live session as the Annotate page shows it."""

    run: RunInfo
    dataset_id: int
    learned: int  # mask versions it has taken into its training set
    viewers: list[str]  # who has the session open (seen in the last two minutes)
    paused_for: int | None  # the normal run it yields the device to, while paused
    names: dict[str, str] = field(default_factory=dict)  # viewer ("user:<id>") → user name

    @property
    def run_id(self) -> int:
        return self.run.id


@dataclass(frozen=True)
class LivePrediction:
    run_id: int
    slice_index: int
    step: int
    masks_seen: int
    created: datetime
    probabilities: np.ndarray  # float32 in [0, 1], the neuron probability
    region: Region | None = None  # only this region is from ``step``'s weights (None: the whole slice)
    partial: bool = False  # the rest of the slice has never been predicted (it reads 0.5: not an answer)
    uncertainty: np.ndarray | None = None  # float32 in [0, 1]: how much the last weights changed it (or its doubt)
