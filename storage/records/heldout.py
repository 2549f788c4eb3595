"""Held-out slices and scores: retraining that never silently regresses.

A dataset can freeze some labelled slices as held out: the exact mask versions are recorded, so a later
edit of such a slice does not move the goalposts, and changing the set is explicit and makes a new
version (scores compare only within a version). Held-out slices never train: submitting a run that trains
on one is refused, and a live session leaves them out. Every run that touched the dataset is scored on
them when it ends (its best weights, the same metrics as validation), and so is its parent checkpoint
when that has no score there yet (the starter model, a run of another dataset), so each run can be shown
against its parent and against the dataset's best. The best run can be promoted to the dataset's default
model: Predict and Live start from it."""

from __future__ import annotations

import math
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from domain.kinds import CheckpointKind, RunKind, RunStatus
from domain.records import UserError
from domain.scores import DECIDES, HeldOut, Score
from storage.models import Checkpoint, Dataset, MaskVersion, Run, RunMask, row_or_missing
from storage.records.datasets import load_volume
from storage.records.files import FileStore
from storage.records.masks import latest_mask, load_mask, slice_kinds
from unet.exchange.checkpoint import load_checkpoint
from unet.prediction.metrics import SCORING, mean_metrics
from unet.prediction.postprocess import DEFAULT_METHOD
from unet.prediction.segment import segment_stack

# how much worse than its parent or the best a run may score before it is flagged (noise on a few slices)
TOLERANCE = {"pixel_error": 0.002, "rand_f": 0.005, "vi": 0.02}
HIGHER_IS_BETTER = {"pixel_error": False, "rand_f": True, "vi": False}


def held_out(session: Session, dataset_id: int) -> HeldOut | None:
    dataset = row_or_missing(session, Dataset, dataset_id, "dataset")
    if not dataset.held_out:
        return None
    return HeldOut(dataset.held_out_version, [int(h["slice"]) for h in dataset.held_out],
                   [int(h["mask_id"]) for h in dataset.held_out])


def set_held_out(session: Session, dataset_id: int, slices: list[int]) -> HeldOut | None:
    """Freeze ``slices`` (their latest mask versions) as the dataset's held-out set, a new version; an
    empty list removes the set."""
    dataset = row_or_missing(session, Dataset, dataset_id, "dataset")
    frozen = []
    for z in sorted(set(slices)):
        if not 0 <= z < dataset.z:
            raise UserError(f"slice {z} is not in '{dataset.name}' (slices 0–{dataset.z - 1})")
        mask = latest_mask(session, dataset_id, z)
        if mask is None:
            raise UserError(f"slice {z} has no mask yet: only labelled slices can be held out")
        frozen.append({"slice": z, "mask_id": mask.id})
    if frozen and len(frozen) >= len(_labelled(session, dataset_id)):
        raise UserError("holding out every labelled slice leaves nothing to train on: keep at least one")
    if [h["mask_id"] for h in frozen] == [h["mask_id"] for h in (dataset.held_out or [])]:
        return held_out(session, dataset_id)
    dataset.held_out = frozen or None
    dataset.held_out_version = (dataset.held_out_version or 0) + 1
    session.flush()
    return held_out_seen(session, dataset_id)


def held_out_seen(session: Session, dataset_id: int) -> HeldOut | None:
    """The held-out set with, for each of its slices, the runs that saw it (their scores leave it out)."""
    frozen = held_out(session, dataset_id)
    if frozen is None:
        return None
    return HeldOut(frozen.version, frozen.slices, frozen.mask_ids, runs_that_saw(session, dataset_id, frozen.slices))


def _labelled(session: Session, dataset_id: int) -> list[int]:
    return sorted(slice_kinds(session, dataset_id))


def refuse_training_on_held_out(session: Session, spec: dict[str, Any]) -> None:
    for part in spec.get("train", []):
        frozen = held_out(session, part["dataset_id"])
        clash = sorted(set(part["slices"]) & set(frozen.slices)) if frozen else []
        if clash:
            name = session.get(Dataset, part["dataset_id"]).name
            raise UserError(f"slice(s) {', '.join(map(str, clash))} of '{name}' are held out for scoring: leave "
                            "them out of training (or change the held-out slices on Datasets)")


