"""Neuroseg's U-Net engine: model, data, training, tiled inference, post-processing, metrics.

No Streamlit and no SQLAlchemy in here: the app and the store call in, and the training loop talks back
through a reporter (see :mod:`unet.training.train`)."""

from unet.network.config import AugmentConfig, ModelConfig, TrainConfig, preset
from unet.network.model import UNet

__all__ = ["AugmentConfig", "ModelConfig", "TrainConfig", "UNet", "preset"]
