"""Live sessions: training that follows the annotator (the store's side; the process is
:mod:`storage.jobs.live_worker`, the engine :mod:`unet.training.live`).

A live session is a run of kind ``live`` on one dataset. Turning Live on starts one, from the chosen
checkpoint (by default the dataset's promoted model, else the starter model), or joins the one already
running for that dataset: two people on the same dataset share a session, and each one's slice is
re-predicted. The rules it keeps with the rest of the queue:

- **One device, normal runs first.** A live session holds its device as a training run does. When a
  normal run is queued on that device, the session checkpoints and pauses (QUEUED again, "paused" in its
  phase); the queue starts the normal run, and the session carries on from its checkpoint when the
  device is free. Nothing is lost either way.
- **Restarts.** The worker is its own process: a server restart does not touch it, and the page finds
  the session again through the store. A worker that died (a reboot) is LOST like any run; turning Live
  on again resumes that session from its latest checkpoint.
- **Stop** ends the session as a FINISHED run with its checkpoints, an ordinary run in Predict and Runs.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from domain.kinds import ACTIVE, RunKind, RunStatus
from domain.live import LiveInfo, LivePrediction, Region
from domain.records import NotFound, RunInfo, UserError, aware
from storage.models import Checkpoint, Dataset, LiveSlice, LiveViewer, Run, RunMask, User, row_or_missing
from storage.records.files import FileStore
from storage.records.runs import device_key, resume_run, run_info
from unet.network.config import TrainConfig, preset
from unet.network.device import pick_device
from unet.prediction.review import margin
from unet.training.live import live_config


def region_text(region: Region | None, partial: bool = False) -> str | None:
    """A region as the store keeps it: "y0,x0,h,w", with ",partial" when the rest of the slice has never
    been predicted."""
    return None if region is None else ",".join(str(int(v)) for v in region) + (",partial" if partial else "")


def parse_region(text: str | None) -> Region | None:
    """A region as kept in the store, or None (also for anything that does not read as four integers)."""
    try:
        y0, x0, h, w = (int(v) for v in (text or "").split(",")[:4])
    except ValueError:
        return None
    return (y0, x0, h, w) if min(y0, x0) >= 0 and min(h, w) > 0 else None


def clean_region(region) -> Region | None:
    """A region a page asked for, as four non-negative integers (a slice is never larger than 2³¹), or
    None for the whole slice (also for anything else)."""
    try:
        y0, x0, h, w = (int(v) for v in region)
    except (TypeError, ValueError):
        return None
    limit = 2**31 - 1
    return (y0, x0, h, w) if min(y0, x0) >= 0 and max(y0, x0, h, w) <= limit and min(h, w) > 0 else None


VIEWER_TTL = timedelta(seconds=120)  # a viewer not seen for this long is no longer predicted for
# the network of a session from random weights: the starter's (width 8), the one bench.loop measured; on a GPU
# the GPU preset's (issue 30)
SCRATCH_PRESET = "cpu-quick"
SCRATCH_PRESET_GPU = "gpu"


def scratch_preset() -> str:
    """The preset whose network a session from random weights trains: the GPU's where there is one."""
    return SCRATCH_PRESET_GPU if pick_device("auto").type == "cuda" else SCRATCH_PRESET


def _live_runs(session: Session, dataset_id: int, statuses=ACTIVE) -> list[Run]:
    rows = session.scalars(select(Run).where(Run.kind == RunKind.LIVE, Run.status.in_(list(statuses)))
                           .order_by(Run.id))
    return [r for r in rows if int(r.spec.get("dataset_id", -1)) == dataset_id]


def waiting_normal_run(session: Session, device: str) -> int | None:
    """The oldest normal run queued on ``device`` (a live session yields to it), or None."""
    return session.scalar(select(func.min(Run.id)).where(Run.status == RunStatus.QUEUED, Run.kind == RunKind.TRAIN,
                                                          Run.device == device))