def lineage_runs(session: Session, run: Run) -> list[Run]:
    """The run, the run it was fine-tuned from, that run's parent, and so on."""
    out, seen, current = [], set(), run
    while current is not None and current.id not in seen:
        seen.add(current.id)
        out.append(current)
        current = _parent_run(session, current)
    return out


def seen_slices(session: Session, run: Run, dataset_id: int) -> set[int]:
    """The dataset's slices that the run or a run it descends from trained on (any version of their masks):
    a score on them is not a score on unseen data. (Validating on a slice only picks the checkpoint: the
    held-out slices are every run's validation set by default, :func:`storage.records.runs.default_split`.)"""
    ids = [r.id for r in lineage_runs(session, run)]
    return set(session.scalars(select(MaskVersion.slice_index).join(RunMask, RunMask.mask_version_id == MaskVersion.id)
                               .where(RunMask.run_id.in_(ids), RunMask.role == "train",
                                      MaskVersion.dataset_id == dataset_id)))


def checkpoint_trained_on(session: Session, checkpoint_id: int, dataset_id: int) -> list[int]:
    """The dataset's slices a checkpoint's run, or a run it descends from, trained on."""
    checkpoint = session.get(Checkpoint, checkpoint_id)
    run = session.get(Run, checkpoint.run_id) if checkpoint is not None else None
    return sorted(seen_slices(session, run, dataset_id)) if run is not None else []


ISBI_TRAINING = ("train-volume.tif", (30, 512, 512))  # the stack the starter model trained on, all of it


def trained_elsewhere(session: Session, checkpoint_id: int, dataset_id: int) -> str:
    """What a checkpoint's lineage trained on outside this store's records, as far as it touches this
    dataset: "" when every run of it trained here (its slices are :func:`checkpoint_trained_on`). An imported
    model (or one fine-tuned from it) trained on data nobody recorded here; the starter model trained on every
    slice of the ISBI 2012 training stack, so on that stack no slice is unseen."""
    checkpoint = session.get(Checkpoint, checkpoint_id)
    run = session.get(Run, checkpoint.run_id) if checkpoint is not None else None
    kinds = {r.kind for r in lineage_runs(session, run)} if run is not None else set()
    if RunKind.IMPORTED in kinds:
        return ("came from outside (an imported model, or fine-tuned from one): which of these slices it trained "
                "on is not known here")
    dataset = session.get(Dataset, dataset_id)
    if RunKind.STARTER in kinds and dataset is not None and \
            (dataset.source_name, (dataset.z, dataset.y, dataset.x)) == ISBI_TRAINING:
        return "starts from the starter model, which trained on every slice of the ISBI 2012 training stack: this one"
    return ""


def runs_that_saw(session: Session, dataset_id: int, slices: list[int]) -> dict[int, list[int]]:
    """slice → the runs that trained on it, directly or through a run they descend from."""
    direct: dict[int, set[int]] = {}  # run → the slices it saw itself
    for run_id, z in session.execute(select(RunMask.run_id, MaskVersion.slice_index)
                                     .join(MaskVersion, RunMask.mask_version_id == MaskVersion.id)
                                     .where(RunMask.role == "train", MaskVersion.dataset_id == dataset_id,
                                            MaskVersion.slice_index.in_(list(slices)))):
        direct.setdefault(run_id, set()).add(z)
    out: dict[int, list[int]] = {}
    if not direct:
        return out
    for run in session.scalars(select(Run).order_by(Run.id)):
        saw = set().union(*(direct.get(r.id, set()) for r in lineage_runs(session, run)))
        for z in sorted(saw):
            out.setdefault(z, []).append(run.id)
    return out


def _datasets_of(run: Run) -> list[int]:
    if run.kind == RunKind.LIVE:
        return [int(run.spec["dataset_id"])]
    return sorted({int(p["dataset_id"]) for role in ("train", "val") for p in run.spec.get(role, [])})


def _weights(session: Session, run_id: int) -> Checkpoint | None:
    rows = {c.kind: c for c in session.scalars(select(Checkpoint).where(Checkpoint.run_id == run_id))}
    return rows.get(CheckpointKind.BEST) or rows.get(CheckpointKind.LATEST)


