"""The Streamlit frame renders (AppTest runs the real script, no browser)."""

from pathlib import Path

from streamlit.testing.v1 import AppTest

ROOT = Path(__file__).resolve().parent.parent


def test_home_page_renders_device_and_presets():
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60).run()
    assert not at.exception
    assert at.title[0].value == "Neuroseg"
    assert at.metric[0].label == "Compute device"
    from unet.device import describe_device

    assert at.metric[0].value == describe_device()  # "CPU (2 threads)" here, the GPU's name on a GPU
    presets = at.table[0].value
    assert {"cpu-quick", "gpu-full", "tiny"} <= set(presets["preset"])
