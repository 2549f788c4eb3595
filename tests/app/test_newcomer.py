"""What a new lab member hit in a real browser (issue 9), each as a browser test against the real server:
a deep link right after a restart, one dataset selection across every page, a second prediction shown
as soon as it starts, strokes that survive a reload (and a warning before leaving with strokes the
server has not got yet), production server settings, and downloads that do not sit in server memory."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pytest
import tifffile

from storage.service import Neuroseg
from storage.settings import Settings
from tests.accounts import SESSION_COOKIE, make_user
from tests.app.test_loop_pages import wait_exit
from tests.browser import (
    ARTIFACTS,
    annotate_render,
    app_server,
    await_annotate_render,
    chromium,
    free_port,
    signed_in,
)
from unet.network.config import preset
from unet.training.synthetic import make_synthetic_em

pytestmark = pytest.mark.slow
TIMEOUT_MS = 90_000
PAGES = [re.compile(rf"{name}$") for name in ("Home", "Datasets", "Annotate", "Train", "Predict", "Runs",
                                                         "Models")]


def store(data_dir: Path) -> Neuroseg:
    return Neuroseg(Settings.from_env(data_dir), supervise=False)


def tiff(data: np.ndarray, name: str) -> io.BytesIO:
    buf = io.BytesIO()
    tifffile.imwrite(buf, data, imagej=True, metadata={"axes": "ZYX"})
    buf.seek(0)
    buf.name = name
    return buf


def three_datasets(data_dir: Path) -> list:
    svc = store(data_dir)
    made = []
    for i, name in enumerate(("alpha", "beta", "gamma")):
        volume, labels = make_synthetic_em((3, 96 + 16 * i, 96), np.random.default_rng(i), cell_size=20)
        made.append(svc.import_upload(tiff(volume, f"{name}.tif"), tiff(labels, f"{name}-labels.tif"), name=name))
    return made


def trained_demo(data_dir: Path):
    """The demo dataset and a finished tiny run on it (a real worker process)."""
    svc = store(data_dir)
    demo = svc.load_demo()
    run = svc.submit_training([{"dataset_id": demo.id, "slices": [0, 1, 2]}], [{"dataset_id": demo.id, "slices": [7]}],
                              preset("tiny"), preset="tiny")
    wait_exit(svc.run(run.id).pid)
    assert svc.run(run.id).status == "FINISHED", svc.run_log(run.id)
    return demo


def sidebar_links(page):
    return page.locator('[data-testid="stSidebarNav"] a')


def new_page(browser, url, **kwargs):
    """A new browser (its own cookies), signed in to the server at ``url`` as the annotator ann."""
    from playwright.sync_api import expect

    expect.set_options(timeout=TIMEOUT_MS)
    page = browser.new_page(viewport={"width": 1400, "height": 1300}, **kwargs)
    page.set_default_timeout(TIMEOUT_MS)
    return signed_in(page, url)


def test_a_deep_link_right_after_a_restart_opens_the_app_not_the_folder(tmp_path):
    """The first request a fresh server gets is /train (a bookmark, or a tab that reconnects): the page
    must come up inside the app's frame (its seven pages, the account box), never Streamlit's folder listing
    of pages/ (app, annotate, common, …), and so must the next sessions."""
    from playwright.sync_api import expect

    data_dir = tmp_path / "data"
    three_datasets(data_dir)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with chromium() as browser:
        for first, title in (("train", "Train"), ("common", "Neuroseg")):  # twice: a restart each time
            with app_server(data_dir) as url:
                page = new_page(browser, url)
                page.goto(f"{url}/{first}")
                expect(sidebar_links(page)).to_have_text(PAGES)
                page.get_by_role("heading", name=title, exact=True).wait_for()
                expect(page.get_by_text("Signed in as ann")).to_have_count(1)
                page.screenshot(path=ARTIFACTS / f"deep-link-{first}.png", full_page=True)
                other = new_page(browser, url)
                other.goto(f"{url}/annotate")
                expect(sidebar_links(other)).to_have_text(PAGES)
                other.get_by_role("heading", name="Annotate", exact=True).wait_for()
                other.close()
                page.close()


def open_page(page, title: str) -> None:
    """Go to a page by its sidebar link and wait until that page is drawn (its heading): until then the
    browser still shows the last page, whose widgets a locator could find and click. A click that lands
    while the last page's rerun redraws the sidebar is lost (Streamlit replaces the link under it), so the
    link is clicked again if the page has not come after a while, as a user would."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    for attempt in range(3):
        sidebar_links(page).filter(has_text=re.compile(rf"{title}$")).click()
        try:
            page.get_by_role("heading", name=title, exact=True).wait_for(timeout=20_000 if attempt < 2 else None)
            return
        except PlaywrightTimeout:
            if attempt == 2:
                raise