def _score_checkpoint(session: Session, store: FileStore, checkpoint: Checkpoint, dataset_id: int,
                      frozen: HeldOut, device: str = "cpu") -> dict[str, float]:
    volume = load_volume(session, store, dataset_id)
    targets = {z: load_mask(session, store, m) for z, m in zip(frozen.slices, frozen.mask_ids, strict=True)}
    model = load_checkpoint(store.verified(checkpoint.file, checkpoint.sha256)).build_model(device)
    result = segment_stack(model, volume, frozen.slices, targets=targets, with_instances=False)
    return {z: {k: (float(v) if isinstance(v, int | float) else v) for k, v in m.items()}  # (and the ISBI curves)
            for z, m in (result.metrics or {}).get("slices", {}).items()}


def _record(run: Run, dataset_id: int, frozen: HeldOut, checkpoint: Checkpoint,
            per_slice: dict[str, dict[str, float]]) -> None:
    scores = dict(run.held_out or {})
    scores[str(dataset_id)] = {"version": frozen.version, "slices": frozen.slices, "step": checkpoint.step,
                               "checkpoint_id": checkpoint.id, "per_slice": per_slice,
                               "metrics": mean_metrics(list(per_slice.values())), "postprocess": DEFAULT_METHOD,
                               "scoring": SCORING}
    run.held_out = scores  # a new dict: the JSON column sees the change


def score_run(sessions: sessionmaker[Session], store: FileStore, run_id: int, device: str = "cpu") -> int:
    """Score a run (and its parent, where that has no score yet) on the held-out slices of every dataset
    it touched. Returns how many scores were written."""
    written = 0
    with sessions.begin() as s:
        run = s.get(Run, run_id)
        if run is None:
            raise LookupError(f"run {run_id} does not exist")
        for dataset_id in _datasets_of(run):
            frozen = held_out(s, dataset_id) if s.get(Dataset, dataset_id) is not None else None
            if frozen is None:
                continue
            for subject in (run, _parent_run(s, run)):
                if subject is None or _score_of(subject, dataset_id, frozen.version) is not None:
                    continue
                weights = (s.get(Checkpoint, run.parent_checkpoint_id) if subject is not run
                           else _weights(s, subject.id))
                if weights is None:
                    continue
                _record(subject, dataset_id, frozen, weights, _score_checkpoint(s, store, weights, dataset_id, frozen,
                                                                                device))
                written += 1
    return written


def _parent_run(session: Session, run: Run) -> Run | None:
    if run.parent_checkpoint_id is None:
        return None
    parent = session.get(Checkpoint, run.parent_checkpoint_id)
    return session.get(Run, parent.run_id) if parent is not None else None


def _score_of(run: Run, dataset_id: int, version: int) -> dict[str, dict[str, float]] | None:
    """The run's scores slice by slice on this held-out version, made with today's post-processing and
    today's definitions of the scores (Rand-F and VI depend on how instances are made, and which neurons
    count: a score from before either changed is not compared, it is redone; so is one kept only as a mean,
    from before scores were kept slice by slice)."""
    entry = (run.held_out or {}).get(str(dataset_id))
    if not entry or entry.get("version") != version or not entry.get("per_slice"):
        return None
    if entry.get("scoring", 1) != SCORING:
        return None
    return entry["per_slice"] if entry.get("postprocess", "watershed") == DEFAULT_METHOD else None


def _mean_on(per_slice: dict[str, dict[str, float]] | None, slices: list[int]) -> dict[str, float] | None:
    rows = [per_slice[str(z)] for z in slices if per_slice and str(z) in per_slice]
    return mean_metrics(rows) if rows and len(rows) == len(slices) else None


def worse(metrics: dict[str, float], reference: dict[str, float] | None) -> list[str]:
    """The metrics on which ``metrics`` is worse than ``reference`` by more than the tolerance."""
    if not reference:
        return []
    out = []
    for key, tolerance in TOLERANCE.items():
        if key in metrics and key in reference:
            delta = metrics[key] - reference[key]
            if (-delta if HIGHER_IS_BETTER[key] else delta) > tolerance:
                out.append(key)
    return out


