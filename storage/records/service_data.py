"""The service's data (part of :class:`storage.service.Neuroseg`): datasets (import, rename, read, delete),
mask versions and drafts, the held-out slices and the default model of a dataset
(:mod:`storage.records.datasets`, :mod:`storage.records.ingest`, :mod:`storage.records.masks`,
:mod:`storage.records.drafts`, :mod:`storage.records.heldout`)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import BinaryIO

import numpy as np

from domain.records import DatasetInfo, Deleted, DraftLike, DraftStart, MaskInfo, StoredDraft, UserError
from domain.scores import HeldOut, Score
from storage import text
from storage.facade import Facade, cleaned, guard, looks
from storage.records import datasets, deletion, drafts, files, heldout, ingest, masks
from storage.records.files import IntegrityError
from storage.records.volumes import Volume
from storage.review import worklist

log = logging.getLogger(__name__)


class DataService(Facade):
    """Datasets, masks and drafts, held-out slices."""

    # --- datasets ---------------------------------------------------------------------------------------
    @looks
    def datasets(self) -> list[DatasetInfo]:
        return self._tx(datasets.list_datasets)

    @looks
    def dataset(self, dataset_id: int) -> DatasetInfo:
        return self._tx(datasets.get_dataset, dataset_id)

    @guard("upload", "create", creates="dataset")
    def import_upload(self, volume: BinaryIO, labels: BinaryIO | None = None, *, name: str = "", notes: str = "",
                      author: str = "", progress: ingest.Progress | None = None,
                      channels_as_z: bool = False, labels_as: str = "auto") -> DatasetInfo:
        """Store an uploaded volume (and its labels) as a new dataset; see :func:`storage.records.ingest.import_upload`.
        A name typed is refused when too long; one taken from the file's name is cut (:mod:`storage.text`)."""
        name = cleaned(text.clean_name, name, "A dataset's name") or text.clean_name(
            Path(getattr(volume, "name", "") or "upload").stem, cut=True) or "upload"
        notes = cleaned(text.clean_notes, notes)
        return ingest.import_upload(self.sessions, self.store, volume, labels, name=name, notes=notes,
                                    author=self._author(author),
                                    progress=progress, channels_as_z=channels_as_z, labels_as=labels_as)

    @staticmethod
    def server_folders() -> tuple[list[str], str | None]:
        """(the folders stacks may be imported from, the folder exports go into): what the admin set in
        ``$NEUROSEG_IMPORT_ROOTS`` and ``$NEUROSEG_EXPORT_ROOT``; empty and None when they are off (the
        default), so a page can say so instead of offering a form that is always refused."""
        root = files.export_root()
        return [str(r) for r in files.import_roots()], str(root) if root else None

    @guard("upload", "create", creates="dataset")
    def import_path(self, path: str, *, link: bool = False, name: str = "", author: str = "",
                    progress: ingest.Progress | None = None) -> DatasetInfo:
        """A stack already on the server (OME-Zarr, zarr or N5 folder) as a dataset, copied or linked
        read-only; only from the folders ``$NEUROSEG_IMPORT_ROOTS`` names (off when unset), and every
        refusal of a path says the same words; see :func:`storage.records.ingest.import_path`."""
        name = cleaned(text.clean_name, name, "A dataset's name")
        return ingest.import_path(self.sessions, self.store, path, link=link, name=name, author=self._author(author),
                                  progress=progress)

    @guard("load demo", "create", creates="dataset")
    def load_demo(self, author: str = "") -> DatasetInfo:
        return ingest.load_demo(self.sessions, self.store, self._author(author))

    @guard("load ISBI 2012", "create", creates="dataset")
    def load_isbi(self, author: str = "", progress: ingest.Progress | None = None) -> DatasetInfo:
        return ingest.load_isbi(self.sessions, self.store, self._author(author), progress)

    @guard("rename", "manage", "dataset", owned=True)
    def update(self, dataset_id: int, *, name: str | None = None, notes: str | None = None) -> DatasetInfo:
        """Rename a dataset and set its notes (:mod:`storage.text`: no controls, within the length limits)."""
        return self._tx(datasets.update_dataset, dataset_id, name=cleaned(text.clean_name, name, "A dataset's name"),
                        notes=cleaned(text.clean_notes, notes))

    @looks
    def volume(self, dataset_id: int) -> Volume | np.ndarray:
        """The stack, read lazily: ``volume[z]`` reads one slice (or ``volume.levels[k][z]`` one slice of the
        overview pyramid); the server never holds the whole stack (:class:`storage.records.volumes.Volume`)."""
        info = self.dataset(dataset_id)
        return self._cached(("volume", info.id, info.sha256),
                            lambda: self._tx(datasets.load_volume, self.store, info.id))

    @looks
    def value_range(self, dataset_id: int) -> tuple[float, float]:
        """The lowest and highest voxel of the stack (recorded when it was stored)."""
        volume = self.volume(dataset_id)
        low, high = getattr(volume, "value_range", (None, None))
        if low is None or high is None:  # a linked stack: its middle slice tells (never the whole stack)
            middle = volume[volume.shape[0] // 2]
            low, high = float(np.min(middle)), float(np.max(middle))
        return float(low), float(high)

    @looks
    def deletion_preview(self, dataset_id: int) -> Deleted:
        return self._deletion_preview(lambda s: deletion.plan_dataset(s, self.store, dataset_id),
                                      f"dataset {dataset_id}")

    @guard("delete", "manage", "dataset", owned=True)
    def delete_dataset(self, dataset_id: int) -> Deleted:
        return self._delete_planned(lambda s: deletion.plan_dataset(s, self.store, dataset_id), f"dataset {dataset_id}")

    # --- masks and drafts -------------------------------------------------------------------------------
    @looks
    def slice_kinds(self, dataset_id: int) -> dict[int, MaskInfo]:
        """The latest mask version of every slice that has one."""
        return self._tx(masks.slice_kinds, dataset_id)

    @looks
    def history(self, dataset_id: int, slice_index: int) -> list[MaskInfo]:
        return self._tx(masks.mask_history, dataset_id, slice_index)

    @looks
    def mask(self, mask_id: int) -> np.ndarray:
        return self._tx(masks.load_mask, self.store, mask_id)

    @guard("restore", "annotate", "mask")
    def restore(self, mask_id: int, author: str = "") -> MaskInfo:
        return self._tx(masks.restore_mask, self.store, mask_id, author=self._author(author))

    @looks
    def draft_start(self, dataset_id: int, slice_index: int, source: str = "latest", *, mask_id: int | None = None,
                    prediction_id: int | None = None) -> DraftStart:
        """What an edit starts from: the mask version ``mask_id``, the prediction ``prediction_id`` (its mask
        of this slice), or nothing (every pixel unlabelled)."""
        return self._tx(drafts.start, self.store, dataset_id, slice_index, source, mask_id, prediction_id)

    @guard("save mask", "annotate",
            target=lambda draft, *a, **k: f"dataset {draft.dataset_id} slice {draft.slice_index}")
    def save_draft(self, draft: DraftLike, author: str = "", owner: str | None = None) -> MaskInfo:
        """Save the draft's mask as a new version, exactly as it is, and forget the owner's kept copy. A
        newer version saved meanwhile by someone else raises :class:`MaskConflict` and the draft is kept."""
        info = self._tx(drafts.save, self.store, draft, self._author(author), self._owner(owner))
        draft.saved(info.id, info.kind)
        try:  # the queue's items this user took on the slice are done (the save stands either way)
            self._tx(worklist.done, draft.dataset_id, draft.slice_index, info.id, info.author)
        except Exception:
            log.exception("the queue's items of slice %s were not marked done", draft.slice_index)
        return info

    @guard("keep draft", "annotate", record=False)
    def keep_draft(self, draft: DraftLike, owner: str, *, replace: bool = False) -> None:
        """Keep the draft in the store as it is now (or forget it when nothing is changed), so a reload, a
        new tab or a restart finds it. Called by the Annotate page after every change. Another tab's or
        browser's newer edit of the slice is not overwritten (:class:`DraftClash`) unless ``replace``."""
        draft.kept_as = self._tx(drafts.keep_edit, self.store, draft, self._owner(owner), replace=replace)

    @looks
    def stored_draft(self, dataset_id: int, slice_index: int, owner: str) -> StoredDraft | None:
        """The owner's kept draft of a slice, with its two masks, or None."""
        return self._tx(drafts.load, self.store, dataset_id, slice_index, self._owner(owner))

    @looks
    def drafts_of(self, owner: str) -> list[StoredDraft]:
        """Every slice on which this owner has unsaved changes kept in the store."""
        return self._tx(drafts.of_owner, self._owner(owner))

    # --- held-out slices and the default model --------------------------------------------------------
    @looks
    def held_out(self, dataset_id: int) -> HeldOut | None:
        return self._tx(heldout.held_out, dataset_id)

    @guard("set held-out", "manage", "dataset", owned=True)
    def set_held_out(self, dataset_id: int, slices: list[int]) -> HeldOut | None:
        """Freeze these labelled slices (their current versions) as the dataset's held-out set: a new
        version. Runs are compared within a version."""
        return self._tx(heldout.set_held_out, dataset_id, slices)

    @looks
    def held_out_seen(self, dataset_id: int) -> HeldOut | None:
        """The held-out set with the runs that trained on each of its slices."""
        return self._tx(heldout.held_out_seen, dataset_id)

    @looks
    def trained_on(self, checkpoint_id: int, dataset_id: int) -> list[int]:
        """The dataset's slices this checkpoint (its run, or a run it was fine-tuned from) trained on: its
        scores there say little about unseen data."""
        return self._tx(heldout.checkpoint_trained_on, checkpoint_id, dataset_id)

    @looks
    def trained_elsewhere(self, checkpoint_id: int, dataset_id: int) -> str:
        """What this checkpoint trained on that this store did not record, where it touches the dataset ("":
        nothing; see :func:`storage.records.heldout.trained_elsewhere`)."""
        return self._tx(heldout.trained_elsewhere, checkpoint_id, dataset_id)

    @looks
    def held_out_scores(self, dataset_id: int) -> list[Score]:
        """Every run scored on the dataset's held-out slices, with its change against parent and best."""
        return self._tx(heldout.scores, dataset_id)

    @guard("score", "train", "run")
    def score_run(self, run_id: int) -> int:
        """Score a run (and its parent) on the held-out slices now, in this process (runs that end are
        scored by their worker). Returns how many scores were written."""
        try:
            return heldout.score_run(self.sessions, self.store, run_id)
        except (ValueError, LookupError, IntegrityError) as exc:
            raise UserError(str(exc)) from exc

    @guard("promote", "manage", "dataset", owned=True)
    def promote(self, dataset_id: int, checkpoint_id: int | None) -> None:
        """Make a checkpoint the dataset's default model (what Predict and Live start from)."""
        self._tx(heldout.promote, dataset_id, checkpoint_id)

    @looks
    def default_model(self, dataset_id: int) -> int | None:
        return self._tx(heldout.default_model, dataset_id)
