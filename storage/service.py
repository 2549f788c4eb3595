"""What the pages call: one object over the database, the file store and the jobs, one method per thing
a page does. Every method opens its own transaction, so the pages never hold a session; errors a user
can act on come out as :class:`UserError` (or :class:`storage.api.MaskConflict`) with the message to
show. No Streamlit here: the pages are thin and this is tested with plain pytest."""

from __future__ import annotations

import contextlib
import errno
import os
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from sqlalchemy import func, select, update

from storage import api, jobs
from storage import drafts as kept_drafts
from storage import predictions as prediction_jobs
from storage.annotate import Draft, kind_after_edit
from storage.api import DatasetInfo, Deleted, MaskConflict, MaskInfo, NotFound
from storage.files import IntegrityError
from storage.models import Checkpoint, Dataset, Prediction, Run
from storage.procs import start_time
from storage.settings import PROJECT_ROOT, Settings
from unet.io import ChannelsMaybeSlices

Progress = Callable[[str, float], None]
ISBI_FILES = ("train-volume.tif", "train-labels.tif")
DEMO_SHAPE = (8, 256, 256)
DEMO_SOURCE = "synthetic (unet.synthetic, seed 2012)"

__all__ = ["AlreadyLoaded", "ChannelsQuestion", "DatasetInfo", "Deleted", "MaskConflict", "MaskInfo", "Neuroseg",
           "NotFound", "UserError"]


class UserError(RuntimeError):
    """Something the user can fix; the message says what and how."""


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


@dataclass(frozen=True)
class Overview:
    datasets: int
    runs: int
    active_runs: int
    device: str  # "NVIDIA H100 80GB HBM3", "CPU only (2 threads)"
    gpu: bool = False


@dataclass(frozen=True)
class StartOption:
    source: str  # latest | uploaded | prediction | nothing
    label: str
    mask_id: int | None
    prediction_id: int | None = None


@dataclass(frozen=True)
class RunProgress:
    """Where a training run is: steps done of all, seconds so far, and the estimated seconds left."""

    step: int
    steps: int
    seconds: float
    eta_s: float | None
    phase: str = ""  # "training", "validating slice 2 of 3" (while active)
    resumes: list[tuple[int, int]] = field(default_factory=list)  # (step it went on from, step it had reached)


def isbi_dir() -> Path | None:
    """Where the ISBI 2012 files are: ``$NEUROSEG_ISBI_DIR``, else ``../shared/data/isbi2012`` beside the
    project; None when the files are not there."""
    folder = Path(os.environ.get("NEUROSEG_ISBI_DIR") or PROJECT_ROOT.parent / "shared" / "data" / "isbi2012")
    return folder if all((folder / f).is_file() for f in ISBI_FILES) else None


def _disk_message(exc: OSError) -> str:
    if exc.errno == errno.ENOSPC:
        return "the disk holding the data directory is full: free some space and try again (nothing was stored)"
    return f"could not write to the data directory: {exc.strerror or exc} (nothing was stored)"