def annotate_settled(page) -> None:
    """Wait until Annotate's canvas has told the server its first state (in a rerun of its own, once its
    picture has loaded; the page's leave guard says so). A sidebar click just before that rerun is sent
    loses to it: Streamlit sends the canvas's value with the page the browser still shows, and the newer
    request's page wins, so the app stays on, or comes back to, Annotate. A person meets this only when
    leaving within a moment of the page appearing, and then clicks again."""
    page.wait_for_function("() => (window.__neurosegLeaveGuard || {}).settled === true")


HOLD_FIT = """
// Holds the first message that carries the canvas's first state ("backgroundFit") once window.__holdFit is
// set, until window.__releaseFit(): a test can then send it after a click on another page, as a slow machine
// does by chance.
const sendNow = WebSocket.prototype.send;
WebSocket.prototype.send = function (...args) {
  const bytes = args[0] instanceof ArrayBuffer ? new Uint8Array(args[0]) : ArrayBuffer.isView(args[0])
    ? new Uint8Array(args[0].buffer, args[0].byteOffset, args[0].byteLength) : null;
  if (window.__holdFit && !window.__heldFit && bytes
      && new TextDecoder().decode(bytes).includes("backgroundFit")) {
    window.__heldFit = [this, args];
    return;
  }
  return sendNow.apply(this, args);
};
window.__releaseFit = () => sendNow.apply(window.__heldFit[0], window.__heldFit[1]);
"""


SEEN_NAV = """
window.__navSeen = window.__navSeen || new Set();
const links = '[data-testid="stSidebarNav"] a, [data-testid="stSidebarNavItems"] a';
new MutationObserver(() => document.querySelectorAll(links).forEach((a) => window.__navSeen.add(a.innerText.trim())))
  .observe(document, {subtree: true, childList: true, characterData: true});
"""


def test_an_open_tab_never_shows_the_folder_of_pages_across_a_restart(tmp_path):
    """A tab open on Train while the server restarts reconnects to the new server: every page list it shows
    meanwhile is the app's (never Streamlit's listing of pages/: app, common, …), and it comes back on Train."""
    from playwright.sync_api import expect

    data_dir = tmp_path / "data"
    three_datasets(data_dir)
    port = free_port()
    with chromium() as browser:
        with app_server(data_dir, port=port) as url:
            page = new_page(browser, url)
            page.goto(f"{url}/train")
            page.get_by_role("heading", name="Train", exact=True).wait_for()
            page.evaluate(SEEN_NAV)
        with app_server(data_dir, port=port) as url:  # the same address: the tab reconnects by itself
            expect(sidebar_links(page)).to_have_text(PAGES)
            page.get_by_role("heading", name="Train", exact=True).wait_for()
            seen = set(page.evaluate("Array.from(window.__navSeen)"))
    names = ("Home", "Datasets", "Annotate", "Train", "Predict", "Runs", "Models")
    assert seen and all(text.endswith(names) for text in seen), seen  # (a link's text ends with its page's name)


