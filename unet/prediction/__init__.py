"""Prediction and neurons: tiled and blockwise prediction, post-processing, 3D linking, metrics."""
