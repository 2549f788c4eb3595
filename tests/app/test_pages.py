"""Every page under Streamlit's AppTest (the real script, no browser) over a real store in tmp_path.
AppTest cannot draw, so strokes are handed to the canvas through its session-state value, in the form
the browser sends them."""

import base64
import io
import os
import re
import warnings
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image
from streamlit.testing.v1 import AppTest

from storage.service import Neuroseg
from storage.settings import Settings
from tests.accounts import make_user
from tests.drafts import new_draft, start_options
from ui.annotation import Draft
from ui.paint import PALETTE, View
from unet.training.labels import MEMBRANE, NEURON

ROOT = Path(__file__).resolve().parents[2]
PAGES = {"Datasets": "pages/datasets.py", "Annotate": "pages/annotate.py", "Train": "pages/train.py",
         "Predict": "pages/predict.py", "Runs": "pages/runs.py", "Models": "pages/models.py"}


def store(app_data_dir: Path) -> Neuroseg:
    return Neuroseg(Settings.from_env(app_data_dir), supervise=False)


def app(page: str | None = None, user: str = "ann", role: str = "annotator") -> AppTest:
    """The app signed in as ``user`` (an account made in the test's store)."""
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=90)
    at.session_state["auth_token"] = make_user(os.environ["NEUROSEG_DATA_DIR"], user, role)
    at.run()
    if page:
        at.switch_page(PAGES[page]).run()
    assert not at.exception, at.exception
    return at


def tiff_bytes(data: np.ndarray) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, data)
    return buf.getvalue()


def walk(node):
    yield node
    for child in getattr(node, "children", {}).values():
        yield from walk(child)


def canvas_key(at: AppTest) -> str:
    keys = [e.key for e in walk(at.main) if (getattr(e, "key", None) or "").startswith("canvas-")]
    assert len(keys) == 1, keys
    return keys[0]


def draw(at: AppTest, rows: slice, cols: slice, cls: int, shape=(768, 768)) -> None:
    """Hand the canvas a stroke as the browser would: the RGBA strokes (no background) as a PNG."""
    rgba = np.zeros((*shape, 4), np.uint8)
    rgba[rows, cols] = (*PALETTE[cls], 153)
    buf = io.BytesIO()
    Image.fromarray(rgba).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    at.session_state[canvas_key(at)] = {"drawing": {"raw": {"objects": []}, "data": url}, "backgroundFit": None}
    at.run()
    assert not at.exception, at.exception


def texts(elements) -> str:
    return "\n".join(str(e.value) for e in elements)


def test_home_with_an_empty_store(app_data_dir):
    from unet.network.device import describe_device

    at = app()
    assert at.title[0].value == "Neuroseg"
    metrics = {m.label: m.value for m in at.metric}
    assert metrics == {"Datasets": "0", "Training runs": "0"}
    assert f"Compute device  \n**{describe_device()}**" in texts(at.markdown), "the whole name, not cut off"
    assert [b.label for b in at.main.button] == ["Load demo dataset"], "no ISBI button without the ISBI files"
    assert "Signed in as **ann** · annotator" in texts(at.sidebar.caption)
    assert "NEUROSEG_ISBI_DIR" in texts(at.caption)
    assert len([e for e in walk(at.main) if type(e).__name__ == "PageLink"]) == 6


def test_home_loads_the_demo_and_the_isbi_sample(app_data_dir, tmp_path, monkeypatch, synthetic):
    isbi = tmp_path / "isbi"
    isbi.mkdir()
    volume, labels = synthetic  # stands in for the ISBI files: same names, small
    tifffile.imwrite(isbi / "train-volume.tif", volume)
    tifffile.imwrite(isbi / "train-labels.tif", labels)
    monkeypatch.setenv("NEUROSEG_ISBI_DIR", str(isbi))
    at = app()
    at.button[0].click().run()
    assert "Loaded **Demo: synthetic EM** (8 slices of 256×256, 8 with labels)" in texts(at.success)
    at.button[1].click().run()
    assert "Loaded **ISBI 2012 training stack** (6 slices of 96×96, 6 with labels)" in texts(at.success)
    assert {m.label: m.value for m in at.metric}["Datasets"] == "2"
    names = [d.name for d in store(app_data_dir).datasets()]
    assert names == ["Demo: synthetic EM", "ISBI 2012 training stack"]


