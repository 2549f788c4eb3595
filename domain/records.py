"""What crosses the store's boundary: frozen records (never ORM rows) and the errors a caller can act on.
Every module of ``storage`` returns these; the pages and ``ui`` see nothing else (the statuses and kinds they
carry are :mod:`domain.kinds`)."""

from __future__ import annotations

from dataclasses import astuple, dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import numpy as np

from domain.kinds import ACTIVE, CheckpointKind, MaskKind, PredictionStage, RunKind, RunStatus


# --- errors --------------------------------------------------------------------------------------------
class NotFound(LookupError):
    """No row with that id (deleted meanwhile, or never there)."""


class MaskConflict(RuntimeError):
    """A save was based on a version that is no longer the latest of its slice."""


class UserError(RuntimeError):
    """Something the user can fix; the message says what and how."""


class DraftClash(UserError):
    """The kept draft of a slice is not the one this edit last kept or loaded: another tab or browser of the
    same user changed it meanwhile (``changed_pixels`` changed, at ``updated``). Nothing was overwritten."""

    def __init__(self, message: str, changed_pixels: int, updated: datetime):
        super().__init__(message)
        self.changed_pixels, self.updated = changed_pixels, updated


class ChannelsQuestion(UserError):
    """A grey file holds one stack axis named "channels": are they Z slices? Ask, then import again with
    ``channels_as_z=True``."""

    def __init__(self, message: str, count: int):
        super().__init__(message)
        self.count = count


class AlreadyLoaded(UserError):
    """The sample asked for is already in the store (as ``dataset_id``)."""

    def __init__(self, message: str, dataset_id: int):
        super().__init__(message)
        self.dataset_id = dataset_id


