"""The starter model that ships with the app (``models/starter/``, made by ``python -m bench.starter``),
registered in the store as a finished run of kind "starter" with one checkpoint, so that everything that
picks a checkpoint (Predict, "Start from" on Train) offers it without a special case, and a new dataset
can start from it. Registration happens when the server starts and is idempotent (keyed by the file's
checksum); a damaged file is refused with a message and nothing is registered."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from domain.kinds import CheckpointKind, RunKind, RunStatus
from storage.models import Checkpoint, Run
from storage.records.files import FileStore, sha256_of
from storage.settings import PROJECT_ROOT
from unet.exchange.checkpoint import load_checkpoint, side_file

STARTER_PRESET = "starter"


def starter_dir() -> Path:
    """``$NEUROSEG_STARTER_DIR`` (a lab's own starter), else ``models/starter`` in the project."""
    return Path(os.environ.get("NEUROSEG_STARTER_DIR") or PROJECT_ROOT / "models" / "starter")


@dataclass(frozen=True)
class Registered:
    checkpoint_id: int | None  # None when there is no usable starter file
    message: str  # what happened, for the log
    refused: bool = False  # a starter file is there but cannot be used: the message says why


def shipped(folder: Path | None = None) -> Path | None:
    """The starter's weights in ``folder`` (by name, the last ``*.pt``), or None."""
    folder = folder or starter_dir()
    files = sorted(folder.glob("*.pt")) if folder.is_dir() else []
    return files[-1] if files else None


def register(session: Session, store: FileStore, folder: Path | None = None) -> Registered:
    """Make the shipped starter a checkpoint of the store, once per version of the file."""
    path = shipped(folder)
    if path is None:
        return Registered(None, f"no starter model in {folder or starter_dir()}")
    digest = sha256_of(path)
    known = session.scalar(select(Checkpoint.id).join(Run, Checkpoint.run_id == Run.id)
                           .where(Run.kind == RunKind.STARTER, Checkpoint.sha256 == digest))
    if known is not None:
        return Registered(known, f"the starter model {path.name} is checkpoint {known}")
    try:
        ckpt = load_checkpoint(path)  # weights_only=True; refuses anything but tensors and plain data
        ckpt.build_model("cpu")
    except Exception as exc:
        return Registered(None, f"the starter model {path.name} cannot be loaded ({type(exc).__name__}: {exc}); "
                                "it is not offered. Train it again with `python -m bench.starter`.", refused=True)
    config = ckpt.meta.get("train_config") or {"model": ckpt.model_config.to_dict()}
    now = datetime.now(UTC)
    run = Run(kind=RunKind.STARTER, status=RunStatus.FINISHED, device="cpu", created=now, started=now, finished=now,
              spec={"preset": STARTER_PRESET, "train": [], "val": [], "source": path.name,
                    "trained_on": ckpt.meta.get("trained_on", "")}, config=config)
    session.add(run)
    session.flush()
    target = store.run_dir(run.id) / "best.pt"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path, target)
    if side_file(path).is_file():
        shutil.copyfile(side_file(path), side_file(target))
    else:
        side_file(target).write_text(json.dumps(ckpt.meta))
    row = Checkpoint(run_id=run.id, kind=CheckpointKind.BEST, file=str(target.relative_to(store.root)), step=int(
        ckpt.meta.get("step", 0)), sha256=sha256_of(target), metrics={})
    session.add(row)
    session.flush()
    return Registered(row.id, f"registered the starter model {path.name} as checkpoint {row.id}")