def live_info(session: Session, run: Run) -> LiveInfo:
    learned = session.scalar(select(func.count()).select_from(RunMask).where(RunMask.run_id == run.id)) or 0
    since = datetime.now(UTC) - VIEWER_TTL
    viewers = [v.owner for v in session.scalars(select(LiveViewer).where(LiveViewer.run_id == run.id))
               if aware(v.seen) >= since]
    paused = waiting_normal_run(session, run.device) if run.status == RunStatus.QUEUED else None
    ids = {int(v.split(":", 1)[1]): v for v in viewers if v.startswith("user:") and v[5:].isdigit()}
    names = {ids[u.id]: u.username for u in session.scalars(select(User).where(User.id.in_(list(ids))))}
    return LiveInfo(run_info(run), int(run.spec["dataset_id"]), learned, sorted(viewers), paused, names)


def current(session: Session, dataset_id: int) -> LiveInfo | None:
    """The dataset's live session that is queued, running or paused, if any."""
    runs = _live_runs(session, dataset_id)
    return live_info(session, runs[0]) if runs else None


def start(session: Session, dataset_id: int, checkpoint_id: int | None, owner: str,
          scratch: bool = False) -> tuple[LiveInfo, str]:
    """Turn Live on for ``owner``: join the dataset's session, resume its lost one, or start one from
    ``checkpoint_id`` (``scratch``: from random weights of :data:`SCRATCH_PRESET`'s network, which a random
    forest of the strokes teaches; :mod:`unet.training.live`). Returns the session and what happened ("joined",
    "resumed", "started")."""
    row_or_missing(session, Dataset, dataset_id, "dataset")
    joined = _live_runs(session, dataset_id)
    if joined:
        see(session, joined[0].id, owner, None)
        return live_info(session, joined[0]), "joined"
    lost = _live_runs(session, dataset_id, [RunStatus.LOST])
    if scratch:
        checkpoint_id = None
    if lost and (lost[-1].parent_checkpoint_id is None if scratch else
                 checkpoint_id in (None, lost[-1].parent_checkpoint_id)):
        run = lost[-1]
        resume_run(session, run.id)
        see(session, run.id, owner, None)
        return live_info(session, run), "resumed"
    if scratch:
        config = live_config(preset(scratch_preset()), trained=False)
    else:
        if checkpoint_id is None:
            raise UserError("choose the model the live session starts from")
        parent = row_or_missing(session, Checkpoint, checkpoint_id, "checkpoint")
        parent_run = session.get(Run, parent.run_id)
        if parent_run.config.get("foreign"):
            raise ValueError(f"checkpoint {checkpoint_id} is a TorchScript model imported from another tool: a "
                             "live session fine-tunes, and it has no state dict to fine-tune; start from a Neuroseg "
                             "model")
        config = live_config(TrainConfig.from_dict(parent_run.config), trained=parent.step > 0)
    run = Run(status=RunStatus.QUEUED, kind=RunKind.LIVE, spec={"dataset_id": dataset_id, "preset": "live",
                                                              "train": [], "val": []},
              config=config.to_dict(), device=device_key(config), parent_checkpoint_id=checkpoint_id,
              phase="waiting for the device")
    session.add(run)
    session.flush()
    first = _live_runs(session, dataset_id)[0]  # two clicks at once: the older session wins, this one goes
    if first.id != run.id:
        session.delete(run)
        session.flush()
        see(session, first.id, owner, None)
        return live_info(session, first), "joined"
    see(session, run.id, owner, None)
    return live_info(session, run), "started"


def see(session: Session, run_id: int, owner: str, slice_index: int | None, region: Region | None = None) -> None:
    """``owner`` looks at ``slice_index`` of the session (None: keep the slice, just say still here), at
    ``region`` of it (zoomed in: predicted first) or at all of it (None)."""
    run = session.get(Run, run_id)
    if run is None or run.kind != RunKind.LIVE:
        raise NotFound(f"live session {run_id} does not exist")
    if slice_index is not None and (not isinstance(slice_index, int | np.integer) or isinstance(slice_index, bool)
                                    or not 0 <= slice_index < 2**31):
        raise UserError(f"A slice is a number from 0: not {str(slice_index)[:40]!r}.")
    slice_index = None if slice_index is None else int(slice_index)  # (the worker compares it with numbers)
    row = session.get(LiveViewer, (run_id, owner))
    now = datetime.now(UTC)
    if row is None:
        session.add(LiveViewer(run_id=run_id, owner=owner, slice_index=slice_index or 0, seen=now,
                               region=region_text(clean_region(region))))
    else:
        row.seen = now
        if slice_index is not None:
            row.slice_index = slice_index
            row.region = region_text(clean_region(region))
    session.flush()