class Neuroseg:
    """The service: open it once per process (the app caches it)."""

    def __init__(self, settings: Settings | None = None, *, start_jobs: bool = True):
        from storage.jobs import startup

        if start_jobs:
            self.sessions, self.store, self.settings = startup(settings)
        else:
            from storage.db import open_store

            self.settings = settings or Settings.from_env()
            self.sessions, self.store = open_store(self.settings)
        remove_stale_uploads(self.store.root)
        self._arrays: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def _tx(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(session, *args, **kwargs)`` in one transaction; what a user can act on (a refusal, a
        missing row, a damaged file, a full disk) comes out as :class:`UserError`."""
        try:
            with self.sessions.begin() as s:
                return fn(s, *args, **kwargs)
        except (ValueError, LookupError, IntegrityError) as exc:
            raise UserError(str(exc)) from exc
        except OSError as exc:
            raise UserError(_disk_message(exc)) from exc

    def _cached(self, key: tuple, load: Callable[[], np.ndarray], keep: int = 4) -> np.ndarray:
        """A read-only array kept for the next few calls (stacks and probabilities are read once)."""
        with self._lock:
            if key in self._arrays:
                self._arrays.move_to_end(key)
                return self._arrays[key]
        data = load()
        data.setflags(write=False)
        with self._lock:
            self._arrays[key] = data
            while len(self._arrays) > keep:
                self._arrays.popitem(last=False)
        return data

    # --- the store at a glance -------------------------------------------------------------------
    def overview(self) -> Overview:
        from unet.device import describe_device, pick_device

        with self.sessions.begin() as s:
            datasets = s.scalar(select(func.count()).select_from(Dataset)) or 0
            runs = s.scalar(select(func.count()).select_from(Run)) or 0
            active = s.scalar(select(func.count()).select_from(Run).where(Run.status.in_(("QUEUED", "RUNNING"))))
        return Overview(int(datasets), int(runs), int(active or 0), describe_device(),
                        pick_device("auto").type != "cpu")

    # --- datasets ---------------------------------------------------------------------------------
    def datasets(self) -> list[DatasetInfo]:
        return self._tx(api.list_datasets)

    def dataset(self, dataset_id: int) -> DatasetInfo:
        return self._tx(api.get_dataset, dataset_id)

    def _tmp(self) -> Path:
        folder = self.store.root / "tmp"
        folder.mkdir(exist_ok=True)
        return folder / f"{uuid.uuid4().hex}.tif"

    def _spool(self, upload: BinaryIO, progress: Progress, what: str, start: float, span: float) -> Path:
        """Copy an upload to a temporary file once (then it is read from disk, not from memory)."""
        path = self._tmp()
        total = getattr(upload, "size", None) or 0
        upload.seek(0)
        done = 0
        with open(path, "wb") as out:
            while chunk := upload.read(16 << 20):
                out.write(chunk)
                done += len(chunk)
                progress(f"receiving the {what} ({done / 2**20:.0f} MiB)", start + span * min(1.0, done / total)
                         if total else start)
        return path

    def import_upload(self, volume: BinaryIO, labels: BinaryIO | None = None, *, name: str = "", notes: str = "",
                      author: str = "", progress: Progress | None = None, channels_as_z: bool = False) -> DatasetInfo:
        """Store an uploaded volume (and its labels) as a new dataset. Refusals raise :class:`UserError`
        with what was wrong and what is expected; nothing is stored then. A grey file of "channels" raises
        :class:`ChannelsQuestion`; ``channels_as_z=True`` then reads them as Z slices."""
        report = progress or (lambda _stage, _fraction: None)
        spooled: list[Path] = []
        try:
            try:
                spooled.append(self._spool(volume, report, "volume", 0.0, 0.15 if labels is not None else 0.2))
                if labels is not None:
                    spooled.append(self._spool(labels, report, "labels", 0.15, 0.05))
            except OSError as exc:
                raise UserError(_disk_message(exc)) from exc
            display = name.strip() or Path(getattr(volume, "name", "") or "upload").stem
            return self._import(spooled[0], spooled[1] if labels is not None else None, display, notes, author,
                                lambda stage, f: report(stage, 0.2 + 0.8 * f), source_name=getattr(volume, "name", ""),
                                labels_name=getattr(labels, "name", ""), channels_as_z=channels_as_z)
        finally:
            for path in spooled:
                path.unlink(missing_ok=True)

    def _import(self, volume: Path, labels: Path | None, name: str, notes: str, author: str, progress: Progress,
                source_name: str = "", labels_name: str = "", channels_as_z: bool = False) -> DatasetInfo:
        try:
            with self.sessions.begin() as s:
                info = api.import_dataset(s, self.store, volume, labels, name=name, author=author,
                                          source_name=source_name or None, progress=progress,
                                          channels_as_z=channels_as_z)
                if notes:
                    info = api.update_dataset(s, info.id, notes=notes)
                return info
        except ValueError as exc:
            message = str(exc)
            if source_name:  # the spooled copies have made-up names: say the user's
                message = message.replace(volume.name, source_name)
                if labels is not None:
                    message = message.replace(labels.name, labels_name or "the labels")
            if isinstance(exc, ChannelsMaybeSlices):
                raise ChannelsQuestion(message, exc.count) from exc
            raise UserError(message) from exc
        except OSError as exc:
            raise UserError(_disk_message(exc)) from exc

    def load_demo(self, author: str = "") -> DatasetInfo:
        """The synthetic EM stack with its labels, so a newcomer can try everything in a minute."""
        from unet.io import write_tiff_atomic
        from unet.synthetic import make_synthetic_em

        self._refuse_second_copy("Demo: synthetic EM", DEMO_SOURCE)
        volume, labels = make_synthetic_em(DEMO_SHAPE, np.random.default_rng(2012))
        paths = [self._tmp(), self._tmp()]
        try:
            write_tiff_atomic(paths[0], volume)
            write_tiff_atomic(paths[1], labels)
            return self._import(paths[0], paths[1], "Demo: synthetic EM", "A synthetic stack made by "
                                "unet.synthetic: Voronoi cells with dark membranes, organelles and noise, with "
                                "exact labels.", author, lambda *_: None,
                                source_name=DEMO_SOURCE)
        finally:
            for path in paths:
                path.unlink(missing_ok=True)

    def load_isbi(self, author: str = "", progress: Progress | None = None) -> DatasetInfo:
        folder = isbi_dir()
        if folder is None:
            raise UserError("the ISBI 2012 files are not here: put train-volume.tif and train-labels.tif in "
                            "../shared/data/isbi2012/ or point NEUROSEG_ISBI_DIR at their folder")
        self._refuse_second_copy("ISBI 2012 training stack", ISBI_FILES[0], (30, 512, 512))
        return self._import(folder / ISBI_FILES[0], folder / ISBI_FILES[1], "ISBI 2012 training stack",
                            "ISBI 2012 EM segmentation challenge (Drosophila VNC, ssTEM). Cardona et al. 2010, "
                            "PLoS Biol 8(10):e1000502; Arganda-Carreras et al. 2015, Front. Neuroanat. 9:142.",
                            author, progress or (lambda *_: None), source_name=ISBI_FILES[0])

    def _refuse_second_copy(self, what: str, source_name: str, shape: tuple[int, int, int] | None = None) -> None:
        """A sample is loaded once: a second click finds the copy already there (even renamed)."""
        for info in self.datasets():
            if info.source_name == source_name and (shape is None or info.shape == shape):
                raise AlreadyLoaded(f"the {what} is already loaded as **{info.name}** (#{info.id})", info.id)

    def update(self, dataset_id: int, *, name: str | None = None, notes: str | None = None) -> DatasetInfo:
        return self._tx(api.update_dataset, dataset_id, name=name, notes=notes)

    def deletion_preview(self, dataset_id: int) -> Deleted:
        return self._tx(api.deletion_preview, self.store, dataset_id)

    def delete_dataset(self, dataset_id: int) -> Deleted:
        return self._tx(api.delete_dataset, self.store, dataset_id)

    def volume(self, dataset_id: int) -> np.ndarray:
        """The whole stack (read-only), read once and kept for the next few calls."""
        info = self.dataset(dataset_id)
        return self._cached(("volume", info.id, info.sha256), lambda: self._tx(api.load_volume, self.store, info.id))

    # --- masks ------------------------------------------------------------------------------------
    def slice_kinds(self, dataset_id: int) -> dict[int, MaskInfo]:
        return self._tx(api.slice_kinds, dataset_id)

    def history(self, dataset_id: int, slice_index: int) -> list[MaskInfo]:
        return self._tx(api.mask_history, dataset_id, slice_index)

    def mask(self, mask_id: int) -> np.ndarray:
        return self._tx(api.load_mask, self.store, mask_id)

    def start_options(self, dataset_id: int, slice_index: int) -> list[StartOption]:
        """What an edit of this slice can start from, best first."""
        history = self.history(dataset_id, slice_index)
        options = []
        if history:
            last = history[-1]
            options.append(StartOption("latest", f"latest version (v{last.version}, {last.kind})", last.id))
        uploaded = [m for m in history if m.kind == "uploaded"]
        if uploaded and uploaded[-1].id != (history[-1].id if history else None):
            options.append(StartOption("uploaded", f"uploaded labels (v{uploaded[-1].version})", uploaded[-1].id))
        for p in reversed(self.predictions(dataset_id=dataset_id)):
            if p.status == "FINISHED" and slice_index in p.slices:
                options.append(StartOption("prediction", f"prediction #{p.id} (run {p.run_id})", None, p.id))
                break
        options.append(StartOption("nothing", "nothing (scribble: only painted pixels count)", None))
        return options

    def new_draft(self, dataset_id: int, slice_index: int, option: StartOption) -> Draft:
        info = self.dataset(dataset_id)
        history = self.history(dataset_id, slice_index)
        latest_id = history[-1].id if history else None
        if option.prediction_id is not None:
            from unet.postprocess import to_mask

            prediction = self.prediction(option.prediction_id)
            prob = self.prediction_output(prediction.id)[prediction.slices.index(slice_index)]
            return Draft(dataset_id, slice_index, "prediction", None, latest_id, "predicted→painted", to_mask(prob),
                         prediction_id=prediction.id)
        if option.mask_id is None:
            return Draft.blank(dataset_id, slice_index, (info.shape[1], info.shape[2]), latest_id)
        source = next(m for m in history if m.id == option.mask_id)
        return Draft(dataset_id, slice_index, option.source, source.id, latest_id,
                     kind_after_edit(option.source, source.kind), self.mask(source.id))

    def save_draft(self, draft: Draft, author: str = "", owner: str | None = None) -> MaskInfo:
        """Save the draft's mask as a new version, exactly as it is, and forget the owner's kept copy. A
        newer version saved meanwhile by someone else raises :class:`MaskConflict` and the draft is kept."""
        def save(s):
            info = api.save_mask(s, self.store, draft.dataset_id, draft.slice_index, np.array(draft.working),
                                 kind=draft.kind, author=author, parent_id=draft.source_mask_id,
                                 latest_id=draft.latest_id)
            if owner is not None:
                kept_drafts.drop(s, self.store, draft.dataset_id, draft.slice_index, owner)
            return info

        info = self._tx(save)
        draft.saved(info.id, info.kind)
        return info

    def keep_draft(self, draft: Draft, owner: str) -> None:
        """Keep the draft in the store as it is now (or forget it when nothing is changed), so a reload, a
        new tab or a restart finds it. Called by the Annotate page after every change."""
        if not draft.dirty:
            self._tx(kept_drafts.drop, self.store, draft.dataset_id, draft.slice_index, owner)
            return
        self._tx(kept_drafts.keep, self.store, kept_drafts.StoredDraft(
            draft.dataset_id, draft.slice_index, owner, draft.source, draft.source_mask_id, draft.latest_id,
            draft.prediction_id, draft.kind, draft.changed_pixels, datetime.now(UTC), np.asarray(draft.original),
            np.asarray(draft.working)))

    def stored_draft(self, dataset_id: int, slice_index: int, owner: str) -> tuple[Draft, datetime] | None:
        """The owner's kept draft of a slice and when it was last changed, or None."""
        stored = self._tx(kept_drafts.load, self.store, dataset_id, slice_index, owner)
        if stored is None:
            return None
        return Draft.restored(dataset_id, slice_index, stored.source, stored.source_mask_id, stored.latest_id,
                              stored.kind, stored.original, stored.working, stored.prediction_id), stored.updated

    def drafts_of(self, owner: str) -> list[kept_drafts.StoredDraft]:
        """Every slice on which this owner has unsaved changes kept in the store."""
        return self._tx(kept_drafts.of_owner, owner)

    def restore(self, mask_id: int, author: str = "") -> MaskInfo:
        return self._tx(api.restore_mask, self.store, mask_id, author=author)

    # --- training -------------------------------------------------------------------------------------
    def default_split(self, dataset_id: int, val_share: float = 0.15) -> tuple[list[int], list[int]]:
        """The labelled slices of a dataset, the last ~15% (at least one) kept for validation."""
        labelled = sorted(self.slice_kinds(dataset_id))
        n_val = max(1, round(len(labelled) * val_share)) if len(labelled) > 1 else 0
        return labelled[:len(labelled) - n_val], labelled[len(labelled) - n_val:]

    def train_plan(self, train: list[dict[str, Any]], val: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Which mask version of each chosen slice a run would use ("none" where a slice has no mask yet),
        and how many labelled pixels it has."""
        def plan(s):
            rows = []
            for role, parts in (("train", train), ("val", val)):
                for part in parts:
                    info = api.get_dataset(s, part["dataset_id"])
                    for z in part["slices"]:
                        mask = api.latest_mask(s, info.id, z)
                        rows.append({"role": role, "dataset": info.name, "slice": z,
                                     "version": f"v{mask.version}" if mask else "none",
                                     "kind": mask.kind if mask else "",
                                     "labelled pixels": mask.labelled_pixels if mask else 0})
            return rows

        return self._tx(plan)

    def training_estimate(self, config: Any, val: list[dict[str, Any]]) -> str:
        """How long a run of ``config`` validating on ``val`` takes here, measured on this machine for this
        network and this data's size (see :mod:`unet.estimate`)."""
        from unet.device import pick_device
        from unet.estimate import estimate_training

        shapes = []
        for part in val:
            info = self.dataset(part["dataset_id"])
            shapes += [(info.shape[1], info.shape[2])] * len(part["slices"])
        try:
            device = pick_device(config.device)
        except (RuntimeError, ValueError) as exc:
            raise UserError(str(exc)) from exc
        return estimate_training(config, shapes, "cpu" if device.type == "cpu" else str(device)).describe()

    def submit_training(self, train: list[dict[str, Any]], val: list[dict[str, Any]], config: Any, *,
                        preset: str = "", parent_checkpoint_id: int | None = None) -> jobs.RunInfo:
        spec = {"train": train, "val": val, "preset": preset}
        run = self._tx(jobs.submit_training, spec, config, parent_checkpoint_id)
        jobs.start_queued(self.sessions, self.settings)
        return self.run(run.id)

    def runs(self) -> list[jobs.RunInfo]:
        return self._tx(jobs.list_runs)

    def run(self, run_id: int) -> jobs.RunInfo:
        return self._tx(jobs.get_run, run_id)

    def curves(self, run_id: int) -> dict[str, list[tuple[int, float, float]]]:
        """Every metric of a run as {key: [(step, value, seconds), …]} in step order (one query)."""
        curves = self._tx(jobs.run_curves, run_id)
        curves.pop("resume", None)  # bookkeeping, not a curve
        return curves

    def progress(self, run: jobs.RunInfo) -> RunProgress:
        """Steps done of all, the seconds so far, the estimated seconds left (the pace so far, validations
        included), what the worker does now, and where each start of the run began."""
        points = self._tx(jobs.run_metrics, run.id, "loss")
        resumes = [(int(step), int(before)) for step, before, _ in self._tx(jobs.run_metrics, run.id, "resume")]
        steps = int(run.config.get("steps", 0))
        phase = run.phase if run.status in jobs.ACTIVE else ""
        if not points:
            return RunProgress(0, steps, 0.0, None, phase, resumes)
        step, _, seconds = points[-1]
        eta = (steps - step) * seconds / step if step > 0 and run.status in jobs.ACTIVE else None
        budget = run.config.get("max_seconds")
        if eta is not None and budget:
            eta = min(eta, max(0.0, budget - seconds))
        return RunProgress(int(step), steps, float(seconds), eta, phase, resumes)

    def run_log(self, run_id: int, lines: int = 30) -> str:
        path = jobs.worker_log(self.settings, run_id)
        if not path.is_file():
            return ""
        with open(path, "rb") as fh:
            fh.seek(max(0, path.stat().st_size - 64_000))
            text = fh.read().decode(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def cancel_run(self, run_id: int) -> jobs.RunInfo:
        return self._tx(jobs.cancel_run, run_id)

    def resume_run(self, run_id: int) -> jobs.RunInfo:
        self._tx(jobs.resume_run, run_id)
        jobs.start_queued(self.sessions, self.settings)
        return self.run(run_id)

    def checkpoints(self, run_id: int) -> list[dict[str, Any]]:
        return self._tx(jobs.run_checkpoints, run_id)

    def checkpoint_choices(self) -> list[dict[str, Any]]:
        """Every checkpoint of every run, newest run first, with its validation metrics."""
        return [{**c, "run_id": run.id, "run_status": run.status, "preset": run.spec.get("preset", "")}
                for run in self.runs() for c in self.checkpoints(run.id)]

    def checkpoint_bytes(self, checkpoint_id: int) -> bytes:
        def read(s):
            row = s.get(Checkpoint, checkpoint_id)
            if row is None:
                raise NotFound(f"checkpoint {checkpoint_id} does not exist")
            return self.store.verified(row.file, row.sha256).read_bytes()

        return self._tx(read)

    def delete_checkpoint(self, checkpoint_id: int) -> int:
        return self._tx(jobs.delete_checkpoint, self.store, checkpoint_id)

    def run_masks(self, run_id: int) -> list[dict[str, Any]]:
        return self._tx(jobs.run_masks, run_id)

    def lineage(self, run_id: int) -> tuple[int | None, list[int]]:
        """(the run this one was fine-tuned from, the runs fine-tuned from this one)."""
        run = self.run(run_id)
        return self._tx(lambda s: (jobs.checkpoint_run(s, run.parent_checkpoint_id), jobs.child_runs(s, run_id)))

    def run_deletion_preview(self, run_id: int) -> Deleted:
        return self._tx(api.run_preview, self.store, run_id)

    def delete_run(self, run_id: int) -> Deleted:
        return self._tx(api.delete_run, self.store, run_id)

    # --- predictions ------------------------------------------------------------------------------------
    def predict(self, checkpoint_id: int, dataset_id: int, slices: list[int]) -> prediction_jobs.PredictionInfo:
        info = self._tx(prediction_jobs.submit_prediction, checkpoint_id, dataset_id, slices)
        proc = prediction_jobs.launch_prediction(self.settings, info.id)
        with self.sessions.begin() as s:  # so that a process that dies before it starts is noticed
            s.execute(update(Prediction).where(Prediction.id == info.id, Prediction.pid.is_(None))
                      .values(pid=proc.pid, pid_started=start_time(proc.pid)))
        return self.prediction(info.id)

    def prediction(self, prediction_id: int) -> prediction_jobs.PredictionInfo:
        return self._tx(prediction_jobs.get_prediction, prediction_id)

    def predictions(self, *, dataset_id: int | None = None, run_id: int | None = None
                    ) -> list[prediction_jobs.PredictionInfo]:
        return self._tx(prediction_jobs.list_predictions, dataset_id=dataset_id, run_id=run_id)

    @staticmethod
    def prediction_progress(job: prediction_jobs.PredictionInfo) -> tuple[float, str]:
        """(fraction of the whole job done, what it is doing) for a progress bar: the network's slices take
        the first 60%, the neuron instances (a watershed per slice) the next 35%, writing the files the rest."""
        n = max(1, len(job.slices))
        if job.status == "QUEUED" or (job.status == "RUNNING" and not job.phase):
            return 0.0, "starting (loading the model and the stack)"
        if job.phase.startswith("instances"):
            done = int(job.phase.split()[1].split("/")[0])
            return 0.6 + 0.35 * done / n, f"neuron instances of slice {done + 1} of {n}"
        if job.phase == "write":
            return 0.95, "writing the TIFFs"
        return 0.6 * job.done / n, f"{job.done} of {n} slices through the network"

    def prediction_output(self, prediction_id: int, output: str = "probabilities") -> np.ndarray:
        """(slices, Y, X): the neuron probabilities, the 0/255 mask or the instance labels, as stored."""
        return self._cached((output, prediction_id),
                            lambda: self._tx(prediction_jobs.load_output, self.store, prediction_id, output))

    def prediction_file(self, prediction_id: int, output: str) -> bytes:
        return self._tx(prediction_jobs.prediction_file, self.store, prediction_id, output)


def remove_stale_uploads(store_root: Path, older_than_s: float = 24 * 3600) -> None:
    """Temporary upload copies left behind by a killed server (a day old: another server on the same
    data directory may be receiving one right now)."""
    import time

    for path in (store_root / "tmp").glob("*.tif"):
        with contextlib.suppress(OSError):
            if time.time() - path.stat().st_mtime > older_than_s:
                path.unlink()
