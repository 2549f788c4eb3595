"""Deletes (a dataset, a run, a checkpoint, a prediction), planned once: a :class:`Plan` lists every row and
folder a delete takes with it, whose runs and predictions they are, and why it cannot go ahead now, if so. The
confirmation shows :func:`preview` of the plan and the button carries out the same plan with :func:`execute`,
so what was announced is what goes. Rows go first: if the transaction fails, every file is still there. The
open items of a dataset's queue that were ranked from a prediction or a live session that goes
(:class:`~storage.models.WorkItem`'s ``source``) go with it: Next would open them on a prediction that is no
longer there. The done ones stay, as the record of what was done. Kept edits forget a prediction that goes
(the one their object tools acted on). Another user's runs and predictions that a delete would take are the
admin's to delete (:func:`others`; checked by the service)."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from domain.kinds import ACTIVE, RunKind
from domain.records import Deleted
from domain.review import live_source, prediction_source
from storage.jobs.procs import is_alive
from storage.models import Checkpoint, Dataset, Draft, MaskVersion, Prediction, Run, WorkItem, row_or_missing
from storage.records.datasets import dataset_row, runs_using_dataset
from storage.records.files import FileStore
from storage.records.runs import run_row
from unet.exchange.checkpoint import side_file


@dataclass(frozen=True)
class Plan:
    """What one delete removes: the rows named here (the database cascades the rest: mask versions,
    drafts, metrics, lineage) and these folders and files of the store."""

    datasets: tuple[int, ...] = ()
    runs: tuple[int, ...] = ()
    checkpoints: tuple[int, ...] = ()  # deleted on their own (a run's go with the run)
    checkpoint_count: int = 0
    mask_versions: int = 0
    predictions: tuple[int, ...] = ()
    folders: tuple[str, ...] = ()
    files: tuple[str, ...] = ()
    refusal: str | None = None  # why it cannot be done now (a job still running on it)
    # (kind, id, owner's id, owner's name) of every run and prediction it removes: a delete that would take
    # another user's work with it is the admin's (:func:`others`), and each is named in the audit trail
    owned: tuple[tuple[str, int, int | None, str], ...] = ()


def _owned(session: Session, runs, predictions) -> tuple[tuple[str, int, int | None, str], ...]:
    out = []
    for kind, model, ids in (("run", Run, runs), ("prediction", Prediction, predictions)):
        for row_id in ids:
            row = session.get(model, row_id)
            if row is not None:
                out.append((kind, int(row_id), row.owner_id, row.owner.username if row.owner else ""))
    return tuple(out)


def others(plan: Plan, user_id: int | None) -> list[str]:
    """The runs and predictions of the plan that another user owns ("run 5 (bob)"); the system's and
    those made before accounts belong to nobody."""
    return [f"{kind} {ident} ({name or 'another user'})" for kind, ident, owner_id, name in plan.owned
            if owner_id is not None and owner_id != user_id]


def _predictions(session: Session, condition) -> list[int]:
    return list(session.scalars(select(Prediction.id).where(condition).order_by(Prediction.id)))


def _running_predictions(session: Session, condition, what: str) -> str | None:
    """A prediction process still running would fail half-way once its rows and files are gone: say
    which ones to wait for (a process that died meanwhile does not count)."""
    rows = session.scalars(select(Prediction).where(condition, Prediction.status.in_(ACTIVE)))
    running = [p.id for p in rows if p.pid is None or p.pid == 0 or is_alive(p.pid, p.pid_started)]
    if not running:
        return None
    names = ", ".join(f"#{p}" for p in running)
    return (f"prediction {names} is running on {what}: wait until it has finished (Predict shows its progress), "
            "then delete")


def _of_runs(run_ids: list[int]):
    return Prediction.checkpoint_id.in_(select(Checkpoint.id).where(Checkpoint.run_id.in_(run_ids)))


def plan_run(session: Session, store: FileStore, run_id: int) -> Plan:
    """A finished or stopped run: its rows (metrics, checkpoints, predictions, lineage) and its folder of
    checkpoints and logs. A queued or running run must be cancelled first."""
    run = run_row(session, run_id)
    refusal = ("the starter model ships with the app: it is not deleted" if run.kind == RunKind.STARTER else
               f"run {run_id} is {run.status}: cancel it before deleting it" if run.status in ACTIVE
               else _running_predictions(session, _of_runs([run_id]), f"a checkpoint of run {run_id}"))
    checkpoints = session.scalar(select(func.count()).where(Checkpoint.run_id == run_id)) or 0
    predictions = _predictions(session, _of_runs([run_id]))
    return Plan(runs=(run_id,), checkpoint_count=int(checkpoints), predictions=tuple(predictions),
                folders=(store.run_folder(run_id), *map(store.prediction_folder, predictions)), refusal=refusal,
                owned=_owned(session, [run_id], predictions))


def plan_dataset(session: Session, store: FileStore, dataset_id: int) -> Plan:
    """A dataset with its mask versions and drafts, the runs that trained on it, the predictions of it
    and of those runs, and all their files."""
    dataset_row(session, dataset_id)
    run_ids = runs_using_dataset(session, dataset_id)
    active = [r for r in run_ids if session.get(Run, r).status in ACTIVE]
    refusal = (f"runs {active} are training on this dataset: cancel them before deleting it" if active else
               _running_predictions(session, Prediction.dataset_id == dataset_id, "this dataset")
               or (_running_predictions(session, _of_runs(run_ids), "a run trained on this dataset")
                   if run_ids else None))
    masks = session.scalar(select(func.count()).where(MaskVersion.dataset_id == dataset_id)) or 0
    checkpoints = session.scalar(select(func.count()).where(Checkpoint.run_id.in_(run_ids))) if run_ids else 0
    predictions = set(_predictions(session, Prediction.dataset_id == dataset_id))
    if run_ids:
        predictions |= set(_predictions(session, _of_runs(run_ids)))
    folders = (store.dataset_dir(dataset_id), *map(store.run_folder, run_ids),
               *map(store.prediction_folder, sorted(predictions)))
    return Plan(datasets=(dataset_id,), runs=tuple(run_ids), checkpoint_count=int(checkpoints or 0),
                mask_versions=int(masks), predictions=tuple(sorted(predictions)), folders=folders, refusal=refusal,
                owned=_owned(session, run_ids, sorted(predictions)))


def plan_checkpoint(session: Session, store: FileStore, checkpoint_id: int) -> Plan:
    """One checkpoint and the predictions made with it; runs fine-tuned from it keep their records and
    forget their parent."""
    row = row_or_missing(session, Checkpoint, checkpoint_id, "checkpoint")
    run = session.get(Run, row.run_id)
    refusal = ("the starter model ships with the app: it is not deleted" if run.kind == RunKind.STARTER else
               f"run {run.id} is {run.status}: its checkpoints are still being written" if run.status in ACTIVE
               else _running_predictions(session, Prediction.checkpoint_id == checkpoint_id, "this checkpoint"))
    predictions = _predictions(session, Prediction.checkpoint_id == checkpoint_id)
    return Plan(checkpoints=(checkpoint_id,), checkpoint_count=1, predictions=tuple(predictions),
                folders=tuple(map(store.prediction_folder, predictions)),
                files=(row.file, str(side_file(row.file))), refusal=refusal, owned=_owned(session, [], predictions))


def plan_prediction(session: Session, store: FileStore, prediction_id: int) -> Plan:
    """One prediction and its folder of outputs (its checkpoint, dataset and masks stay). One still running
    must be cancelled or finish first."""
    row = row_or_missing(session, Prediction, prediction_id, "prediction")
    refusal = _running_predictions(session, Prediction.id == row.id, "its stack")
    return Plan(predictions=(row.id,), folders=(store.prediction_folder(row.id),), refusal=refusal,
                owned=_owned(session, [], [row.id]))


def preview(store: FileStore, plan: Plan) -> Deleted:
    """What carrying out the plan removes, counted now."""
    files = sum(store.count_files(f) for f in plan.folders)
    files += sum(store.abspath(f).is_file() for f in plan.files)
    return Deleted(len(plan.datasets), plan.mask_versions, len(plan.runs), plan.checkpoint_count, files,
                   len(plan.predictions))


def execute(session: Session, store: FileStore, plan: Plan) -> Deleted:
    """Carry out the plan: refuse when it says so, delete the rows, then the files."""
    if plan.refusal:
        raise ValueError(plan.refusal)
    if plan.predictions:  # (as a ranking of the queue does: none adds items from these predictions meanwhile)
        session.execute(select(Dataset.id).where(Dataset.id.in_(
            select(Prediction.dataset_id).where(Prediction.id.in_(plan.predictions)))).with_for_update())
    # runs before datasets: a run's lineage rows hold on to the dataset's mask versions
    # (predictions named on their own; those of a checkpoint, run or dataset go with it in any case)
    alone = plan.predictions if not (plan.checkpoints or plan.runs or plan.datasets) else ()
    for model, ids in ((Prediction, alone), (Checkpoint, plan.checkpoints), (Run, plan.runs),
                       (Dataset, plan.datasets)):
        for row_id in ids:
            row = session.get(model, row_id)
            if row is not None:
                session.delete(row)
        session.flush()
    gone = [*map(prediction_source, plan.predictions), *map(live_source, plan.runs)]
    if gone:
        session.execute(delete(WorkItem).where(WorkItem.source.in_(gone), WorkItem.done_at.is_(None)))
    if plan.predictions:  # (kept edits forget them: SQLite can give a deleted id to a new prediction)
        session.execute(update(Draft).where(Draft.prediction_id.in_(plan.predictions)).values(prediction_id=None))
    files = sum(store.delete_tree(f) for f in plan.folders) + sum(store.delete_file(f) for f in plan.files)
    return Deleted(len(plan.datasets), plan.mask_versions, len(plan.runs), plan.checkpoint_count, files,
                   len(plan.predictions))