def test_the_selected_dataset_follows_the_user_through_every_page_and_a_reload(tmp_path):
    """beta (not the newest, which is the default) is chosen on Datasets and stays chosen on every page,
    after a reload too; a choice on Annotate (alpha) is then the shared one."""
    from playwright.sync_api import expect

    data_dir = tmp_path / "data"
    three_datasets(data_dir)
    with app_server(data_dir) as url, chromium() as browser:
        page = new_page(browser, url)
        page.goto(f"{url}/datasets")
        browse = page.get_by_role("combobox", name="Browse dataset", exact=True)
        expect(browse).to_have_value(re.compile(r"gamma"))  # the newest: the default
        browse.click()
        page.get_by_role("option", name=re.compile("beta")).click()
        expect(browse).to_have_value(re.compile(r"beta"))
        page.get_by_text("slice 0 of 3 (96 × 112 pixels").wait_for()  # beta is browsed

        open_page(page, "Annotate")
        expect(page.get_by_role("combobox", name="Dataset", exact=True)).to_have_value(re.compile(r"beta"))
        page.get_by_text("Slice 0: 96 × 112 pixels").wait_for()
        annotate_settled(page)
        open_page(page, "Train")
        try:
            page.get_by_text("Training slices of beta").wait_for()
        finally:
            page.screenshot(path=ARTIFACTS / "train-selected.png", full_page=True)
        expect(page.get_by_text(re.compile("Training slices of (alpha|gamma)"))).to_have_count(0)
        open_page(page, "Predict")
        expect(page.get_by_role("combobox", name="Dataset", exact=True)).to_have_value(re.compile(r"beta"))
        open_page(page, "Runs")
        page.get_by_text("No runs yet").wait_for()
        open_page(page, "Datasets")
        expect(page.get_by_role("combobox", name="Browse dataset", exact=True)).to_have_value(re.compile(r"beta"))

        page.reload()  # F5: the URL carries the selection
        expect(page.get_by_role("combobox", name="Browse dataset", exact=True)).to_have_value(re.compile(r"beta"))

        # a choice on another page is the new shared one
        open_page(page, "Annotate")
        picker = page.get_by_role("combobox", name="Dataset", exact=True)
        expect(picker).to_have_value(re.compile(r"beta"))
        picker.click()
        page.get_by_role("option", name=re.compile("alpha")).click()
        page.get_by_text("Slice 0: 96 × 96 pixels").wait_for()
        # the slice too is kept through a reload (the URL carries it)
        page.get_by_role("button", name="Next ▶").click()
        page.get_by_text("Slice 1: 96 × 96 pixels").wait_for()
        page.get_by_role("button", name="Next ▶").click()
        page.get_by_text("Slice 2: 96 × 96 pixels").wait_for()
        expect(page).to_have_url(re.compile(r"slice=2"))
        page.reload()
        page.get_by_text("Slice 2: 96 × 96 pixels").wait_for()
        annotate_settled(page)
        open_page(page, "Datasets")
        expect(page.get_by_role("combobox", name="Browse dataset", exact=True)).to_have_value(re.compile(r"alpha"))

        # Another tab on beta: Annotate's canvas says its first state in a rerun of its own, held here until
        # the user has clicked Train. That late rerun brings Annotate back (Streamlit's doing: the browser sends
        # it with the page it still shows), but never another dataset or slice.
        late = new_page(browser, url)
        late.add_init_script(HOLD_FIT)
        late.add_init_script("window.__holdFit = true")
        late.goto(f"{url}/annotate?dataset=2&slice=2")
        late.get_by_text("Slice 2: 96 × 112 pixels").wait_for()
        late.wait_for_function("() => !!window.__heldFit")
        sidebar_links(late).filter(has_text=re.compile(r"Train$")).click()
        late.wait_for_url(re.compile(r"/train"))  # (the browser has asked for Train)
        late.evaluate("window.__releaseFit()")
        annotate_settled(late)  # (the held state has reached the server)
        expect(late.get_by_role("combobox", name="Dataset", exact=True)).to_have_value(re.compile(r"beta"))
        late.get_by_text("Slice 2: 96 × 112 pixels").wait_for()  # (not the slider's default, slice 0)
        expect(late).to_have_url(re.compile(r"slice=2"))
        late.close()


