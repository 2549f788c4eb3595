"""Shared fixtures. Slow tests are opt-in: ``pytest --run-slow`` (``make test`` passes it)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
ISBI = Path(os.environ.get("NEUROSEG_ISBI_DIR") or ROOT.parent / "shared" / "data" / "isbi2012")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", default=False, help="also run tests marked slow")
    parser.addoption("--device", default="cpu", help="device for the engine tests: cpu (default), cuda, mps")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-slow") or os.environ.get("NEUROSEG_RUN_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow test: run with --run-slow (make test does)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def device(request: pytest.FixtureRequest) -> str:
    """The device the engine tests train and predict on (``pytest --device cuda`` on a GPU machine)."""
    name = request.config.getoption("--device")
    if name.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            pytest.skip("--device cuda was asked for, but no CUDA GPU is available")
    return name


@pytest.fixture(scope="session")
def synthetic() -> tuple[np.ndarray, np.ndarray]:
    """A small synthetic EM stack (6 × 96 × 96 uint8) and its 0/255 labels."""
    from unet.synthetic import make_synthetic_em

    return make_synthetic_em((6, 96, 96), np.random.default_rng(42), cell_size=20)


@pytest.fixture(scope="session")
def isbi_dir() -> Path:
    if not (ISBI / "train-volume.tif").is_file():
        pytest.skip(f"ISBI 2012 data not found in {ISBI} (set NEUROSEG_ISBI_DIR to run this test)")
    return ISBI