def aware(t: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes: they are UTC."""
    return t if t is None or t.tzinfo else t.replace(tzinfo=UTC)


# --- datasets and masks --------------------------------------------------------------------------------
@dataclass(frozen=True)
class DatasetInfo:
    id: int
    name: str
    shape: tuple[int, int, int]
    dtype: str
    source_name: str
    pixel_size_nm: float | None
    sha256: str
    size_bytes: int
    created: datetime
    notes: str
    labelled_slices: int
    owner_id: int | None = None  # the user who made it (None: made before accounts, or by the system)
    owner: str = ""  # their user name


@dataclass(frozen=True)
class MaskInfo:
    id: int
    dataset_id: int
    slice_index: int
    version: int
    kind: MaskKind
    author: str
    parent_id: int | None
    labelled_pixels: int
    created: datetime
    restored_from_id: int | None = None  # a restore: the old version it copies
    tools: tuple[str, ...] = ()  # domain.kinds.Tool values: what made it (none known for versions saved before)


@dataclass(frozen=True)
class DraftStart:
    """What an edit of a slice starts from: a saved version, a prediction, or nothing."""

    dataset_id: int
    slice_index: int
    source: str  # latest | uploaded | prediction | nothing
    source_mask_id: int | None  # the version the edit starts from: the saved version's parent
    source_kind: str | None  # that version's kind ("prediction" for a prediction), None for nothing
    latest_id: int | None  # the slice's latest version now: a save checks it is still so
    mask: np.ndarray
    prediction_id: int | None = None


class DraftLike(Protocol):
    """An edit as the service keeps and saves it (the Annotate page's draft is one)."""

    dataset_id: int
    slice_index: int
    source: str
    source_mask_id: int | None
    latest_id: int | None
    prediction_id: int | None
    kind: str
    original: np.ndarray
    working: np.ndarray
    kept_as: str  # the token of the kept draft this edit last kept or loaded ("" none)

    @property
    def tools(self) -> tuple[str, ...]: ...

    @property
    def changed_pixels(self) -> int: ...

    def saved(self, mask_id: int, kind: str) -> None: ...


@dataclass(frozen=True)
class StoredDraft:
    """A kept edit: where it is, what it started from, and (when loaded) its two masks."""

    dataset_id: int
    slice_index: int
    owner: str
    source: str
    source_mask_id: int | None
    latest_id: int | None
    prediction_id: int | None
    kind: str
    changed_pixels: int
    updated: datetime
    original: np.ndarray | None = None
    working: np.ndarray | None = None
    token: str = ""  # written with every keep: what an edit that loads it keeps over (see DraftClash)
    tools: tuple[str, ...] = ()  # what made it so far (a version saved from it lists them)


# --- runs ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunInfo:
    id: int
    status: RunStatus
    device: str
    spec: dict[str, Any]
    config: dict[str, Any]
    created: datetime
    started: datetime | None
    finished: datetime | None
    error: str | None
    pid: int | None
    cancel_requested: bool
    parent_checkpoint_id: int | None = None
    phase: str = ""  # what the worker does now: "training", "validating slice 2 of 3"
    train_seconds: float | None = None  # training time over every start of the run (resumes included)
    kind: RunKind = RunKind.TRAIN
    owner_id: int | None = None  # the user who made it (None: made before accounts, or by the system)
    owner: str = ""  # their user name

    @property
    def active(self) -> bool:
        return self.status in ACTIVE

    @property
    def preset(self) -> str:
        return str(self.spec.get("preset", ""))

    @property
    def dataset_ids(self) -> list[int]:
        ids = {p["dataset_id"] for role in ("train", "val") for p in self.spec.get(role, [])}
        if "dataset_id" in self.spec:  # a live session's dataset
            ids.add(int(self.spec["dataset_id"]))
        return sorted(ids)

    @property
    def duration_s(self) -> float | None:
        """How long it trained: the trainer's own clock, which carries on over resumes; else the wall
        time of its (last) start."""
        if self.train_seconds is not None:
            return self.train_seconds
        if self.started is None:
            return None
        end = aware(self.finished) or datetime.now(UTC)
        return (end - aware(self.started)).total_seconds()


@dataclass(frozen=True)
class CheckpointInfo:
    id: int
    run_id: int
    kind: CheckpointKind
    step: int
    file: str
    sha256: str
    metrics: dict[str, float]
    run_status: RunStatus | None = None
    preset: str = ""
    run_kind: RunKind = RunKind.TRAIN
    name: str = ""  # given on the Models page
    notes: str = ""


@dataclass(frozen=True)
class RunMaskInfo:
    """One mask version a run trained (role "train") or validated ("val") on."""

    role: str
    dataset_id: int
    dataset: str
    slice: int
    version: int
    kind: str
    author: str
    labelled_pixels: int
    mask_id: int


@dataclass(frozen=True)
class PlanRow:
    """One chosen slice of a run about to be submitted: which version it would train on."""

    role: str
    dataset: str
    slice: int
    version: str  # "v3", or "none" where the slice has no mask yet
    kind: str
    labelled_pixels: int


@dataclass(frozen=True)
class RunProgress:
    """Where a training run is: steps done of all, seconds so far, and the estimated seconds left."""

    step: int
    steps: int
    seconds: float
    eta_s: float | None
    phase: str = ""  # "training", "validating slice 2 of 3" (while active)
    resumes: list[tuple[int, int]] = field(default_factory=list)  # (step it went on from, step it had reached)
    ended_early: str = ""  # why a finished run ended before its steps: "its time budget of 1.5 min ran out"


@dataclass(frozen=True)
class RunSnapshot:
    """A run as a page polls it: the record, where it is, and its curves (one transaction)."""

    run: RunInfo
    progress: RunProgress
    curves: dict[str, list[tuple[int, float, float]]]


# --- predictions ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PredictionInfo:
    id: int
    checkpoint_id: int
    run_id: int
    dataset_id: int
    slices: list[int]
    status: RunStatus
    done: int
    error: str | None
    metrics: dict[str, Any] | None
    created: datetime
    pid: int | None = None
    stage: PredictionStage = PredictionStage.STARTING
    total: int = 0  # blocks in all (a block: one slice, or one tile of a slice larger than a tile); ``done`` written
    postprocess: str = "watershed"  # how its neurons were made from the map (unet.prediction.postprocess.METHODS)
    owner_id: int | None = None  # the user who made it (None: made before accounts, or by the system)
    owner: str = ""  # their user name
    tta: bool = False  # the network's answers averaged over the 8 flips of each tile
    device: str = ""  # where it computes: "cpu", "cuda" or "dask" ("": not started yet, or made before it was kept)
    stopping: bool = False  # asked to stop, and still at work (it stops after the block it is on)

    @property
    def active(self) -> bool:
        return self.status in ACTIVE


# --- users -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class UserInfo:
    id: int
    username: str
    display_name: str
    email: str
    role: str  # admin | annotator | viewer
    single_sign_on: bool  # made by a single sign-on (signs in there, not with a password)
    has_password: bool
    must_change_password: bool
    disabled: bool
    max_queued_runs: int
    created: datetime
    last_sign_in: datetime | None
    stopped: tuple[str, ...] = ()  # what the change just made stopped ("run 4", "live session 5"): a viewer trains not


# --- the store at a glance, deletions ------------------------------------------------------------------
@dataclass(frozen=True)
class Overview:
    datasets: int
    runs: int
    active_runs: int
    device: str  # "NVIDIA H100 80GB HBM3", "CPU only (2 threads)"
    gpu: bool = False


@dataclass(frozen=True)
class Deleted:
    """What a deletion removes (its preview) or removed."""

    datasets: int = 0
    mask_versions: int = 0
    runs: int = 0
    checkpoints: int = 0
    files: int = 0
    predictions: int = 0
    others: tuple[str, ...] = ()  # another user's runs and predictions it takes ("run 5 (bob)"): the admin's to delete
    refused: str = ""  # why the signed-in user may not do it for that reason (a preview says it; the delete refuses)

    def __add__(self, other: Deleted) -> Deleted:
        return Deleted(*(a + b for a, b in zip(astuple(self), astuple(other), strict=True)))

    def describe(self) -> str:
        parts = [f"{n:,} {label}{'s' if n != 1 else ''}" for n, label in (
            (self.datasets, "dataset"), (self.mask_versions, "mask version"), (self.runs, "run"),
            (self.checkpoints, "checkpoint"), (self.predictions, "prediction"), (self.files, "file")) if n]
        return ", ".join(parts) or "nothing"