def test_a_started_prediction_is_the_one_shown_with_its_progress_then_its_result(tmp_path):
    from playwright.sync_api import expect

    data_dir = tmp_path / "data"
    trained_demo(data_dir)
    with app_server(data_dir) as url, chromium() as browser:
        page = new_page(browser, url)
        page.goto(f"{url}/predict")
        slices = page.get_by_role("textbox", name="Slices")
        slices.fill("0")
        page.get_by_role("button", name="Predict", exact=True).click()
        page.get_by_text("slice 0: mask").wait_for()
        pick = page.get_by_role("combobox", name="Prediction")
        expect(pick).to_have_value(re.compile(r"^#1 "))

        slices.fill("5-7")
        page.get_by_role("button", name="Predict", exact=True).click()
        expect(pick).to_have_value(re.compile(r"^#2 "))  # at once, with its progress, not #1
        page.get_by_text("slice 5: mask").wait_for()  # then its result
        expect(pick).to_have_value(re.compile(r"^#2 · run 1 · 3 slice"))
        expect(page.get_by_text("slice 0: mask")).to_have_count(0)
        page.screenshot(path=ARTIFACTS / "predict-second.png", full_page=True)


def unsaved_pixels(page) -> int:
    text = page.get_by_text(re.compile(r"Unsaved: [\d,]+ pixels changed")).first.inner_text()
    return int(re.search(r"Unsaved: ([\d,]+)", text).group(1).replace(",", ""))


def stroke(page, canvas, y: int, x0: int, x1: int) -> None:
    box = canvas.bounding_box()
    page.mouse.move(box["x"] + x0, box["y"] + y)
    page.mouse.down()
    page.mouse.move(box["x"] + x1, box["y"] + y, steps=12)
    page.mouse.up()


def test_unsaved_strokes_survive_a_reload_and_a_new_tab_and_leaving_too_early_asks_first(tmp_path):
    from playwright.sync_api import expect

    data_dir = tmp_path / "data"
    svc = store(data_dir)
    demo = svc.load_demo()
    with app_server(data_dir) as url, chromium() as browser:
        expect.set_options(timeout=TIMEOUT_MS)
        context = browser.new_context(viewport={"width": 1400, "height": 1300})
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        dialogs, answer = [], {"stay": False}
        page.on("dialog", lambda d: (dialogs.append(d.type), d.dismiss() if answer["stay"] else d.accept()))
        signed_in(page, url)
        page.goto(url)
        page.get_by_role("link", name="Annotate").first.click()
        canvas = page.locator("canvas.upper-canvas")
        canvas.wait_for()
        page.get_by_text("No unsaved changes on this slice.").wait_for()
        canvas.scroll_into_view_if_needed()
        stroke(page, canvas, 300, 100, 500)
        page.get_by_text("Unsaved:").first.wait_for()
        painted = unsaved_pixels(page)
        assert painted > 100
        page.wait_for_function("window.__neurosegLeaveGuard && !window.__neurosegLeaveGuard.pending")

        page.reload()  # F5 once the strokes are kept: no question, a new session, the same user and slice
        page.get_by_text("Signed in as ann").wait_for()  # the sign-in's cookie
        page.get_by_text("Restored your unsaved changes on this slice").wait_for()
        assert unsaved_pixels(page) == painted
        assert dialogs == [], "the strokes were kept: leaving asked for nothing"
        page.screenshot(path=ARTIFACTS / "annotate-restored.png", full_page=True)

        tab = context.new_page()  # a new tab finds them too, and the other pages say so
        tab.set_default_timeout(TIMEOUT_MS)
        tab.goto(f"{url}/datasets")
        tab.get_by_text(f"Unsaved annotation on slice 0 of {demo.name}").wait_for()
        tab.close()
        page.bring_to_front()

        # a stroke the server has not received yet: leaving asks first, and staying loses nothing
        canvas = page.locator("canvas.upper-canvas")
        canvas.scroll_into_view_if_needed()
        answer["stay"] = True
        stroke(page, canvas, 500, 100, 500)
        with page.expect_event("dialog"):
            page.close(run_before_unload=True)
        assert dialogs == ["beforeunload"]
        assert not page.is_closed(), "the user chose to stay"
        expect(page.get_by_text(re.compile(r"Unsaved: [\d,]+ pixels changed"))).not_to_have_text(
            re.compile(rf"Unsaved: {painted:,} pixels"))  # the second stroke reached the server and is kept
        assert unsaved_pixels(page) > painted

        # a stroke and at once a click on another page (before the canvas sends it, 200 ms after mouse-up): the
        # click waits until the stroke has reached the server (a user lost it so)
        page.wait_for_function("!window.__neurosegLeaveGuard.pending")
        before = unsaved_pixels(page)
        stroke(page, canvas, 650, 100, 500)
        page.get_by_role("link", name="Datasets").first.click()
        page.get_by_role("heading", name="Datasets").wait_for()
        context.close()
    ann = next(u for u in svc.users() if u.username == "ann")
    kept = svc.drafts_of(f"user:{ann.id}")
    assert [(d.dataset_id, d.slice_index) for d in kept] == [(demo.id, 0)]
    assert kept[0].changed_pixels > before > painted
    assert [m.version for m in svc.history(demo.id, 0)] == [1], "nothing saved behind the user's back"