def run_scores(session: Session, run: Run) -> dict[str, dict[str, Any]]:
    """A run's held-out scores (dataset id → measured on which slices, which it saw and left out, the
    metrics on the rest), as its model card shows them: never a mean over slices its lineage saw."""
    out = {}
    for key, entry in (run.held_out or {}).items():
        per_slice = entry.get("per_slice") or {}
        if not per_slice:
            continue
        seen = seen_slices(session, run, int(key)) & {int(z) for z in per_slice}
        clean = sorted(int(z) for z in per_slice if int(z) not in seen)
        out[key] = {"version": entry.get("version"), "slices": clean, "seen": sorted(seen),
                    "metrics": _mean_on(per_slice, clean) or {}}
    return out


def _rank(metrics: dict[str, float]) -> tuple[float, float]:
    """Which run is best: the deciding metric, then pixel error; a score that is missing or NaN (no slice had
    enough whole neurons for it) ranks last, never at random."""
    def known(key: str) -> float | None:
        value = metrics.get(key)
        return float(value) if isinstance(value, int | float) and math.isfinite(value) else None

    value, pixel = known(DECIDES), known("pixel_error")
    return (-math.inf if value is None else value if HIGHER_IS_BETTER[DECIDES] else -value,
            -math.inf if pixel is None else -pixel)


def scores(session: Session, dataset_id: int) -> list[Score]:
    """Every run's score on the dataset's current held-out version, newest first, with its comparisons.
    Each score leaves out the held-out slices the run's lineage saw; the best is chosen among runs that
    saw none, and a run is compared with its parent and the best on the slices the run never saw."""
    frozen = held_out(session, dataset_id)
    if frozen is None:
        return []
    runs = list(session.scalars(select(Run).order_by(Run.id.desc())))
    per_slice = {r.id: m for r in runs if (m := _score_of(r, dataset_id, frozen.version)) is not None}
    seen = {r.id: sorted(seen_slices(session, r, dataset_id) & set(frozen.slices)) for r in runs if r.id in per_slice}
    clean = {i: [z for z in frozen.slices if z not in seen[i]] for i in per_slice}
    finished = {r.id for r in runs if r.status == RunStatus.FINISHED or r.kind == RunKind.STARTER}
    full = {i: m for i in per_slice if i in finished and not seen[i]
            and (m := _mean_on(per_slice[i], frozen.slices)) is not None}
    best_id = max(full, key=lambda i: _rank(full[i]), default=None)
    # (no run has the deciding metric: pixel error chose)
    decides = DECIDES if best_id is None or _rank(full[best_id])[0] != -math.inf else "pixel_error"
    out = []
    for run in runs:
        if run.id not in per_slice:
            continue
        slices = clean[run.id]
        metrics = _mean_on(per_slice[run.id], slices) or {}
        parent = _parent_run(session, run)
        parent_metrics = _mean_on(per_slice.get(parent.id), slices) if parent is not None and slices else None
        best = (_mean_on(per_slice[best_id], slices) if best_id is not None and best_id != run.id and slices
                else None)
        out.append(Score(run.id, dataset_id, frozen.version, metrics, parent_metrics, best,
                         best_id, worse(metrics, parent_metrics), worse(metrics, best), tuple(slices),
                         tuple(seen[run.id]), decides))
    return out


def promote(session: Session, dataset_id: int, checkpoint_id: int | None) -> None:
    """Make a checkpoint the dataset's default model (None: back to the starter model or the newest)."""
    dataset = row_or_missing(session, Dataset, dataset_id, "dataset")
    if checkpoint_id is not None:
        row_or_missing(session, Checkpoint, checkpoint_id, "checkpoint")
    dataset.default_checkpoint_id = checkpoint_id
    session.flush()


def default_model(session: Session, dataset_id: int) -> int | None:
    """The dataset's promoted checkpoint, when it still exists."""
    dataset = session.get(Dataset, dataset_id)
    if dataset is None or dataset.default_checkpoint_id is None:
        return None
    return dataset.default_checkpoint_id if session.get(Checkpoint, dataset.default_checkpoint_id) else None
