"""Training runs as records: submit one (with the exact mask versions it will train on), read them,
their metrics, progress, log, mask versions and lineage, ask one to stop or to go on (their checkpoints:
:mod:`storage.records.checkpoints`). Reads change nothing: noticing a
dead worker is :mod:`storage.jobs.queue`'s job, run by :mod:`storage.jobs.supervisor`. Functions take a
``Session`` (the caller owns the transaction) and return :mod:`domain.records`."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from domain.kinds import ACTIVE, RESUMABLE, MaskKind, RunKind, RunStatus
from domain.records import PlanRow, RunInfo, RunMaskInfo, RunProgress
from storage.models import Checkpoint, Dataset, MaskVersion, Metric, Run, RunMask, row_or_missing
from storage.records.datasets import dataset_row
from storage.records.files import FileStore
from storage.records.heldout import held_out, refuse_training_on_held_out
from storage.records.masks import latest_mask, load_mask, slice_kinds
from unet.network.config import TrainConfig
from unet.network.device import pick_device
from unet.prediction.metrics import MIN_NEURONS, scored_neurons
from unet.training.estimate import estimate_training
from unet.training.labels import MEMBRANE, NEURON

Curve = list[tuple[int, float, float]]  # (step, value, seconds since the run started)


def run_info(row: Run, train_seconds: float | None = None) -> RunInfo:
    return RunInfo(row.id, RunStatus(row.status), row.device, row.spec, row.config, row.created, row.started,
                   row.finished, row.error, row.pid, row.cancel_requested is not None, row.parent_checkpoint_id,
                   row.phase or "", train_seconds, RunKind(row.kind or RunKind.TRAIN), row.owner_id,
                   row.owner.username if row.owner else "")


def run_row(session: Session, run_id: int) -> Run:
    row = row_or_missing(session, Run, run_id, "run")
    return row


def _train_seconds(session: Session, run_ids: list[int]) -> dict[int, float]:
    if not run_ids:
        return {}
    rows = session.execute(select(Metric.run_id, func.max(Metric.time))
                           .where(Metric.run_id.in_(run_ids), Metric.key == "loss").group_by(Metric.run_id))
    return {run_id: float(t) for run_id, t in rows if t is not None}


def device_key(config: TrainConfig) -> str:
    """The device a run will hold: 'cpu', 'cuda:0', 'mps'. Resolved at submit time."""
    device = pick_device(config.device)
    if device.type == "cuda":
        return f"cuda:{device.index or 0}"
    return device.type


def default_split(session: Session, dataset_id: int, val_share: float = 0.15) -> tuple[list[int], list[int]]:
    """The labelled slices of a dataset, the last ~15% (at least one) kept for validation; the held-out
    slices, where the dataset has them, are the validation set and never train."""
    labelled = sorted(slice_kinds(session, dataset_id))
    frozen = held_out(session, dataset_id)
    if frozen is not None:
        return [z for z in labelled if z not in frozen.slices], list(frozen.slices)
    n_val = max(1, round(len(labelled) * val_share)) if len(labelled) > 1 else 0
    return labelled[:len(labelled) - n_val], labelled[len(labelled) - n_val:]


def training_estimate(session: Session, config: TrainConfig, val: list[dict[str, Any]]) -> str:
    """How long a run of ``config`` validating on ``val`` takes here, measured on this machine for this
    network and this data's size (see :mod:`unet.training.estimate`)."""
    shapes = []
    for part in val:
        dataset = dataset_row(session, part["dataset_id"])
        shapes += [(dataset.y, dataset.x)] * len(part["slices"])
    try:
        device = pick_device(config.device)
    except RuntimeError as exc:
        raise ValueError(str(exc)) from exc
    return estimate_training(config, shapes, "cpu" if device.type == "cpu" else str(device)).describe()


VAL_FEW_PIXELS = 20_000  # labelled pixels below which validation slices choose a run's best step by chance


def validation_note(session: Session, store: FileStore, val: list[dict[str, Any]]) -> str | None:
    """What the user should know about validation slices that cannot judge a run well (None: nothing): too few
    labelled pixels, one class only, or no slice that outlines two whole neurons (its neuron scores are none,
    and pixel error alone chooses the best step). They choose the run's best checkpoint, which Predict offers."""
    neuron = membrane = 0
    whole = False
    for part in val:
        dataset = dataset_row(session, part["dataset_id"])
        for z in part["slices"]:
            mask = latest_mask(session, dataset.id, z)
            if mask is None:
                continue
            target = load_mask(session, store, mask.id)
            neuron += int(np.count_nonzero(target == NEURON))
            membrane += int(np.count_nonzero(target == MEMBRANE))
            whole = whole or int(scored_neurons(target).max(initial=0)) >= MIN_NEURONS
    labelled = neuron + membrane
    if not val or labelled == 0:
        return None
    said = []
    if labelled < VAL_FEW_PIXELS:
        said.append(f"they hold only {labelled:,} labelled pixels")
    if not neuron or not membrane:
        said.append(f"every labelled pixel in them is {'membrane' if membrane else 'neuron'}")
    elif not whole:
        said.append("none of them outlines two whole neurons, so only pixel error can measure the run")
    if not said:
        return None
    return ("The validation slices choose this run's best checkpoint (the one Predict offers), but "
            + "; ".join(said) + ": the best may be chosen by chance. Label more of them, or choose others.")