def inotify_watches(pid: int) -> int:
    count = 0
    for fdinfo in Path(f"/proc/{pid}/fdinfo").iterdir():
        try:
            count += fdinfo.read_text().count("inotify wd:")
        except OSError:
            continue
    return count


def test_the_server_runs_with_production_settings(tmp_path, monkeypatch):
    """Started the way ./run.sh starts it (the repository's .streamlit/config.toml, nothing overridden):
    no file watcher on the tree (it overflowed inotify and cost seconds of CPU per page switch), no
    Deploy button or developer menu, and an unexpected error's traceback for the server's log only."""
    import tomllib

    from playwright.sync_api import expect

    monkeypatch.delenv("STREAMLIT_CLIENT_SHOW_ERROR_DETAILS", raising=False)  # (the tests' own, see conftest)
    with open(Path(__file__).resolve().parents[2] / ".streamlit" / "config.toml", "rb") as f:
        assert tomllib.load(f)["client"]["showErrorDetails"] in ("type", "none"), "tracebacks show server paths"
    data_dir = tmp_path / "data"
    with app_server(data_dir) as url, chromium() as browser:
        page = new_page(browser, url)
        page.goto(url)
        page.get_by_role("heading", name="Neuroseg").wait_for()
        page.get_by_role("link", name="Datasets").first.click()
        page.get_by_role("heading", name="Datasets").wait_for()
        assert inotify_watches(url.pid) == 0, "the server watches the source tree"
        expect(page.locator('[data-testid="stAppDeployButton"]')).to_have_count(0)
        page.locator('[data-testid="stMainMenu"]').click()
        expect(page.get_by_text("Clear cache")).to_have_count(0)
        expect(page.get_by_text("Rerun", exact=True)).to_have_count(0)


def media_bytes(url: str) -> int:
    """What the server holds in memory for st.image / st.download_button (Streamlit's own metrics, an admin's
    to read: anonymous clients are refused)."""
    import urllib.error
    import urllib.request

    with pytest.raises(urllib.error.HTTPError, match="403"):
        urllib.request.urlopen(f"{url}/_stcore/metrics", timeout=30)
    token = make_user(url.data_dir, "metrics-admin", "admin")
    request = urllib.request.Request(f"{url}/_stcore/metrics", headers={"Cookie": f"{SESSION_COOKIE}={token}"})
    with urllib.request.urlopen(request, timeout=30) as r:
        text = r.read().decode()
    return sum(int(float(m.group(1))) for m in re.finditer(
        r'cache_memory_bytes\{[^}]*cache_type="st_memory_media_file_storage"[^}]*\} ([\d.e+]+)', text))


