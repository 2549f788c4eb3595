"""Two small browser-side helpers of the Annotate canvas (Streamlit components, pages only):

- :func:`window_room` reports how much room the page has (the main column's width and the window's height,
  in CSS pixels), so the canvas fills a wide window instead of a fixed 768 pixels. Annotate draws it last;
  the browser also keeps the room in a cookie, which a new session reads at its first run, so a reload or
  a new tab draws the canvas at its size at once.
- :func:`live_overlay` lays the newest live prediction over the canvas, between the slice and the strokes,
  without remounting the canvas (its strokes and its undo stay): an image inside the canvas's own box that
  lets every mouse event through.
"""

from __future__ import annotations

import streamlit as st

#: The room assumed until the browser has said (AppTest, the first instant of a page): the canvas of old.
DEFAULT_ROOM = (800, 1000)
ROOM = "_room"  # (this module's own key: the room the browser said, as (width, height))

_JS = """
// "room": the main column's inner width and the window's height, rounded to 32 px so that small changes do
// not redraw the page; sent when they differ from what the server knows ("known"), again when the window
// or the main column (a folded sidebar) changes size.
// "overlay": an <img> of the live prediction inside the canvas's box (its shadow root), above the slice
// and under the strokes, with pointer-events off; removed when the server sends no picture.
const ROOM = window.__neurosegRoom || (window.__neurosegRoom = { sent: "", at: 0 });
const measure = () => {
  const main = document.querySelector('[data-testid="stMainBlockContainer"]');
  if (!main) return "";
  const css = getComputedStyle(main);
  const inner = main.clientWidth - parseFloat(css.paddingLeft || "0") - parseFloat(css.paddingRight || "0");
  const w = Math.floor(inner / 32) * 32, h = Math.floor(window.innerHeight / 32) * 32;
  return w >= 224 && h >= 224 ? w + "x" + h : "";  // (a hidden or tiny column: nothing to say)
};
const report = () => {
  const now = measure();
  if (now && !document.cookie.split("; ").includes("neuroseg_room=" + now)) {  // for the next session's first run
    document.cookie = "neuroseg_room=" + now + "; path=/; max-age=31536000; SameSite=Strict";
  }
  // (a session that knows no room yet, the first in this browser, keeps the default: a rerun while a fresh
  // page mounts its widgets can bring them back to their first values; the cookie serves the next one)
  if (!now || !ROOM.known || now === ROOM.known) return;
  if (now === ROOM.sent && performance.now() - ROOM.at < 2000) return;  // (asked already: wait for it)
  ROOM.sent = now; ROOM.at = performance.now();
  ROOM.set("room", now);
};
const canvasBox = (key) => {
  const host = document.querySelector(".st-key-" + CSS.escape(key));
  if (!host) return null;
  for (const el of host.querySelectorAll("div")) {
    const box = el.shadowRoot && el.shadowRoot.querySelector(".dc-container");
    if (box) return box;
  }
  return null;
};
const OVERLAY = window.__neurosegOverlay || (window.__neurosegOverlay = { tries: 0 });
const lay = () => {
  const want = OVERLAY.want;
  clearTimeout(OVERLAY.timer);
  document.querySelectorAll("[class*='st-key-canvas-']").forEach((host) => {
    for (const el of host.querySelectorAll("div")) {
      const old = el.shadowRoot && el.shadowRoot.querySelector("img.neuroseg-live-overlay");
      if (old && (!want || !want.url || !host.classList.contains("st-key-" + want.canvas))) old.remove();
    }
  });
  if (!want || !want.url) return;
  const box = canvasBox(want.canvas);
  if (!box) {  // the canvas is not drawn yet: look again shortly
    if (OVERLAY.tries++ < 40) OVERLAY.timer = setTimeout(lay, 250);
    return;
  }
  OVERLAY.tries = 0;
  if (getComputedStyle(box).position === "static") box.style.position = "relative";
  let img = box.querySelector("img.neuroseg-live-overlay");
  if (!img) {
    img = document.createElement("img");
    img.className = "neuroseg-live-overlay";
    img.alt = "live prediction";
    img.style.cssText = "position:absolute;left:0;top:0;width:100%;height:100%;pointer-events:none;"
      + "image-rendering:pixelated;z-index:0;";
    box.insertBefore(img, box.querySelector(".canvas-container"));
  }
  if (img.getAttribute("src") !== want.url) img.setAttribute("src", want.url);
  img.dataset.stamp = want.stamp || "";
};
export default function ({ data, setStateValue }) {
  const d = data || {};
  if (d.mode === "room") {
    ROOM.set = setStateValue;
    ROOM.known = d.known || "";
    const main = document.querySelector('[data-testid="stMainBlockContainer"]');
    if (main && ROOM.watched !== main) {  // a resized window, a folded sidebar: the column changes width
      ROOM.watched = main;
      if (ROOM.observer) ROOM.observer.disconnect();
      const later = () => { clearTimeout(ROOM.timer); ROOM.timer = setTimeout(report, 300); };
      ROOM.observer = new ResizeObserver(later);
      ROOM.observer.observe(main);
      if (!ROOM.installed) { ROOM.installed = true; window.addEventListener("resize", later); }
    }
    report();
    return;
  }
  OVERLAY.want = d;
  OVERLAY.tries = 0;
  lay();
}
"""


@st.cache_resource
def _component():
    return st.components.v2.component("neuroseg_canvas_aids", js=_JS)


def _parse_room(text: object) -> tuple[int, int] | None:
    if not isinstance(text, str) or "x" not in text:
        return None
    try:
        w, h = (int(v) for v in text.split("x", 1))
    except ValueError:
        return None
    return (w, h) if 200 <= w <= 20000 and 200 <= h <= 20000 else None


def room() -> tuple[int, int]:
    """(main column width, window height) in CSS pixels as the browser last said, kept in the session (so
    every page knows it); a new session starts from the browser's cookie (written by :func:`window_room`'s
    component: no rerun is needed to learn it), else :data:`DEFAULT_ROOM`."""
    known = st.session_state.get(ROOM)
    if known is None:
        try:
            known = _parse_room(st.context.cookies.get("neuroseg_room"))
        except Exception:  # no browser (AppTest)
            known = None
        if known is not None:
            st.session_state[ROOM] = known
    return known or DEFAULT_ROOM


def window_room() -> tuple[int, int]:
    """Have the browser say how much room the page has (:func:`room`). Draw once per run, at its end: a
    report that differs from what the session knows reruns the page."""
    room()
    known = st.session_state.get(ROOM)
    result = _component()(data={"mode": "room", "known": f"{known[0]}x{known[1]}" if known else ""},
                          key="neuroseg_room", height=0, on_room_change=lambda: None)
    sent = _parse_room(getattr(result, "room", None))
    if sent is not None:
        known = st.session_state[ROOM] = sent
    return known or DEFAULT_ROOM


def live_overlay(canvas_key: str, url: str | None, stamp: str = "") -> None:
    """Lay ``url`` (an RGBA picture of the canvas's region) over the canvas ``canvas_key``; None takes any
    overlay away. ``stamp`` (e.g. the prediction's step) is kept on the image for tests and tools."""
    _component()(data={"mode": "overlay", "canvas": canvas_key, "url": url, "stamp": stamp},
                 key="neuroseg_live_overlay", height=0)