def test_every_page_renders_with_an_empty_store(app_data_dir):
    for title in PAGES:
        at = app(title)
        assert at.title[0].value == title
    at = app("Datasets")
    assert "No datasets yet" in texts(at.info)
    assert at.file_uploader[0].label.startswith("Volume")
    at = app("Annotate")
    assert "No datasets yet" in texts(at.info)


def shown(elements) -> str:
    """What the user reads of ``elements``' Markdown: its backslash escapes (a refusal's text, shown as is) gone."""
    return re.sub(r"\\(.)", r"\1", texts(elements))


def test_upload_refusals_say_what_is_wrong_and_store_nothing(app_data_dir, synthetic):
    volume, labels = synthetic
    at = app("Datasets")
    at.file_uploader[0].upload("broken.tif", b"II*\x00garbage", "image/tiff")
    at.button[0].click().run()
    assert ("**broken.tif** was not stored: broken.tif: the TIFF holds no image (is the file truncated or damaged?)"
            in shown(at.error))
    at.file_uploader[0].upload("stack.tif", tiff_bytes(volume), "image/tiff")
    at.file_uploader[1].upload("labels.tif", tiff_bytes(labels[:, :48, :48]), "image/tiff")
    at.button[0].click().run()
    assert "**stack.tif and labels.tif** were not stored" in shown(at.error)
    assert "labels have shape (6, 48, 48) but the image stack has shape (6, 96, 96)" in shown(at.error)
    assert [u.value.name for u in at.file_uploader] == ["stack.tif", "labels.tif"], "the files stay attached"
    at.button[0].click().run()  # submitted again as they are: the same refusal, nothing to attach again
    assert "**stack.tif and labels.tif** were not stored" in shown(at.error)
    at.file_uploader[0].upload("photo.tif", b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, "image/tiff")
    at.file_uploader[1].clear()
    at.button[0].click().run()
    assert "photo.tif: this is a PNG image, not a TIFF" in shown(at.error)
    assert "header=" not in shown(at.error)
    assert store(app_data_dir).datasets() == []
    assert not list((app_data_dir / "tmp").glob("*"))


def test_a_grey_stack_saved_as_channels_can_be_read_as_slices(app_data_dir, synthetic):
    """tifffile.imwrite(..., imagej=True) without axes stores Z×Y×X as channels: the page asks, and
    stores the slices when told to."""
    volume, _ = synthetic
    buf = io.BytesIO()
    tifffile.imwrite(buf, volume, imagej=True)
    at = app("Datasets")
    at.file_uploader[0].upload("channels.tif", buf.getvalue(), "image/tiff")
    at.button[0].click().run()
    assert "holds 6 channels of one image" in texts(at.warning)
    assert store(app_data_dir).datasets() == []
    at.button(key="channels_as_z").click().run()
    assert "Stored **channels**: 6 × 96 × 96 uint8." in texts(at.success)
    stored = store(app_data_dir)
    assert np.array_equal(stored.volume(stored.datasets()[0].id), volume)

    # a 3-slice stack saved by tifffile without "photometric" is one RGB image of separate planes: asked too
    three = volume[:3]
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # (tifffile says it will stop doing this)
        tifffile.imwrite(buf, three)
    at = app("Datasets")
    at.file_uploader[0].upload("three.tif", buf.getvalue(), "image/tiff")
    at.button[0].click().run()
    assert "holds one colour image of 3 separate planes" in texts(at.warning)
    assert at.button(key="channels_as_z").label == "Read them as 3 Z slices and store"
    at.button(key="channels_as_z").click().run()
    assert "Stored **three**: 3 × 96 × 96 uint8." in texts(at.success)
    assert np.array_equal(stored.volume(stored.datasets()[-1].id), three)
    # the question is in the audit trail as asked, not as a failed upload
    assert [r.outcome for r in stored.audit_trail(action="upload")] == ["ok", "asked", "ok", "asked"]


