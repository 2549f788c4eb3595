"""Train: arrives with the next issue (training in the background, predictions, run history)."""

from __future__ import annotations

import streamlit as st

st.title("Train")
st.info("This page is being built. Meanwhile the command line does it: `python -m unet --help`.")
