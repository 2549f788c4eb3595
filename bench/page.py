"""One Annotate page in Chromium that follows :mod:`bench.loop`'s annotator, as a user has it open."""

from __future__ import annotations

import contextlib
import re
import sys
from pathlib import Path

from bench.common import ROOT


@contextlib.contextmanager
def annotate_page(data: Path, zoom: int = 1):
    """The app served on the store in ``data`` (``streamlit run web/asgi.py``, as ``./run.sh`` does) and one
    Chromium page signed in as an annotator; yields ``follow(dataset, z)``, which opens Annotate on slice z
    (``?slice=``) with Live on, as a user does who moves to the slice they correct, zoomed in ``zoom`` times
    on the slice's middle (Annotate keeps its zoom from one visit to the next)."""
    sys.path.insert(0, str(ROOT))
    from tests.browser import app_server, chromium, signed_in

    with app_server(data) as url, chromium() as browser:
        page = signed_in(browser.new_page(viewport={"width": 1400, "height": 1000}), url, "ann")
        page.set_default_timeout(60_000)

        def follow(dataset: int, z: int) -> None:
            page.goto(f"{url}/annotate?dataset={dataset}&slice={z}")
            try:
                page.locator("canvas.upper-canvas").first.wait_for()
            except Exception:
                raise RuntimeError(f"Annotate did not show its canvas: {page.inner_text('body')[:1500]}") from None
            caption = re.compile(rf"live prediction of slice {z}\b", re.IGNORECASE)
            on = page.locator(".st-key-live_panel").get_by_text(caption)
            try:  # (Live stays on for this user once they turned it on: a new tab finds it on)
                on.first.wait_for(timeout=5000)
            except Exception:
                page.get_by_text("Live", exact=True).click()  # the toggle
                on.first.wait_for()
            if zoom > 1 and not page.get_by_text("showing rows").count():
                page.get_by_role("slider", name="Zoom").focus()
                for _ in range(zoom.bit_length() - 1):  # 1 → 2 → 4 → 8
                    page.keyboard.press("ArrowRight")
                page.get_by_text("showing rows").first.wait_for()

        yield follow