def test_upload_then_browse_rename_and_delete(app_data_dir, synthetic):
    volume, labels = synthetic
    at = app("Datasets")
    at.file_uploader[0].upload("stack.tif", tiff_bytes(volume), "image/tiff")
    at.file_uploader[1].upload("labels.tif", tiff_bytes(labels), "image/tiff")
    at.text_input[0].set_value("Cortex A")  # the form's name field
    at.button[0].click().run()
    assert "Stored **Cortex A**: 6 × 96 × 96 uint8, 6 labelled slices." in texts(at.success)
    table = at.dataframe[0].value
    assert list(table["name"]) == ["Cortex A"] and list(table["labelled slices"]) == ["6 / 6"]
    kinds = [getattr(e, "type", "") for e in walk(at.main)]
    assert kinds.count("image") == 1 and kinds.count("plotly_chart") == 1  # the slice and its histogram
    at.slider(key=f"browse_slice_{store(app_data_dir).datasets()[0].id}").set_value(4).run()
    assert "Slice 4: mask v1 (uploaded, by ann)" in texts(at.caption)  # the signed-in uploader

    dataset_id = store(app_data_dir).datasets()[0].id
    delete = at.button(key=f"delete_{dataset_id}")
    assert delete.disabled, "deleting needs the name typed"
    assert "removes 1 dataset, 6 mask versions, 7 files" in texts(at.warning)
    at.text_input(key=f"confirm_delete_{dataset_id}").set_value("Cortex A").run()
    at.button(key=f"delete_{dataset_id}").click().run()
    assert "Deleted **Cortex A**: 1 dataset, 6 mask versions, 7 files." in texts(at.success)
    assert store(app_data_dir).datasets() == []
    assert not (app_data_dir / "datasets" / str(dataset_id)).exists()


def test_annotate_paint_save_history_and_restore(app_data_dir):
    svc = store(app_data_dir)
    demo = svc.load_demo()
    before = svc.mask(svc.history(demo.id, 0)[-1].id)
    at = app()
    at.switch_page(PAGES["Annotate"]).run()
    assert "No unsaved changes on this slice." in texts(at.markdown)
    # a membrane stroke across cells: display rows 300-329 at 3× are image rows 100-109
    draw(at, slice(300, 330), slice(90, 690), MEMBRANE)
    assert "**Unsaved:" in texts(at.markdown) and "saved as *painted* by *ann*" in texts(at.markdown)
    at.button(key="save_mask").click().run()
    assert "Saved slice 0 as **v2** (painted," in texts(at.success)
    history = svc.history(demo.id, 0)
    assert [(m.version, m.kind, m.author) for m in history] == [(1, "uploaded", ""), (2, "painted", "ann")]
    after = svc.mask(history[-1].id)
    changed = np.argwhere(after != before)
    assert len(changed) > 0 and (after[after != before] == MEMBRANE).all()
    assert changed[:, 0].min() >= 100 and changed[:, 0].max() <= 109
    assert changed[:, 1].min() >= 30 and changed[:, 1].max() <= 229
    assert list(at.dataframe[0].value["version"]) == ["v2", "v1"]

    at.button(key="restore").click().run()  # the only older version: v1
    assert "Restored v1 as v3." in texts(at.success)
    np.testing.assert_array_equal(svc.mask(svc.history(demo.id, 0)[-1].id), before)
    assert list(at.dataframe[0].value["from"])[:2] == ["restores v1", "v1"], "v3 names the version it copies"