def leave(session: Session, run_id: int, owner: str) -> None:
    session.execute(delete(LiveViewer).where(LiveViewer.run_id == run_id, LiveViewer.owner == owner))


def stop(session: Session, run_id: int) -> RunInfo:
    """End the session for everyone: it checkpoints and becomes a FINISHED run."""
    run = session.get(Run, run_id)
    if run is None or run.kind != RunKind.LIVE:
        raise NotFound(f"live session {run_id} does not exist")
    if run.status == RunStatus.QUEUED:  # not started, or paused: nothing to stop but the row
        has_weights = session.scalar(select(func.count()).select_from(Checkpoint).where(Checkpoint.run_id == run.id))
        run.status = RunStatus.FINISHED if has_weights else RunStatus.CANCELLED
        run.finished, run.phase = datetime.now(UTC), ""
    elif run.status == RunStatus.RUNNING and run.cancel_requested is None:
        run.cancel_requested = datetime.now(UTC)
    session.flush()
    return run_info(run)


def focus_slices(session: Session, run_id: int, n_slices: int) -> tuple[list[int], list[int]]:
    """The slices to re-predict: (each viewer's own slice, the ones beside them)."""
    since = datetime.now(UTC) - VIEWER_TTL
    viewers = [v for v in session.scalars(select(LiveViewer).where(LiveViewer.run_id == run_id)
                                          .order_by(LiveViewer.seen.desc())) if aware(v.seen) >= since]
    own = list(dict.fromkeys(v.slice_index for v in viewers if 0 <= v.slice_index < n_slices))
    beside = list(dict.fromkeys(z for v in viewers for z in (v.slice_index - 1, v.slice_index + 1)
                                if 0 <= z < n_slices and z not in own))
    return own, beside


def viewed_regions(session: Session, run_id: int) -> dict[int, Region]:
    """The viewers' slices that are seen only in part (zoomed in): slice → the region around every viewer's
    part of it. A slice that anyone sees whole is not here."""
    since = datetime.now(UTC) - VIEWER_TTL
    parts: dict[int, list[Region | None]] = {}
    for v in session.scalars(select(LiveViewer).where(LiveViewer.run_id == run_id)):
        if aware(v.seen) >= since:
            parts.setdefault(v.slice_index, []).append(parse_region(v.region))
    out = {}
    for z, regions in parts.items():
        if regions and None not in regions:
            y0, x0 = min(r[0] for r in regions), min(r[1] for r in regions)
            y1, x1 = max(r[0] + r[2] for r in regions), max(r[1] + r[3] for r in regions)
            out[z] = (y0, x0, y1 - y0, x1 - x0)
    return out


def prediction(session: Session, store: FileStore, run_id: int, slice_index: int,
               uncertainty: bool = False) -> LivePrediction | None:
    """The newest live prediction of a slice, or None (not predicted yet, or its file is being replaced); with
    ``uncertainty``, its uncertainty too (read only when asked: the page refreshes every 2 s)."""
    row = session.get(LiveSlice, (run_id, slice_index))
    if row is None:
        return None
    try:
        data = np.load(store.abspath(row.file), allow_pickle=False)
    except (OSError, ValueError):
        return None
    prob = data.astype(np.float32) / 255.0
    doubt = None
    if uncertainty:
        try:
            doubt = np.load(store.abspath(store.live_uncertainty(run_id, slice_index)), allow_pickle=False)
        except (OSError, ValueError):
            doubt = None
        # (kept by a worker of before issue 29, or being replaced: the map's own doubt)
        ok = doubt is not None and doubt.shape == data.shape and doubt.dtype == np.uint8
        doubt = doubt.astype(np.float32) / 255.0 if ok else margin(prob)
    return LivePrediction(run_id, slice_index, row.step, row.masks_seen, aware(row.created), prob,
                          parse_region(row.region), (row.region or "").endswith(",partial"), doubt)
