"""The Plotly figures the pages show: a slice's grey-value histogram, the strip of slices coloured by the
kind of their masks, and training curves."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

from domain.kinds import MaskKind
from ui.text import plain_html

# Colours of the slice strip: which kind of mask a slice's latest version is.
KIND_COLOURS = {
    "none": "#d9d9d9",
    MaskKind.UPLOADED: "#4c78a8",
    MaskKind.PAINTED: "#54a24b",
    MaskKind.SCRIBBLE: "#eeca3b",
    MaskKind.PREDICTED: "#b279a2",
    MaskKind.CORRECTED: "#f58518",
    "unsaved": "#e45756",
}



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
    fig.update_layout(height=130, margin=dict(l=10, r=10, t=34, b=30), barmode="overlay", yaxis_visible=False,
                      xaxis=dict(title="slice", range=[-0.6, len(kinds) - 0.4], dtick=max(1, len(kinds) // 20)),
                      legend=dict(orientation="h", y=1.02, yanchor="bottom", x=0), bargap=0)  # above the bars
    return fig


METRIC_NAMES = {"loss": "training loss", "lr": "learning rate", "val_loss": "validation loss",
                "val_pixel_error": "pixel error", "val_dice": "Dice", "val_iou": "IoU", "val_rand_f": "Rand-F",
                "val_vi": "VI", "val_v_rand": "V_rand (ISBI)", "val_v_info": "V_info (ISBI)",
                "val_vi_split": "VI split", "val_vi_merge": "VI merge", "val_are": "adapted Rand error"}


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
                                         name=plain_html(f"run {run_id}: {name}" if many else name)))
    fig.update_layout(title=plain_html(title), height=320, margin=dict(l=10, r=10, t=40, b=10), xaxis_title="step",
                      legend=dict(orientation="h", y=-0.25))
    return fig
