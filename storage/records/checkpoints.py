"""Checkpoints as records: read them, name them, their model card, their file checked against its checksum,
and one exported as a BioImage.IO package with its README. Functions take a ``Session`` (the caller owns
the transaction) and return :mod:`domain.records`."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from domain.kinds import CheckpointKind, RunKind, RunStatus
from domain.records import CheckpointInfo
from storage.models import Checkpoint, Dataset, MaskVersion, Run, RunMask, row_or_missing
from storage.records.datasets import load_volume
from storage.records.files import FileStore
from storage.records.heldout import run_scores
from storage.records.runs import run_info, run_masks
from unet.exchange.bioimageio import (
    ISBI_CITE,
    UNET_CITE,
    ExportInfo,
    PackageError,
    card_text,
    code_block,
    package_bytes,
    spec_name,
)
from unet.exchange.checkpoint import load_checkpoint
from unet.training.labels import offset_words
from unet.training.synthetic import make_synthetic_em


def _checkpoint_info(c: Checkpoint, run: Run | None = None) -> CheckpointInfo:
    return CheckpointInfo(c.id, c.run_id, CheckpointKind(c.kind), c.step, c.file, c.sha256, dict(c.metrics or {}),
                          RunStatus(run.status) if run is not None else None,
                          str(run.spec.get("preset", "")) if run is not None else "",
                          RunKind(run.kind or RunKind.TRAIN) if run is not None else RunKind.TRAIN, c.name or "",
                          c.notes or "")


def update_checkpoint(session: Session, checkpoint_id: int, name: str | None = None,
                      notes: str | None = None) -> CheckpointInfo:
    row = row_or_missing(session, Checkpoint, checkpoint_id, "checkpoint")
    if name is not None:
        row.name = " ".join(name.split())[:200]
    if notes is not None:
        row.notes = notes[:10_000]
    return _checkpoint_info(row, session.get(Run, row.run_id))


def model_card(session: Session, store: FileStore, checkpoint_id: int) -> dict[str, Any]:
    """What the Models page shows of a checkpoint beside its run's mask versions
    (:func:`storage.records.runs.run_masks`): its run, the recipe, its scores on held-out slices, its parent
    and its size on disk."""
    row = row_or_missing(session, Checkpoint, checkpoint_id, "checkpoint")
    run = session.get(Run, row.run_id)
    parent = session.get(Checkpoint, run.parent_checkpoint_id) if run.parent_checkpoint_id else None
    try:
        size = store.abspath(row.file).stat().st_size
    except (OSError, ValueError):
        size = 0
    return {
        "checkpoint": _checkpoint_info(row, run), "run": run_info(run), "size_bytes": size,
        "recipe": shown_recipe(run, row.step), "held_out": run_scores(session, run),
        "parent": {"checkpoint_id": parent.id, "run_id": parent.run_id, "kind": parent.kind} if parent else None,
        "source": (run.spec or {}).get("source", ""),
    }


def checkpoints(session: Session, run_id: int | None = None) -> list[CheckpointInfo]:
    """The checkpoints of one run (oldest first), or of every run (newest run first), in one query."""
    query = select(Checkpoint, Run).join(Run, Checkpoint.run_id == Run.id)
    if run_id is not None:
        query = query.where(Checkpoint.run_id == run_id)
    return [_checkpoint_info(c, r) for c, r in session.execute(query.order_by(Run.id.desc(), Checkpoint.id))]


def checkpoint_bytes(session: Session, store: FileStore, checkpoint_id: int) -> bytes:
    """The checkpoint file, checked against its recorded checksum."""
    row = row_or_missing(session, Checkpoint, checkpoint_id, "checkpoint")
    return store.verified(row.file, row.sha256).read_bytes()


def shown_recipe(run: Run, step: int | None = None) -> dict[str, Any]:
    """A run's recipe as a card shows it: a live session trains until it is stopped, so its step budget
    and its validation and checkpoint intervals (placeholders of 10¹²) are said in words."""
    recipe = dict(run.config or {})
    if run.kind == RunKind.LIVE:
        for key in ("steps", "val_every", "checkpoint_every"):
            if isinstance(recipe.get(key), int) and recipe[key] >= 10**9:
                recipe[key] = "until stopped (a live session)" if key == "steps" else "—"
        if step is not None:
            recipe["steps_done"] = step
    return recipe


def export_source(session: Session, checkpoint_id: int) -> tuple[Dataset, int] | None:
    """The dataset and slice a package's test image and cover would be cut from, with the user's consent:
    the first slice the run trained on (None: it trained on no dataset here)."""
    row = row_or_missing(session, Checkpoint, checkpoint_id, "checkpoint")
    first = session.execute(select(MaskVersion.dataset_id, MaskVersion.slice_index)
                            .join(RunMask, RunMask.mask_version_id == MaskVersion.id)
                            .where(RunMask.run_id == row.run_id, RunMask.role == "train")
                            .order_by(MaskVersion.dataset_id, MaskVersion.slice_index)).first()
    if first is None:
        return None
    dataset = session.get(Dataset, first[0])
    return (dataset, int(first[1])) if dataset is not None else None


def export_model(session: Session, store: FileStore, checkpoint_id: int, authors: list[str],
                 with_data: bool = False) -> tuple[bytes, str]:
    """A checkpoint as a BioImage.IO package (bytes, file name), validated by ``bioimageio.spec`` and
    tested by ``bioimageio.core`` (:mod:`unet.exchange.bioimageio`). Its test tensors and cover are a synthetic EM
    slice, or with ``with_data`` (the user agreed: unpublished data leaves with the package) a crop of the
    first slice the run trained on (:func:`export_source`); it cites the ISBI 2012 data for a model
    trained on it."""
    row = row_or_missing(session, Checkpoint, checkpoint_id, "checkpoint")
    run = session.get(Run, row.run_id)
    checkpoint = load_checkpoint(store.verified(row.file, row.sha256))
    source = export_source(session, checkpoint_id)
    dataset = source[0] if source is not None else None
    if with_data and source is not None:
        image = np.asarray(load_volume(session, store, dataset.id)[source[1]])
    else:
        image = make_synthetic_em((1, 320, 320), np.random.default_rng(0), cell_size=20)[0][0]
    isbi = run.kind == RunKind.STARTER or (dataset is not None
                                           and "isbi" in (dataset.name + dataset.source_name).lower())
    what = "the starter model" if run.kind == RunKind.STARTER else f"run {run.id}"
    info = ExportInfo(
        name=spec_name(row.name or "", f"Neuroseg {what} ({row.kind} step {row.step})"),  # (the card's name)
        description=(f"A U-Net that maps an EM slice to its neuron (1 - membrane) probability: the {row.kind} "
                     f"checkpoint of {what}, trained with Neuroseg."),
        authors=authors or ["Neuroseg"], cite=[UNET_CITE, ISBI_CITE] if isbi else [UNET_CITE],
        pixel_size_nm=dataset.pixel_size_nm if dataset is not None else None,
        documentation=_model_card(session, run, row, what, checkpoint.meta.get("label_offset")))
    try:
        data, _ = package_bytes(checkpoint, image, info)
    except PackageError as exc:
        raise ValueError(str(exc)) from None
    return data, f"neuroseg-{'starter' if run.kind == 'starter' else f'run-{run.id}'}-{row.kind}.bioimageio.zip"


def _model_card(session: Session, run: Run, row: Checkpoint, what: str, label_offset=None) -> str:
    """The exported README (Markdown, which model hubs render with HTML): every piece of user text (the
    model's name and notes, dataset names) through ``card_text``, the recipe in a code block no text in it
    can close, so that no tag, image or link reaches a reader from what a user typed."""
    masks = [f"- {m.role}: {card_text(m.dataset)} (dataset {m.dataset_id}), slice {m.slice}, mask version "
             f"{m.version} ({m.kind})" for m in run_masks(session, run.id)]
    scores = ", ".join(f"{k} {v:.4f}" for k, v in sorted((row.metrics or {}).items()) if isinstance(v, int | float))
    named = [f"**{card_text(row.name)}**", ""] if row.name else []
    notes = ["## Notes", "", card_text(row.notes, lines=True), ""] if row.notes else []
    return "\n".join([
        f"# Neuroseg: {what}", "", *named,
        f"The {row.kind} checkpoint (step {row.step}) of {what}, exported from Neuroseg.", "", *notes,
        "## Recipe", "", code_block(json.dumps(shown_recipe(run, row.step), indent=2, default=str), "json"), "",
        "## Trained on", "", *(masks or ["(the model card of the starter model says)" if run.kind == RunKind.STARTER
                                     else "(not recorded)"]), "",
        "## Validation", "", scores or "(none recorded)", "",
        "## Use", "", "Input: one EM slice (any grey values; the package normalises it to zero mean and unit "
        "variance). Output: the neuron probability (a sigmoid of the network's logits).", "",
        "## Drawing convention", "", _convention(label_offset), ""])


def _convention(label_offset) -> str:
    """The exported card's words for where the model draws borders (``meta["label_offset"]``)."""
    where = offset_words(label_offset)
    if where is None:
        return "Borders are drawn where the image shows the membranes."
    return (f"Its training labels sat {where} the membranes in the image, and the model learned to draw "
            "borders there (its training flips kept that offset). Compare it with labels drawn the same way; "
            "if you flip or rotate the input to average predictions, move each answer back by that offset.")
