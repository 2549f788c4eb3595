"""The service the pages call, on a real store in tmp_path: uploads with progress and refusals, the
demo, deletion previews, and the drafts of the Annotate page (merge, save, conflict, rebase, remount)."""

import io

import numpy as np
import pytest
import tifffile

from storage.service import MaskConflict, Neuroseg, UserError
from storage.settings import Settings
from tests.drafts import new_draft, start_options
from ui.annotation import Draft
from ui.paint import PALETTE, View
from unet.training.labels import IGNORE, MEMBRANE, NEURON


@pytest.fixture
def svc(tmp_path):
    return Neuroseg(Settings.from_env(tmp_path / "data"))


def tiff_bytes(data: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, data, **kw)
    return buf.getvalue()


class Upload(io.BytesIO):
    """What Streamlit's file_uploader hands over: a BytesIO with a name and a size."""

    def __init__(self, name: str, content: bytes):
        super().__init__(content)
        self.name, self.size = name, len(content)


def paint(view: View, cls: int, rows: slice, cols: slice) -> np.ndarray:
    rgba = np.zeros((*view.display_shape, 4), np.uint8)
    rgba[rows, cols] = (*PALETTE[cls], 153)
    return rgba


def test_upload_with_progress_then_browse(svc, synthetic):
    volume, labels = synthetic
    seen = []
    info = svc.import_upload(Upload("stack.tif", tiff_bytes(volume)), Upload("labels.tif", tiff_bytes(labels)),
                             name="", notes="from the test", progress=lambda stage, f: seen.append((stage, f)))
    assert info.name == "stack" and info.source_name == "stack.tif" and info.notes == "from the test"
    assert info.labelled_slices == volume.shape[0]
    fractions = [f for _, f in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and 0 <= fractions[0] < 0.25
    assert any("labels of slice" in stage for stage, _ in seen)
    assert not list((svc.store.root / "tmp").glob("*")), "the spooled upload copies are removed"
    np.testing.assert_array_equal(svc.volume(info.id), volume)
    assert set(svc.slice_kinds(info.id)) == set(range(volume.shape[0]))


def test_class_labels_upload_as_named_and_their_unlabelled_slices_have_no_mask(svc):
    """An ilastik-style label file (1 = neuron, 2 = membrane, 0 = not labelled): Detect refuses it and says
    how to name it, and nothing is stored; named, it becomes masks with the rest unlabelled, and a slice with
    no labels at all gets no mask."""
    volume = np.random.default_rng(0).integers(0, 255, (5, 32, 40), dtype=np.uint8)  # (3 or 4: RGB(A))
    classes = np.zeros(volume.shape, np.uint8)
    classes[0, :10, :10], classes[0, 20:, :] = 1, 2
    classes[2, 5:8, 5:30] = 2
    with pytest.raises(UserError, match=r"ilastik.tif, slice 1: the labels hold only the values 0, 1, 2"):
        svc.import_upload(Upload("scan.tif", tiff_bytes(volume)), Upload("ilastik.tif", tiff_bytes(classes)))
    assert svc.datasets() == []
    info = svc.import_upload(Upload("scan.tif", tiff_bytes(volume)), Upload("ilastik.tif", tiff_bytes(classes)),
                             labels_as="classes-neuron-first")
    assert info.labelled_slices == 2 and svc.history(info.id, 1) == [] == svc.history(info.id, 3)
    first = svc.mask(svc.history(info.id, 0)[0].id)
    assert (first[:10, :10] == NEURON).all() and (first[20:] == MEMBRANE).all()
    assert (first[10:20] == IGNORE).all() and svc.history(info.id, 0)[0].labelled_pixels == 100 + 12 * 40
    with pytest.raises(UserError, match="labels are read as one of"):
        svc.import_upload(Upload("scan.tif", tiff_bytes(volume)), Upload("ilastik.tif", tiff_bytes(classes)),
                          labels_as="pickle")


@pytest.mark.parametrize(("volume", "labels", "message"), [
    (b"this is not a TIFF", None, "scan.tif: this is not a TIFF file (it does not start like one)"),
    ("rgb", None, "scan.tif: colour image (3 samples per pixel, shape (4, 32, 32, 3)); expected a grey-scale"),
    ("ok", "wrong_shape", "labels.tif: labels have shape (6, 48, 48) but the image stack has shape (6, 96, 96)"),
])
def test_refused_uploads_say_why_with_the_users_file_names_and_leave_nothing(svc, synthetic, volume, labels,
                                                                             message):
    vol, lab = synthetic
    payload = {"rgb": tiff_bytes(np.zeros((4, 32, 32, 3), np.uint8), photometric="rgb"), "ok": tiff_bytes(vol),
               "wrong_shape": tiff_bytes(lab[:, :48, :48])}
    with pytest.raises(UserError) as caught:
        svc.import_upload(Upload("scan.tif", payload.get(volume, volume)),
                          Upload("labels.tif", payload[labels]) if labels else None)
    assert message in str(caught.value)
    assert ".tif" in str(caught.value) and "tmp" not in str(caught.value)
    assert svc.datasets() == []
    assert not list((svc.store.root / "tmp").glob("*"))
    stored = svc.store.root / "datasets"
    assert not stored.exists() or not any(p.is_file() for p in stored.rglob("*"))


def test_a_full_disk_while_receiving_an_upload_is_a_clear_refusal(svc, synthetic, monkeypatch):
    import errno

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")

    from storage.records import ingest

    monkeypatch.setattr(ingest, "_spool", full)
    with pytest.raises(UserError, match=r"disk .* is full"):
        svc.import_upload(Upload("stack.tif", tiff_bytes(synthetic[0])))
    assert svc.datasets() == []


def test_demo_preview_and_delete(svc):
    info = svc.load_demo(author="ann")
    assert info.shape == (8, 256, 256) and info.labelled_slices == 8
    preview = svc.deletion_preview(info.id)
    assert (preview.datasets, preview.mask_versions, preview.runs) == (1, 8, 0)
    assert preview.files == 9  # the volume (one OME-Zarr folder) and 8 masks
    removed = svc.delete_dataset(info.id)
    assert removed == preview
    assert svc.overview().datasets == 0


def test_draft_save_is_exactly_what_was_shown(svc):
    info = svc.load_demo()
    options = start_options(svc, info.id, 2)
    assert [o.source for o in options] == ["latest", "nothing"]
    draft = new_draft(svc, info.id, 2, options[0])
    view = View.fit((256, 256), zoom=2, centre=(0.5, 0.5))
    draft.set_view(view)
    first_key = draft.canvas_key
    draft.apply(paint(view, MEMBRANE, slice(100, 140), slice(0, 600)))
    assert draft.dirty
    before = np.array(draft.original)
    saved = svc.save_draft(draft, author="bo")
    assert (saved.version, saved.kind, saved.author) == (2, "painted", "bo")
    stored = svc.mask(saved.id)
    np.testing.assert_array_equal(stored, draft.working)
    changed = stored != before
    assert changed.any() and (stored[changed] == MEMBRANE).all()
    rows, cols = np.nonzero(changed)
    # display rows 100-139 at 6× from row 64 of the slice → image rows 81-87 (blocks at least half painted)
    assert rows.min() >= 64 + 100 // 6 and rows.max() <= 64 + 139 // 6 and cols.min() >= 64 and cols.max() < 192
    assert draft.canvas_key != first_key and not draft.dirty  # a fresh canvas over the saved version
    assert [m.version for m in svc.history(info.id, 2)] == [1, 2]


def test_scribble_conflict_rebase_and_restore(svc):
    info = svc.load_demo()
    options = start_options(svc, info.id, 0)
    mine = new_draft(svc, info.id, 0, options[-1])  # nothing: a scribble
    assert mine.kind == "scribble" and (mine.working == IGNORE).all()
    mine.set_view(View.fit((256, 256)))
    mine.apply(paint(mine.view, NEURON, slice(0, 30), slice(0, 30)))

    theirs = new_draft(svc, info.id, 0, options[0])  # someone else edits the latest version meanwhile
    theirs.set_view(View.fit((256, 256)))
    theirs.apply(paint(theirs.view, MEMBRANE, slice(600, 630), slice(600, 630)))
    their_version = svc.save_draft(theirs, author="cy")

    with pytest.raises(MaskConflict, match="newer version \\(v2 by cy\\)"):
        svc.save_draft(mine, author="ann")
    assert mine.dirty, "a refused save keeps the draft"
    mine.rebase(svc.mask(their_version.id), their_version.id, their_version.kind)
    saved = svc.save_draft(mine, author="ann")
    stored = svc.mask(saved.id)
    assert (stored[:10, :10] == NEURON).all(), "my strokes"
    np.testing.assert_array_equal(stored[200:210, 200:210], svc.mask(their_version.id)[200:210, 200:210])
    assert saved.version == 3 and saved.parent_id == their_version.id

    first = svc.history(info.id, 0)[0]
    restored = svc.restore(first.id, author="ann")
    assert restored.version == 4 and restored.kind == "uploaded" and restored.restored_from_id == first.id
    np.testing.assert_array_equal(svc.mask(restored.id), svc.mask(first.id))


def test_strokes_survive_a_remounted_canvas_and_a_change_of_view(svc):
    info = svc.load_demo()
    draft = new_draft(svc, info.id, 1, start_options(svc, info.id, 1)[-1])
    whole = View.fit((256, 256))
    draft.set_view(whole)
    draft.apply(paint(whole, NEURON, slice(0, 30), slice(0, 30)))
    first = np.array(draft.working)
    draft.set_view(View.fit((256, 256), zoom=2))  # zooming bakes the strokes
    np.testing.assert_array_equal(draft.view_base, first)
    draft.apply(None)
    draft.remount()  # the page was left and the canvas came back empty
    draft.apply(paint(draft.view, MEMBRANE, slice(0, 12), slice(0, 12)))
    assert (draft.working[:10, :10] == NEURON).sum() > 0 and (draft.working == MEMBRANE).sum() > 0
    assert (draft.working[:10, :10] == NEURON).all(), "earlier strokes kept, the new ones are elsewhere"
    draft.discard()
    assert not draft.dirty


def two_strokes() -> tuple[Draft, np.ndarray, np.ndarray]:
    """A blank 64² draft on its canvas, and what the canvas sends after one stroke and after two."""
    draft = Draft.blank(1, 0, (64, 64), None)
    whole = View.fit((64, 64))
    draft.set_view(whole)
    first = paint(whole, NEURON, slice(0, 40), slice(0, 40))
    both = first.copy()
    both[200:240, 200:240] = (*PALETTE[MEMBRANE], 153)
    return draft, first, both


def test_undo_outlives_the_canvas_and_walks_the_toolbars_history_too():
    draft, first, both = two_strokes()
    draft.apply(first)
    after_first = np.array(draft.working)
    draft.apply(both)
    after_both = np.array(draft.working)
    assert draft.can_undo and not draft.can_redo

    draft.apply(first)  # the canvas toolbar's undo: a step back, not a third change
    np.testing.assert_array_equal(draft.working, after_first)
    assert draft.can_redo and len(draft.done) == 1
    draft.apply(both)  # … and its redo
    np.testing.assert_array_equal(draft.working, after_both)
    assert not draft.can_redo

    key = draft.canvas_key
    draft.set_view(View.fit((64, 64), zoom=2))  # zooming remounts the canvas: the history stays
    assert draft.canvas_key != key
    assert draft.undo()
    np.testing.assert_array_equal(draft.working, after_first)
    np.testing.assert_array_equal(draft.view_base, after_first)  # the new canvas shows it, empty of strokes
    assert draft.undo() and not draft.dirty and not draft.undo()
    assert draft.redo() and draft.redo() and not draft.redo()
    np.testing.assert_array_equal(draft.working, after_both)

    draft.discard()  # a discard is a change like any other: undo brings the strokes back
    assert not draft.dirty and draft.undo()
    np.testing.assert_array_equal(draft.working, after_both)
    assert draft.undo() and draft.apply(paint(draft.view, MEMBRANE, slice(0, 96), slice(0, 96))) is None
    assert not draft.can_redo, "a new change after an undo drops what redo would have made"

    draft.saved(7, "scribble")
    assert not draft.can_undo, "a saved version is where undo starts afresh"


def test_undo_splits_two_strokes_sent_together_takes_an_accept_back_whole_and_stays_in_budget():
    from ui.annotation import trim_histories
    from ui.history import Step

    draft, a, both = two_strokes()
    whole = draft.view
    draft.apply(both)  # two strokes that reached the server in one send: one step
    after_both = np.array(draft.working)
    draft.apply(a)  # the toolbar takes back the second: the step splits
    assert len(draft.done) == 1 and draft.can_redo and (draft.working == MEMBRANE).sum() == 0
    assert draft.undo() and not draft.dirty, "the page's Undo then takes back the first"
    assert draft.redo() and draft.redo()
    np.testing.assert_array_equal(draft.working, after_both)

    predicted = np.full((64, 64), NEURON, np.uint8)
    kind = draft.kind
    draft.accept(predicted)
    assert draft.kind == "predicted→painted" and draft.done[-1].where.dtype == np.uint8, "a dense step: bits"
    assert draft.done[-1].nbytes < draft.done[-1].before.size * 6, "smaller than int32 indices"
    assert draft.undo() and draft.kind == kind, "undoing an Accept gives back what the save will be called"
    np.testing.assert_array_equal(draft.working, after_both)
    assert draft.redo() and draft.kind == "predicted→painted"

    other = Draft.blank(1, 1, (64, 64), None)
    other.set_view(whole)
    other.apply(a)
    trim_histories([other, draft], draft, budget=draft.history_bytes)
    assert not other.can_undo and draft.can_undo, "the other slice's history goes first, never the one shown"
    sparse = np.zeros((64, 64), np.uint8)
    sparse[[0, 1, 2, 3], [0, 1, 2, 3]] = 1
    step = Step.between(np.zeros((64, 64), np.uint8), sparse)
    assert step.where.dtype == np.int32 and list(step.indices()) == [0, 65, 130, 195], "a sparse step: indices"


def test_a_draft_that_starts_from_nothing_on_an_empty_slice(svc, synthetic):
    volume, _ = synthetic
    info = svc.import_upload(Upload("stack.tif", tiff_bytes(volume)))
    options = start_options(svc, info.id, 0)
    assert [o.source for o in options] == ["nothing"]
    draft = new_draft(svc, info.id, 0, options[0])
    assert isinstance(draft, Draft) and draft.latest_id is None
    draft.set_view(View.fit(volume.shape[1:]))
    draft.apply(paint(draft.view, MEMBRANE, slice(0, 16), slice(0, 16)))
    saved = svc.save_draft(draft)
    assert saved.kind == "scribble" and saved.parent_id is None and 0 < saved.labelled_pixels < volume[0].size


@pytest.mark.isbi
def test_the_isbi_sample_loads_with_all_its_labels(tmp_path, isbi_dir, monkeypatch):
    monkeypatch.setenv("NEUROSEG_ISBI_DIR", str(isbi_dir))
    svc = Neuroseg(Settings.from_env(tmp_path / "data"), supervise=False)
    info = svc.load_isbi(author="ann")
    assert info.shape == (30, 512, 512) and info.dtype == "uint8" and info.labelled_slices == 30
    assert info.source_name == "train-volume.tif"
    np.testing.assert_array_equal(svc.volume(info.id), tifffile.imread(isbi_dir / "train-volume.tif"))
    mask = svc.mask(svc.history(info.id, 12)[-1].id)
    labels = tifffile.imread(isbi_dir / "train-labels.tif")[12]
    np.testing.assert_array_equal(mask == NEURON, labels == 255)


def test_object_tools_edit_a_draft_like_a_stroke_and_the_save_records_them(svc, synthetic):
    """Accept and merge on the neurons of a prediction: each is one step of the draft (undo takes it back
    whole, redo makes it again), the save is a corrected prediction, and the version says which tools made
    it (the brush too); versions saved before the tools record none."""
    from domain.kinds import Tool
    from ui.annotation import history_rows
    from unet.prediction import objects

    volume, labels = synthetic
    info = svc.import_upload(Upload("stack.tif", tiff_bytes(volume)), Upload("labels.tif", tiff_bytes(labels)))
    draft = new_draft(svc, info.id, 0, start_options(svc, info.id, 0)[0])  # the uploaded labels
    draft.set_view(View.fit(volume.shape[1:]))
    h, w = volume.shape[1:]
    instances = np.zeros((h, w), np.int32)
    instances[:, : w // 2], instances[:, w // 2:] = 1, 2
    start = np.array(draft.working)
    accepted = objects.accept(draft.working, instances, 1)
    assert draft.use_tool(accepted, Tool.ACCEPT) == int(np.count_nonzero(accepted != start))
    assert draft.kind == "predicted→painted" and draft.tools == ("accept",)
    assert draft.use_tool(objects.merge(draft.working, instances, 1, 2), Tool.MERGE) > 0
    merged = np.array(draft.working)
    assert draft.undo() and np.array_equal(draft.working, accepted), "undo takes the merge back whole"
    assert draft.redo() and np.array_equal(draft.working, merged)
    assert draft.use_tool(merged, Tool.ERASE) == 0, "a tool that changes nothing is no step"
    assert draft.use_tool(objects.erase(merged, instances, 2), Tool.ERASE) > 0 and "erase" in draft.tools
    assert draft.undo() and draft.tools == ("accept", "merge"), "an undone tool made nothing of the save"
    draft.apply(paint(draft.view, MEMBRANE, slice(0, 16), slice(0, 16)))
    saved = svc.save_draft(draft)
    assert saved.kind == "predicted→painted" and saved.tools == ("accept", "brush", "merge")
    np.testing.assert_array_equal(svc.mask(saved.id)[:, w // 2:], merged[:, w // 2:])
    assert draft.tools == (), "the next save starts a new list"
    rows = history_rows(svc.history(info.id, 0))
    assert [r["tools"] for r in rows] == ["accept, brush, merge", ""], "the upload: no tools"
    with pytest.raises(ValueError, match="unknown tools"):
        from storage.records import masks
        with svc.sessions() as s:
            masks.save_mask(s, svc.store, info.id, 0, merged, kind="painted", parent_id=saved.id, tools=["lasso"])


def test_validation_slices_that_cannot_judge_a_run_are_named_before_it_starts(svc):
    """One erased neuron as the only validation slice chose a run's best step (step 10 of 400) by chance."""
    from storage.records.masks import save_mask

    demo = svc.load_demo()
    assert svc.validation_note([{"dataset_id": demo.id, "slices": [6, 7]}]) is None  # (fully labelled: fine)
    few = np.full(demo.shape[1:], IGNORE, np.uint8)
    few[40:100, 40:100] = NEURON  # one neuron, painted
    thin = np.full(demo.shape[1:], IGNORE, np.uint8)
    thin[:, :120] = NEURON
    thin[:, 120:124] = MEMBRANE  # a band of membrane: one neuron open to the unlabelled rest, none whole
    with svc.sessions.begin() as s:
        for z, mask in ((6, few), (7, thin)):
            parent = svc.history(demo.id, z)[-1].id
            save_mask(s, svc.store, demo.id, z, mask, kind="painted", parent_id=parent)
    note = svc.validation_note([{"dataset_id": demo.id, "slices": [6]}])
    assert "they hold only 3,600 labelled pixels; every labelled pixel in them is neuron" in note
    assert "Label more of them, or choose others" in note
    note = svc.validation_note([{"dataset_id": demo.id, "slices": [7]}])
    assert note.endswith("none of them outlines two whole neurons, so only pixel error can measure the run: the "
                         "best may be chosen by chance. Label more of them, or choose others."), note
    assert svc.validation_note([]) is None