def train_plan(session: Session, train: list[dict[str, Any]], val: list[dict[str, Any]]) -> list[PlanRow]:
    """Which mask version of each chosen slice a run would use ("none" where a slice has no mask yet)."""
    rows = []
    for role, parts in (("train", train), ("val", val)):
        for part in parts:
            dataset = dataset_row(session, part["dataset_id"])
            for z in part["slices"]:
                mask = latest_mask(session, dataset.id, z)
                rows.append(PlanRow(role, dataset.name, z, f"v{mask.version}" if mask else "none",
                                    mask.kind if mask else "", mask.labelled_pixels if mask else 0))
    return rows


def submit_training(session: Session, spec: dict[str, Any], config: TrainConfig,
                    parent_checkpoint_id: int | None = None) -> RunInfo:
    """Record a run: ``spec = {"train": [{"dataset_id": 1, "slices": [0, 1]}], "val": [...]}``. The latest
    mask version of every slice is looked up now and recorded, so the run trains on exactly what the user
    saw when pressing Train. :func:`storage.jobs.queue.start_queued` starts it once the transaction commits."""
    if not spec.get("train"):
        raise ValueError("choose at least one training slice")
    refuse_training_on_held_out(session, spec)
    if parent_checkpoint_id is not None:
        parent = row_or_missing(session, Checkpoint, parent_checkpoint_id, "checkpoint")
        if session.get(Run, parent.run_id).config.get("foreign"):
            raise ValueError(f"checkpoint {parent_checkpoint_id} is a TorchScript model imported from another tool: "
                             "it predicts, but it has no state dict to fine-tune; start from a Neuroseg model")
        parent_model = session.get(Run, parent.run_id).config.get("model")
        if parent_model is not None and parent_model != config.model.to_dict():
            raise ValueError("the checkpoint to fine-tune from is another network (width "
                             f"{parent_model.get('initial_features')}, depth {parent_model.get('depth')}, "
                             f"{parent_model.get('padding')} padding): choose its preset, or the same knobs")
    run = Run(status=RunStatus.QUEUED, spec=spec, config=config.to_dict(), device=device_key(config),
              parent_checkpoint_id=parent_checkpoint_id)
    session.add(run)
    session.flush()
    seen: set[int] = set()
    for role in ("train", "val"):
        for part in spec.get(role, []):
            dataset = dataset_row(session, part["dataset_id"])
            for z in part["slices"]:
                mask = latest_mask(session, dataset.id, z)
                if mask is None:
                    raise ValueError(f"slice {z} of '{dataset.name}' has no mask yet: annotate it or leave it out")
                if mask.id in seen:
                    raise ValueError(f"slice {z} of '{dataset.name}' is in both the training and validation sets")
                seen.add(mask.id)
                session.add(RunMask(run_id=run.id, mask_version_id=mask.id, role=role))
    session.flush()
    return run_info(run)


def cancel_run(session: Session, run_id: int) -> RunInfo:
    """Ask a run to stop. A queued run is cancelled at once; a running one stops at its next step (the
    supervisor terminates a worker that does not)."""
    run = run_row(session, run_id)
    if run.status == RunStatus.QUEUED:
        run.status, run.finished = RunStatus.CANCELLED, datetime.now(UTC)
    elif run.status == RunStatus.RUNNING and run.cancel_requested is None:
        run.cancel_requested = datetime.now(UTC)
    session.flush()
    return run_info(run)


def resume_run(session: Session, run_id: int) -> RunInfo:
    """Queue a CANCELLED, FAILED or LOST run again; its worker continues from ``latest``."""
    run = run_row(session, run_id)
    if run.status not in RESUMABLE:
        raise ValueError(f"run {run_id} is {run.status}; only cancelled, failed or lost runs can be resumed")
    run.status, run.cancel_requested, run.finished, run.pid = RunStatus.QUEUED, None, None, None
    session.flush()
    return run_info(run)


def get_run(session: Session, run_id: int) -> RunInfo:
    return run_info(run_row(session, run_id), _train_seconds(session, [run_id]).get(run_id))