def test_viewers_of_a_prediction_do_not_hold_its_files_in_server_memory(tmp_path):
    from playwright.sync_api import expect

    data_dir = tmp_path / "data"
    demo = trained_demo(data_dir)
    svc = store(data_dir)
    best = next(c for c in svc.checkpoint_choices() if c.kind == "best")
    job = svc.predict(best.id, demo.id, list(range(8)))
    wait_exit(svc.prediction(job.id).pid)
    tiff_size = len(svc.prediction_file(job.id, "probabilities"))
    with app_server(data_dir) as url, chromium() as browser:
        pages = []
        for _ in range(3):
            page = new_page(browser, url, accept_downloads=True)
            page.goto(f"{url}/predict")
            page.get_by_role("button", name="Probabilities (float32 TIFF)").wait_for()
            page.get_by_text("slice 0: mask").wait_for()
            pages.append(page)
        held = media_bytes(url)
        assert held < tiff_size, f"three viewers hold {held:,} bytes of media; one probability TIFF is {tiff_size:,}"
        with pages[0].expect_download() as download:
            pages[0].get_by_role("button", name="Probabilities (float32 TIFF)").click()
        saved = tmp_path / "p.tif"
        download.value.save_as(saved)
        assert tifffile.imread(saved).shape == (8, 256, 256)
        expect(pages[0].get_by_role("button", name="Mask (0/255 TIFF)")).to_have_count(1)


def test_a_large_slice_fits_the_page_and_strokes_land_on_its_pixels(tmp_path):
    """A 1024² slice in a 1280 × 800 window: the canvas is shown at half size (no columns behind a
    scrollbar), the caption says so, and a stroke lands on the image pixels under it."""
    from playwright.sync_api import expect

    from unet.training.labels import MEMBRANE

    data_dir = tmp_path / "data"
    svc = store(data_dir)
    volume, labels = make_synthetic_em((2, 1024, 1024), np.random.default_rng(3), cell_size=60)
    big = svc.import_upload(tiff(volume, "big.tif"), tiff(labels, "big-labels.tif"), name="big")
    with app_server(data_dir) as url, chromium() as browser:
        page = new_page(browser, url)
        page.set_viewport_size({"width": 1280, "height": 800})
        page.goto(f"{url}/annotate")
        page.get_by_text("at 1/2 size").wait_for()
        membrane = page.get_by_role("radio", name=re.compile("Membrane"))
        rendered = annotate_render(page)
        membrane.check(force=True)
        expect(membrane).to_be_checked()
        try:
            page.get_by_text("Painting membrane with a 5-pixel brush").wait_for()
            await_annotate_render(page, rendered)  # the canvas has the new colour
        finally:
            page.screenshot(path=ARTIFACTS / "annotate-1024-tool.png", full_page=True)
        canvas = page.locator("canvas.upper-canvas")
        canvas.scroll_into_view_if_needed()
        box = canvas.bounding_box()
        assert (round(box["width"]), round(box["height"])) == (512, 512)
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth"), "no sideways scrolling"
        stroke(page, canvas, 100, 50, 300)  # display row 100 = image rows 200-201, columns 100 → 600
        page.get_by_text("Unsaved:").first.wait_for()
        page.get_by_role("button", name="Save version").click()
        page.get_by_text("Saved slice 0 as v2").wait_for()
        page.screenshot(path=ARTIFACTS / "annotate-1024.png", full_page=True)
    before, after = (svc.mask(m.id) for m in svc.history(big.id, 0))
    changed = after != before
    rows, cols = np.nonzero(changed)
    assert (after[changed] == MEMBRANE).all() and changed.sum() > 200
    assert rows.min() >= 194 and rows.max() <= 207, (rows.min(), rows.max())
    assert cols.min() >= 94 and cols.max() <= 606, (cols.min(), cols.max())
