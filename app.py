"""Neuroseg: the Streamlit frame. For now a home page over the engine; the Datasets, Annotate, Train,
Predict and Runs pages arrive with the store (see the open issues)."""

from __future__ import annotations

import streamlit as st

from unet.config import PRESETS
from unet.device import describe_device

st.set_page_config(page_title="Neuroseg", page_icon="🧠", layout="wide")


@st.cache_resource
def _device() -> str:
    return describe_device()


def home() -> None:
    st.title("Neuroseg")
    st.write(
        "Segment neurons in electron-microscopy stacks with a U-Net: upload a TIFF stack, paint or correct "
        "masks, train in the background, look at the predictions, and keep the history."
    )
    st.metric("Compute device", _device())
    st.subheader("Training presets")
    st.table([{"preset": name, "width": c.model.initial_features, "depth": c.model.depth,
               "padding": c.model.padding, "patch": c.patch_size, "batch": c.batch_size, "steps": c.steps}
              for name, c in PRESETS.items()])
    st.info("The engine is ready; the pages for datasets, annotation, training, prediction and runs come next. "
            "Meanwhile the command line does it all: `python -m unet --help`.")


st.navigation([st.Page(home, title="Home", icon="🏠", default=True)]).run()