def list_runs(session: Session, *, include_starter: bool = False) -> list[RunInfo]:
    """Every training run, newest first (and the shipped starter model's record, when asked)."""
    query = select(Run).order_by(Run.id.desc())
    if not include_starter:
        query = query.where(Run.kind != RunKind.STARTER)
    rows = list(session.scalars(query))
    seconds = _train_seconds(session, [r.id for r in rows])
    return [run_info(r, seconds.get(r.id)) for r in rows]


def count_runs(session: Session) -> tuple[int, int]:
    """(all runs, queued or running ones)."""
    total = session.scalar(select(func.count()).select_from(Run).where(Run.kind != RunKind.STARTER)) or 0
    active = session.scalar(select(func.count()).select_from(Run).where(Run.status.in_(ACTIVE))) or 0
    return int(total), int(active)


def run_metrics(session: Session, run_id: int, key: str) -> Curve:
    """(step, value, seconds) of one metric, in step order."""
    rows = session.execute(select(Metric.step, Metric.value, Metric.time)
                           .where(Metric.run_id == run_id, Metric.key == key).order_by(Metric.step))
    return [(int(step), float(value), float(t)) for step, value, t in rows]


def run_curves(session: Session, run_id: int) -> dict[str, Curve]:
    """Every metric of a run, {key: [(step, value, seconds), …]} in step order, in one query."""
    curves: dict[str, Curve] = {}
    rows = session.execute(select(Metric.key, Metric.step, Metric.value, Metric.time)
                           .where(Metric.run_id == run_id).order_by(Metric.key, Metric.step))
    for key, step, value, seconds in rows:
        curves.setdefault(key, []).append((int(step), float(value), float(seconds)))
    return curves


def run_progress(run: RunInfo, curves: dict[str, Curve]) -> RunProgress:
    """Steps done of all, the seconds so far, the estimated seconds left (the pace so far, validations
    included), what the worker does now, and where each start of the run began."""
    points = curves.get("loss", [])
    resumes = [(int(step), int(before)) for step, before, _ in curves.get("resume", [])]
    steps = int(run.config.get("steps", 0))
    phase = run.phase if run.active else ""
    if not points:
        return RunProgress(0, steps, 0.0, None, phase, resumes)
    step, _, seconds = points[-1]
    eta = (steps - step) * seconds / step if step > 0 and run.active else None
    budget = run.config.get("max_seconds")
    if eta is not None and budget:
        eta = min(eta, max(0.0, budget - seconds))
    ended = ""
    if run.status == RunStatus.FINISHED and 0 < step < steps and run.kind == RunKind.TRAIN:
        ended = (f"its time budget of {budget / 60:.3g} min ran out" if budget and seconds >= 0.9 * budget else
                 "its validation stopped improving (early stopping)" if run.config.get("early_stop_patience")
                 else "")
    return RunProgress(int(step), steps, float(seconds), eta, phase, resumes, ended)


def run_log(store: FileStore, run_id: int, lines: int = 30) -> str:
    """The last lines of the run's worker log ("" before it has one)."""
    path = store.worker_log(run_id)
    if not path.is_file():
        return ""
    with open(path, "rb") as fh:
        fh.seek(max(0, path.stat().st_size - 64_000))
        text = fh.read().decode(errors="replace")
    return "\n".join(text.splitlines()[-lines:])


def run_masks(session: Session, run_id: int) -> list[RunMaskInfo]:
    """The mask versions a run trained and validated on."""
    rows = session.execute(select(RunMask.role, MaskVersion, Dataset.name)
                           .join(MaskVersion, RunMask.mask_version_id == MaskVersion.id)
                           .join(Dataset, MaskVersion.dataset_id == Dataset.id)
                           .where(RunMask.run_id == run_id)
                           .order_by(RunMask.role.desc(), MaskVersion.dataset_id, MaskVersion.slice_index))
    return [RunMaskInfo(role, m.dataset_id, name, m.slice_index, m.version, MaskKind(m.kind), m.author,
                        m.labelled_pixels, m.id)
            for role, m, name in rows]


def lineage(session: Session, run_id: int) -> tuple[int | None, list[int]]:
    """(the run this one was fine-tuned from, the runs fine-tuned from one of this run's checkpoints)."""
    run = run_row(session, run_id)
    parent = session.get(Checkpoint, run.parent_checkpoint_id) if run.parent_checkpoint_id else None
    children = list(session.scalars(select(Run.id).join(Checkpoint, Run.parent_checkpoint_id == Checkpoint.id)
                                    .where(Checkpoint.run_id == run_id).order_by(Run.id)))
    return (parent.run_id if parent else None), children
