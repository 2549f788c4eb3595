"""The service's models (part of :class:`storage.service.Neuroseg`): training runs, their checkpoints as
models (cards, names, BioImage.IO export and import) and predictions (:mod:`storage.records.runs`,
:mod:`storage.records.checkpoints`, :mod:`storage.records.packages`, :mod:`storage.records.predictions`)."""

from __future__ import annotations

from typing import Any, BinaryIO

import numpy as np
from sqlalchemy.orm import Session

from domain.records import CheckpointInfo, Deleted, PlanRow, PredictionInfo, RunInfo, RunMaskInfo, RunSnapshot
from storage import text
from storage.auth import users
from storage.facade import Facade, cleaned, guard, looks
from storage.jobs import queue
from storage.records import checkpoints, deletion, packages, predictions, runs
from storage.records.runs import Curve
from storage.records.volumes import Volume
from unet.network.config import TrainConfig
from unet.prediction.postprocess import DEFAULT_METHOD


class ModelsService(Facade):
    """Training runs, models and predictions."""

    # --- training ---------------------------------------------------------------------------------------
    @looks
    def default_split(self, dataset_id: int) -> tuple[list[int], list[int]]:
        """The labelled slices of a dataset, the last ~15% (at least one) kept for validation."""
        return self._tx(runs.default_split, dataset_id)

    @looks
    def train_plan(self, train: list[dict[str, Any]], val: list[dict[str, Any]]) -> list[PlanRow]:
        """Which mask version of each chosen slice a run would use, and how many labelled pixels it has."""
        return self._tx(runs.train_plan, train, val)

    @looks
    def training_estimate(self, config: TrainConfig, val: list[dict[str, Any]]) -> str:
        """How long a run of ``config`` validating on ``val`` takes here, measured on this machine for this
        network and this data's size (see :mod:`unet.training.estimate`)."""
        return self._tx(runs.training_estimate, config, val)

    @looks
    def validation_note(self, val: list[dict[str, Any]]) -> str | None:
        """What validation slices lack to judge a run well (see :func:`storage.records.runs.validation_note`)."""
        return self._tx(runs.validation_note, self.store, val)

    @guard("train", "train", creates="run")
    def submit_training(self, train: list[dict[str, Any]], val: list[dict[str, Any]], config: TrainConfig, *,
                        preset: str = "", parent_checkpoint_id: int | None = None) -> RunInfo:
        spec = {"train": train, "val": val, "preset": preset}
        if self.actor.user_id is not None:  # one waiting run per user unless an admin allows more
            self._tx(users.check_queue_room, self.actor.user_id)
        run = self._tx(runs.submit_training, spec, config, parent_checkpoint_id)
        queue.start_queued(self.sessions, self.settings)
        return self.run(run.id)

    @looks
    def runs(self) -> list[RunInfo]:
        return self._tx(runs.list_runs)

    @looks
    def run(self, run_id: int) -> RunInfo:
        return self._tx(runs.get_run, run_id)

    @looks
    def snapshot(self, run_id: int) -> RunSnapshot:
        """The run, where it is and its curves (every metric, {key: [(step, value, seconds), …]} in step
        order), read in one transaction: what the Train page polls."""
        def read(s: Session) -> RunSnapshot:
            run, curves = runs.get_run(s, run_id), runs.run_curves(s, run_id)
            progress = runs.run_progress(run, curves)
            curves.pop("resume", None)  # bookkeeping, not a curve
            return RunSnapshot(run, progress, curves)

        return self._tx(read)

    @looks
    def curves(self, run_id: int) -> dict[str, Curve]:
        return self.snapshot(run_id).curves

    @looks
    def run_log(self, run_id: int, lines: int = 30) -> str:
        return runs.run_log(self.store, run_id, lines)

    @guard("cancel", "manage", "run", owned=True)
    def cancel_run(self, run_id: int) -> RunInfo:
        return self._tx(runs.cancel_run, run_id)

    @guard("resume", "manage", "run", owned=True)
    def resume_run(self, run_id: int) -> RunInfo:
        self._tx(runs.resume_run, run_id)
        queue.start_queued(self.sessions, self.settings)
        return self.run(run_id)

    @looks
    def checkpoints(self, run_id: int) -> list[CheckpointInfo]:
        return self._tx(checkpoints.checkpoints, run_id)

    @looks
    def checkpoint_choices(self) -> list[CheckpointInfo]:
        """Every checkpoint of every run, newest run first, with its validation metrics."""
        return self._tx(checkpoints.checkpoints)

    @guard("export model", "export", "checkpoint")
    def export_model(self, checkpoint_id: int, with_data: bool = False) -> tuple[bytes, str]:
        """The checkpoint as a BioImage.IO package (bytes, file name), validated and tested before it is
        handed out; its authors are the signed-in user (``Neuroseg`` for the system). Its test image and
        cover are synthetic unless ``with_data``: then a crop of a slice it trained on
        (:meth:`export_source`), which leaves the lab with the package."""
        author = self.actor.display_name or self.actor.username if self.actor.user_id is not None else ""
        return self._tx(checkpoints.export_model, self.store, checkpoint_id, [author] if author else [], with_data)

    @looks
    def export_source(self, checkpoint_id: int) -> tuple[str, int, int] | None:
        """(dataset name, dataset id, slice) a package's test image would be cut from, if the user agrees."""
        def read(s):
            found = checkpoints.export_source(s, checkpoint_id)
            return (found[0].name, found[0].id, found[1]) if found else None

        return self._tx(read)

    @guard("rename model", "manage", "checkpoint", owned=True)
    def update_model(self, checkpoint_id: int, *, name: str | None = None, notes: str | None = None
                     ) -> CheckpointInfo:
        """Give a checkpoint a name and notes (its run's owner or an admin; :mod:`storage.text`: no controls,
        within the length limits)."""
        return self._tx(checkpoints.update_checkpoint, checkpoint_id, cleaned(text.clean_name, name, "A model's name"),
                        cleaned(text.clean_notes, notes))

    @looks
    def model_card(self, checkpoint_id: int) -> dict[str, Any]:
        """A checkpoint's card: run, recipe, held-out scores, parent, size (its masks: :meth:`run_masks`)."""
        return self._tx(checkpoints.model_card, self.store, checkpoint_id)

    @guard("import model", "create", target=lambda upload, filename, *a, **k: f"package {filename[:60]}")
    def import_model(self, upload: BinaryIO, filename: str) -> packages.Imported:
        """A BioImage.IO package as a checkpoint (a finished run of kind ``imported``), after the checks of
        :mod:`storage.records.packages`; a refusal says what was found and leaves no row and no file."""
        imported = self._tx(packages.import_package, self.store, upload, filename)
        if self.actor.user_id is not None:
            self._tx(users.set_owner, "run", imported.run_id, self.actor.user_id)
        return imported

    @looks
    def checkpoint_bytes(self, checkpoint_id: int) -> bytes:
        return self._tx(checkpoints.checkpoint_bytes, self.store, checkpoint_id)

    @guard("delete", "manage", "checkpoint", owned=True)
    def delete_checkpoint(self, checkpoint_id: int) -> Deleted:
        return self._delete_planned(lambda s: deletion.plan_checkpoint(s, self.store, checkpoint_id),
                                    f"checkpoint {checkpoint_id}")

    @looks
    def run_masks(self, run_id: int) -> list[RunMaskInfo]:
        return self._tx(runs.run_masks, run_id)

    @looks
    def lineage(self, run_id: int) -> tuple[int | None, list[int]]:
        """(the run this one was fine-tuned from, the runs fine-tuned from this one)."""
        return self._tx(runs.lineage, run_id)

    @looks
    def run_deletion_preview(self, run_id: int) -> Deleted:
        return self._deletion_preview(lambda s: deletion.plan_run(s, self.store, run_id), f"run {run_id}")

    @guard("delete", "manage", "run", owned=True)
    def delete_run(self, run_id: int) -> Deleted:
        return self._delete_planned(lambda s: deletion.plan_run(s, self.store, run_id), f"run {run_id}")

    # --- predictions ------------------------------------------------------------------------------------
    @guard("predict", "predict", creates="prediction")
    def predict(self, checkpoint_id: int, dataset_id: int, slices: list[int],
                postprocess: str = DEFAULT_METHOD, tta: bool = False) -> PredictionInfo:
        """Queue a prediction of ``slices`` and start its process; ``postprocess`` says how its neurons are
        made from the map (``unet.prediction.postprocess.METHODS``); ``tta`` averages the network's answers over the 8
        flips of each tile (fewer errors at the borders, 8× the time)."""
        info = self._tx(predictions.submit_prediction, checkpoint_id, dataset_id, slices, postprocess, tta)
        queue.launch_prediction(self.sessions, self.settings, info.id)
        return self.prediction(info.id)

    @guard("cancel", "manage", "prediction", owned=True)
    def cancel_prediction(self, prediction_id: int) -> PredictionInfo:
        """Stop a waiting or running prediction: it stops after the block it is on and keeps the blocks written
        (:meth:`resume_prediction` goes on from them); the supervisor stops one that does not."""
        return self._tx(predictions.cancel_prediction, prediction_id)

    @guard("resume", "manage", "prediction", owned=True)
    def resume_prediction(self, prediction_id: int) -> PredictionInfo:
        """Start a failed, killed or cancelled prediction again; it keeps the blocks already written."""
        self._tx(predictions.resume_prediction, prediction_id)
        queue.launch_prediction(self.sessions, self.settings, prediction_id)
        return self.prediction(prediction_id)

    @looks
    def prediction_deletion_preview(self, prediction_id: int) -> Deleted:
        return self._deletion_preview(lambda s: deletion.plan_prediction(s, self.store, prediction_id),
                                      f"prediction {prediction_id}")

    @guard("delete", "manage", "prediction", owned=True)
    def delete_prediction(self, prediction_id: int) -> Deleted:
        """A prediction and its outputs (its model, stack and masks stay); one still running is refused."""
        return self._delete_planned(lambda s: deletion.plan_prediction(s, self.store, prediction_id),
                                    f"prediction {prediction_id}")

    @looks
    def prediction(self, prediction_id: int) -> PredictionInfo:
        return self._tx(predictions.get_prediction, prediction_id)

    @looks
    def predictions(self, *, dataset_id: int | None = None, run_id: int | None = None) -> list[PredictionInfo]:
        return self._tx(predictions.list_predictions, dataset_id=dataset_id, run_id=run_id)

    @looks
    def prediction_output(self, prediction_id: int, output: str = "probabilities") -> Volume | np.ndarray:
        """(slices, Y, X): the neuron probabilities, the 0/255 mask or the instance labels, as stored (read
        lazily: ``output[i]`` reads the i-th predicted slice)."""
        return self._cached((output, prediction_id),
                            lambda: self._tx(predictions.load_output, self.store, prediction_id, output))

    @guard("export to server", "create", "prediction")
    def export_prediction(self, prediction_id: int, folder: str = "") -> list[str]:
        """Write the prediction's outputs as OME-Zarr images into ``$NEUROSEG_EXPORT_ROOT`` or the subfolder
        of it named by ``folder`` (off when unset: the downloads are what a user gets), under names made
        from the prediction's id; returns the paths written. It needs the right to create (viewers export
        by downloading): it writes on the server. See :func:`storage.records.predictions.export_folder`."""
        return [str(p) for p in self._tx(predictions.export_prediction, self.store, prediction_id, folder)]

    @looks
    def prediction_file(self, prediction_id: int, output: str) -> bytes:
        return self._tx(predictions.prediction_file, self.store, prediction_id, output)
