"""What every page shares: the service (opened once per server process), the user's name, the selected
dataset, and a few renderers. Widgets' own keys vanish from ``st.session_state`` on pages that do not
show them, so what must survive a change of page is mirrored under plain keys."""

from __future__ import annotations

import base64
import io

import numpy as np
import plotly.graph_objects as go
import streamlit as st
from PIL import Image

from storage.service import Neuroseg, UserError
from storage.settings import Settings

# Colours of the slice strip: which kind of mask a slice's latest version is.
KIND_COLOURS = {
    "none": "#d9d9d9",
    "uploaded": "#4c78a8",
    "painted": "#54a24b",
    "scribble": "#eeca3b",
    "predicted": "#b279a2",
    "predicted→painted": "#f58518",
    "unsaved": "#e45756",
}


@st.cache_resource(show_spinner="Opening the store …")
def _service(data_dir: str, database_url: str) -> Neuroseg:
    # once per server process and store: migrates, marks orphaned runs, starts queued ones
    return Neuroseg(Settings.from_env(data_dir, database_url))


def service() -> Neuroseg:
    settings = Settings.from_env()
    return _service(str(settings.data_dir), settings.database_url)


def flash(message: str, kind: str = "success") -> None:
    """A message shown once, on the next run of the page (for callbacks)."""
    st.session_state.setdefault("_flash", []).append((kind, message))


def show_flashes() -> None:
    for kind, message in st.session_state.pop("_flash", []):
        getattr(st, kind)(message)


def author_input() -> str:
    """'Your name', remembered for the whole browser session; saved versions carry it."""
    if "author_widget" not in st.session_state:
        st.session_state["author_widget"] = st.session_state.get("author", "")

    def remember() -> None:
        st.session_state["author"] = st.session_state["author_widget"].strip()

    st.text_input("Your name", key="author_widget", on_change=remember, max_chars=100,
                  help="Saved with every mask version you make.")
    st.session_state["author"] = st.session_state["author_widget"].strip()
    return st.session_state["author"]


def select_dataset(dataset_id: int) -> None:
    """Make ``dataset_id`` the selected dataset on the next run of any page."""
    st.session_state["dataset_id"] = st.session_state["_select_dataset"] = dataset_id


def dataset_picker(datasets, label: str = "Dataset", key: str = "dataset_widget") -> int:
    """Select a dataset; the choice is shared by the pages."""
    ids = [d.id for d in datasets]
    current = st.session_state.get("dataset_id")
    if current not in ids:
        current = ids[-1]
    pending = st.session_state.pop("_select_dataset", None)  # asked for by a page (an upload, a link)
    if pending in ids:
        st.session_state[key] = pending
    elif st.session_state.get(key) not in ids:
        st.session_state[key] = current
    names = {d.id: f"{d.name}  ·  #{d.id}  ·  {d.shape[0]}×{d.shape[1]}×{d.shape[2]}" for d in datasets}
    chosen = st.selectbox(label, ids, format_func=names.get, key=key)
    st.session_state["dataset_id"] = chosen
    return chosen


def volume_or_stop(svc: Neuroseg, dataset_id: int) -> np.ndarray:
    """The dataset's stack, or an error that says why it cannot be read (and the page stops there)."""
    try:
        return svc.volume(dataset_id)
    except UserError as exc:
        st.error(f"This dataset's stored stack cannot be read: {exc}.")
        st.stop()


def png_data_url(rgb: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def histogram(image: np.ndarray, low: float, high: float) -> go.Figure:
    values = image.ravel()
    if values.size > 1_000_000:
        values = values[:: values.size // 1_000_000]
    counts, edges = np.histogram(values, bins=128)
    fig = go.Figure(go.Bar(x=(edges[:-1] + edges[1:]) / 2, y=counts, marker_color="#888", width=edges[1] - edges[0],
                           hovertemplate="grey %{x:.0f}: %{y} pixels<extra></extra>"))
    for x in (low, high):
        fig.add_vline(x=x, line_color="#e45756", line_width=2)
    fig.update_layout(height=220, margin=dict(l=10, r=10, t=30, b=10), title="Grey values (red: contrast window)",
                      bargap=0, showlegend=False, yaxis_title="pixels")
    return fig


def slice_strip(kinds: list[str]) -> go.Figure:
    """One cell per slice, coloured by the kind of its latest mask (or unsaved changes)."""
    fig = go.Figure()
    for kind, colour in KIND_COLOURS.items():
        xs = [z for z, k in enumerate(kinds) if k == kind]
        if xs:
            fig.add_trace(go.Bar(x=xs, y=[1] * len(xs), name=kind, marker_color=colour, width=0.9, showlegend=True,
                                 hovertemplate="slice %{x}: " + kind + "<extra></extra>"))
    fig.update_layout(height=110, margin=dict(l=10, r=10, t=10, b=30), barmode="overlay", yaxis_visible=False,
                      xaxis=dict(title="slice", range=[-0.6, len(kinds) - 0.4], dtick=max(1, len(kinds) // 20)),
                      legend=dict(orientation="h", y=1.25, x=0), bargap=0)
    return fig


METRIC_NAMES = {"loss": "training loss", "lr": "learning rate", "val_loss": "validation loss",
                "val_pixel_error": "pixel error", "val_dice": "Dice", "val_iou": "IoU", "val_rand_f": "Rand-F",
                "val_vi": "VI"}


def run_curves_figure(curves_by_run: dict[int, dict[str, list[tuple[int, float, float]]]], keys: list[str],
                      title: str) -> go.Figure:
    """Curves against the step: one line per run and metric."""
    fig = go.Figure()
    many = len(curves_by_run) > 1
    for run_id, curves in curves_by_run.items():
        for key in keys:
            points = curves.get(key, [])
            if points:
                name = METRIC_NAMES.get(key, key)
                fig.add_trace(go.Scatter(x=[p[0] for p in points], y=[p[1] for p in points],
                                         mode="lines+markers" if len(points) < 30 else "lines",
                                         name=f"run {run_id}: {name}" if many else name))
    fig.update_layout(title=title, height=320, margin=dict(l=10, r=10, t=40, b=10), xaxis_title="step",
                      legend=dict(orientation="h", y=-0.25))
    return fig
