"""What the pages show, in plain Python: the annotation draft and its start options, painting and
overlays, figures, and the words and tables of training and prediction. Neither Streamlit nor the
database here (the engine's constants and configs are fine), so plain tests drive all of it."""