def _png_url(picture: Image.Image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    picture.save(buf, format=fmt)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_what_the_canvas_sends_is_decoded_only_when_it_is_the_canvass_own_png(app_data_dir):
    """The canvas's value comes from the browser. Its library decoded whatever Pillow reads, whole, before the
    size was looked at (a 0.75 MB PNG of 12,000² pixels: 549 MiB per rerun), and a value of another kind
    showed a traceback. Only a PNG of the canvas's size is decoded; anything else is no stroke."""
    import tracemalloc

    from ui.paint import decode_strokes

    rgba = np.zeros((40, 60, 4), np.uint8)
    rgba[5:9, 5:50] = (*PALETTE[MEMBRANE], 153)
    np.testing.assert_array_equal(decode_strokes(_png_url(Image.fromarray(rgba)), (40, 60)), rgba)
    big = _png_url(Image.new("RGBA", (3000, 3000)))
    tracemalloc.start()
    try:
        assert decode_strokes(big, (768, 768)) is None  # (its header says so: nothing decoded)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * 2**20, peak
    for forged in (5, None, [1], "data:image/png;base64,!!!", "data:image/png;base64," + "A" * 40,
                   _png_url(Image.new("RGB", (60, 40))), _png_url(Image.new("RGBA", (60, 40)), "TIFF"),
                   _png_url(Image.new("RGBA", (60, 40)), "GIF"), "text/plain,x"):
        assert decode_strokes(forged, (40, 60)) is None, forged
    # and on the page: forged values are no strokes, and no traceback
    store(app_data_dir).load_demo()
    at = app()
    at.switch_page(PAGES["Annotate"]).run()
    for data in (7, "not a data url", big, _png_url(Image.new("RGB", (768, 768)))):
        at.session_state[canvas_key(at)] = {"drawing": {"raw": {"objects": []}, "data": data}, "backgroundFit": None}
        at.run()
        assert not at.exception, at.exception
        assert "No unsaved changes on this slice." in texts(at.markdown)
    draw(at, slice(300, 330), slice(90, 690), MEMBRANE)  # the canvas's own strokes still count
    assert "**Unsaved:" in texts(at.markdown)


def test_unsaved_strokes_are_kept_across_slices_and_pages(app_data_dir):
    demo = store(app_data_dir).load_demo()
    at = app("Annotate")
    draw(at, slice(0, 60), slice(0, 60), NEURON)
    draw(at, slice(0, 60), slice(0, 60), MEMBRANE)  # the canvas sends all its strokes each time
    changed = int(next(m.value for m in at.markdown if "**Unsaved:" in m.value).split("**Unsaved: ")[1].split()[0]
                  .replace(",", ""))
    assert changed > 0
    at.button(key="next_slice").click().run()
    assert at.slider(key=f"annotate_slice_{demo.id}").value == 1
    assert "Unsaved changes are also waiting on slice 0" in texts(at.warning)
    at.switch_page("pages/datasets.py").run()  # (the frame's warning there is checked in the browser test:
    assert not at.exception                     # AppTest drops what a frame draws before a switched page)
    at.switch_page("pages/annotate.py").run()
    at.button(key=next(e.key for e in walk(at.main) if (getattr(e, "key", None) or "").startswith("go_"))).click()
    at.run()
    assert f"**Unsaved: {changed:,} pixels changed**" in texts(at.markdown), "the strokes survived"
    draw(at, slice(700, 768), slice(700, 768), NEURON)  # a remounted canvas: earlier strokes stay baked in
    now = int(next(m.value for m in at.markdown if "**Unsaved:" in m.value).split("**Unsaved: ")[1].split()[0]
              .replace(",", ""))
    assert now >= changed
    at.button(key="discard_mask").click().run()
    assert "No unsaved changes on this slice." in texts(at.markdown)


def test_a_conflict_offers_one_choice_beside_its_message(app_data_dir):
    """Someone saves the slice while I paint it: my save is refused, my changes are kept, and the message
    carries the two ways on (move my changes onto theirs, or drop mine and open theirs); moving then saving
    keeps both their version and my strokes."""
    svc = store(app_data_dir)
    demo = svc.load_demo()
    at = app("Annotate")
    draw(at, slice(0, 30), slice(0, 30), MEMBRANE)
    theirs = new_draft(svc, demo.id, 0, start_options(svc, demo.id, 0)[0])
    theirs.set_view(View.fit((256, 256), target=256))
    rgba = np.zeros((256, 256, 4), np.uint8)
    rgba[200:220, 200:220] = (*PALETTE[NEURON], 153)
    theirs.apply(rgba)
    svc.save_draft(theirs, "bob")
    at.button(key="save_mask").click().run()
    message = texts(at.error)
    assert "Not saved: slice 0 now has **v2** by bob" in message and "changed pixels are kept" in message
    assert "apply your strokes again" not in message
    assert {b.key for b in at.button if b.key in ("rebase", "discard_for_latest")} == {"rebase", "discard_for_latest"}
    assert at.button(key="save_mask").disabled, "one choice first, then save"
    at.button(key="rebase").click().run()
    assert "Your changes now sit on v2" in texts(at.info)
    at.button(key="save_mask").click().run()
    history = svc.history(demo.id, 0)
    assert [m.version for m in history] == [1, 2, 3] and history[-1].parent_id == history[1].id
    saved = svc.mask(history[-1].id)
    assert (saved[:10, :10] == MEMBRANE).all() and (saved[205:215, 205:215] == NEURON).all()


def unsaved(at: AppTest) -> str:
    return next(m.value for m in at.markdown if "**Unsaved:" in m.value)


def test_another_tab_of_mine_on_the_slice_is_never_overwritten_silently(app_data_dir):
    """Two tabs of one user on one slice: this tab keeps its strokes, the other tab paints and keeps after it.
    This tab's next change (an Undo here) does not overwrite the other's edit: it says so, and the user
    chooses to open the other tab's edit or to keep their own (found on a new user's journey: a reload of one
    tab lost 431 pixels painted in the other)."""
    from storage.auth import accounts

    svc = store(app_data_dir)
    demo = svc.load_demo()
    at = app("Annotate")
    draw(at, slice(0, 30), slice(0, 30), MEMBRANE)
    mine = f"user:{svc._tx(lambda s: accounts.user_by_name(s, 'ann').id)}"
    other = Draft.from_stored(svc.stored_draft(demo.id, 0, mine))  # the other tab opens the slice: my edit
    other.set_view(View.fit((256, 256), target=256))
    rgba = np.zeros((256, 256, 4), np.uint8)
    rgba[200:240, 200:240] = (*PALETTE[NEURON], 153)
    other.apply(rgba)
    svc.keep_draft(other, mine)  # …paints, and keeps
    at.button(key="undo_edit").click().run()  # this tab changes its edit
    assert "Another tab or browser where you are signed in has unsaved changes on slice 0" in texts(at.warning)
    assert "No unsaved changes on this slice." in texts(at.markdown)  # (the undo took this tab's stroke back)
    np.testing.assert_array_equal(svc.stored_draft(demo.id, 0, mine).working, other.working)  # not dropped
    at.button(key="clash_open_theirs").click().run()
    assert f"**Unsaved: {other.changed_pixels:,} pixels changed** (kept in the store)" in unsaved(at)
    assert "Another tab" not in texts(at.warning)

    other.apply(np.roll(rgba, -100, axis=0))  # the other tab paints again; this tab, behind, discards
    svc.keep_draft(other, mine)
    at.button(key="discard_mask").click().run()
    assert "Another tab or browser" in texts(at.warning) and svc.stored_draft(demo.id, 0, mine) is not None
    at.button(key="clash_keep_mine").click().run()  # mine: nothing changed, so nothing kept
    assert "Another tab" not in texts(at.warning) and svc.stored_draft(demo.id, 0, mine) is None

    # one tab alone is never told of another: paint, then start again from something else
    draw(at, slice(0, 30), slice(0, 30), MEMBRANE)
    assert svc.stored_draft(demo.id, 0, mine) is not None
    start = next(r for r in at.radio if (r.key or "").startswith("start_"))
    start.set_value(len(start.options) - 1).run()
    next(b for b in at.button if b.label.startswith("Discard my changes and start from")).click().run()
    assert "Another tab" not in texts(at.warning) and svc.stored_draft(demo.id, 0, mine) is None


def test_a_folder_on_the_server_is_imported_from_the_datasets_page(app_data_dir, tmp_path, monkeypatch):
    from storage.records.server_folders import REFUSED
    from storage.records.volumes import write_volume

    volume = np.random.default_rng(4).integers(0, 255, (3, 40, 50), dtype=np.uint8)
    folder = tmp_path / "lab" / "sample.ome.zarr"
    write_volume(folder, iter(volume), volume.shape, volume.dtype)
    monkeypatch.delenv("NEUROSEG_IMPORT_ROOTS", raising=False)
    at = app("Datasets")  # off by default: the page says so and how an admin turns it on, and offers no form
    assert "NEUROSEG_IMPORT_ROOTS" in texts(at.info) and not [t for t in at.text_input if t.key == "import_path"]
    monkeypatch.setenv("NEUROSEG_IMPORT_ROOTS", str(tmp_path / "lab"))
    at.run()
    at.text_input(key="import_path").set_value(str(tmp_path / "lab" / "nothing.zarr"))
    at.button(key="FormSubmitter:import_path_form-Import").click().run()
    assert "was not imported: " in texts(at.error) and REFUSED in texts(at.error)
    at.text_input(key="import_path").set_value(str(folder))
    at.text_input(key="import_path_name").set_value("Lab sample")
    at.toggle(key="import_link").set_value(True)
    at.button(key="FormSubmitter:import_path_form-Import").click().run()
    assert not at.exception, at.exception
    stored = store(app_data_dir)
    (info,) = stored.datasets()
    assert info.name == "Lab sample" and info.shape == (3, 40, 50)
    assert "Linked **Lab sample**" in texts(at.success) + texts(at.toast) + " ".join(m.value for m in at.markdown)
    np.testing.assert_array_equal(stored.volume(info.id)[2], volume[2])


def test_live_starts_from_random_initialisation_when_no_model_exists(app_data_dir, tmp_path, monkeypatch):
    """With no model at all (no starter shipped, no run), Live still starts: from random initialisation,
    the one "Start from" choice, a session without a parent."""
    from tests.store.test_live import wait_exit

    monkeypatch.setenv("NEUROSEG_STARTER_DIR", str(tmp_path / "no-starter"))
    svc = store(app_data_dir)
    demo = svc.load_demo()
    assert svc.checkpoint_choices() == []
    at = app("Annotate")
    at.toggle(key=f"live_on_{demo.id}").set_value(True).run()
    assert not at.exception, at.exception
    start = at.selectbox(key=f"live_start_{demo.id}")
    assert start.options == ["random initialisation (a forest of your strokes teaches it)"]
    at.button(key="live_go").click().run()
    assert not at.exception, at.exception
    session = svc.live(demo.id)
    assert session is not None and session.run.parent_checkpoint_id is None
    assert session.run.config["model"]["initial_features"] == 8
    svc.cancel_run(session.run_id)  # leave no worker behind
    if (pid := svc.run(session.run_id).pid) is not None:
        wait_exit(pid)


def test_the_brush_opacity_and_zoom_are_kept_through_a_visit_to_another_page(app_data_dir):
    store(app_data_dir).load_demo()
    at = app("Annotate")
    at.slider(key="annotate_brush").set_value(17)
    at.slider(key="annotate_opacity").set_value(0.6)
    at.select_slider(key="annotate_zoom").set_value(4).run()
    at.switch_page(PAGES["Datasets"]).run()
    at.switch_page(PAGES["Annotate"]).run()
    assert not at.exception, at.exception
    assert at.slider(key="annotate_brush").value == 17 and at.slider(key="annotate_opacity").value == 0.6
    assert at.select_slider(key="annotate_zoom").value == 4


def test_the_admin_page_shows_what_crashes_left_and_deletes_it(app_data_dir):
    left = app_data_dir / "orphans" / "dataset-1-00000000"
    left.mkdir(parents=True)
    (left / "volume.bin").write_bytes(b"x" * 4096)
    at = app(user="boss", role="admin")
    at.switch_page("pages/admin.py").run()
    assert any("4.0 KB** in `orphans/`" in w.value for w in at.warning), [w.value for w in at.warning]
    listed = next(d.value for d in at.dataframe if "in orphans/" in d.value.columns)
    assert list(listed["in orphans/"]) == ["dataset-1-00000000"]
    assert at.button(key="empty_orphans").disabled  # (asked first)
    at.checkbox(key="orphans_sure").check().run()
    at.button(key="empty_orphans").click().run()
    assert not at.exception, at.exception
    assert any("Deleted what crashes left: 4.0 KB freed." in s.value for s in at.success)
    assert not left.exists() and not [b for b in at.button if b.key == "empty_orphans"]

    # a refused name stays to be corrected, and a second click says the same reason (an emptied form said
    # "Enter a user name" instead); a user made, the form is empty again
    name = next(t for t in at.text_input if t.label == "User name")
    name.input("has space")
    adding = next(b for b in at.button if b.label == "Add user")
    adding.click().run()
    reason = [e.value for e in at.error]
    assert reason and "Enter a user name" not in reason[0]
    assert next(t for t in at.text_input if t.label == "User name").value == "has space"
    next(b for b in at.button if b.label == "Add user").click().run()
    assert [e.value for e in at.error] == reason, "the second click gives the same reason"
    next(t for t in at.text_input if t.label == "User name").input("newcomer")
    next(b for b in at.button if b.label == "Add user").click().run()
    assert any("One-time password for **newcomer**" in s.value for s in at.success)
    assert next(t for t in at.text_input if t.label == "User name").value == ""
    svc = store(app_data_dir)  # the audit trail says whom a change of a user's was on, by name
    newcomer = next(u for u in svc.users() if u.username == "newcomer")
    from storage.auth import audit

    svc._tx(lambda s: audit.record(s, None, "set role", f"user {newcomer.id} → viewer", "ok"))
    svc.close()
    at.run()
    trail = next(d.value for d in at.dataframe if "on" in d.value.columns)
    assert f"user {newcomer.id} (newcomer) → viewer" in trail["on"].tolist(), trail["on"].tolist()


def test_the_dataset_in_the_address_is_the_one_every_page_works_on(app_data_dir, synthetic):
    """The browser's Back or Forward brings an address of another dataset: the page works on that one, not on
    the session's last choice (which a sidebar link then carried to Train: a run on the wrong stack)."""
    volume, _ = synthetic
    svc = store(app_data_dir)
    first = svc.load_demo()
    second = svc.import_upload(io.BytesIO(tiff_bytes(volume)), name="second")
    svc.close()
    at = app("Annotate")
    assert at.selectbox(key="dataset_pick_annotate").value == second.id  # (the newest)
    at.selectbox(key="dataset_pick_annotate").select(first.id).run()
    assert at.query_params["dataset"] == str(first.id)
    at.query_params["dataset"] = str(second.id)  # Back: the address of the page before
    at.run()
    assert not at.exception, at.exception
    assert at.selectbox(key="dataset_pick_annotate").value == second.id
    at.query_params.pop("dataset")  # a sidebar link: no dataset in the address, the session's choice goes on
    at.switch_page(PAGES["Datasets"]).run()
    assert at.selectbox(key="dataset_pick_Browse dataset").value == second.id
    at.query_params["dataset"] = "not a number"
    at.run()
    assert at.selectbox(key="dataset_pick_Browse dataset").value == second.id
