"""The shared queue of where to work next on a dataset (issue 29), as the pages see it."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime


def prediction_source(prediction_id: int) -> str:
    """What a queue item ranked from a finished prediction records as its source."""
    return f"prediction {int(prediction_id)}"


def live_source(run_id: int) -> str:
    """What a queue item ranked from a live session's predictions records as its source."""
    return f"live {int(run_id)}"


@dataclass(frozen=True)
class WorkItemInfo:
    """A region of a slice worth a correction, and what became of it."""

    id: int
    dataset_id: int
    slice_index: int
    box: tuple[int, int, int, int]  # (y0, x0, h, w) of the slice
    score: float
    reasons: str
    source: str  # what it was ranked from: "prediction 12", "live 7", "" (the slice has no prediction yet)
    created: datetime
    taken_by: str | None = None  # who pressed Next and got it
    taken_at: datetime | None = None
    done_by: str | None = None  # who saved a mask of the slice after taking it
    done_at: datetime | None = None
    mask_version_id: int | None = None

    @property
    def done(self) -> bool:
        return self.done_at is not None

    @property
    def prediction_id(self) -> int | None:
        """The finished prediction it was ranked from (None: a live session's, or none)."""
        kind, _, number = self.source.partition(" ")
        return int(number) if kind == "prediction" and number.isdigit() else None


@dataclass(frozen=True)
class WorkList:
    """A dataset's queue: the open items best first, the ones done (newest first), and when it was ranked."""

    dataset_id: int
    open: list[WorkItemInfo] = field(default_factory=list)
    done: list[WorkItemInfo] = field(default_factory=list)
    ranked: datetime | None = None  # when the open items were ranked (None: never)
