"""How long the Annotate page's steps take at a given slice size: decoding the canvas's strokes, merging
them into the mask, encoding the canvas background, saving a version (merge + TIFF + checksum +
database row), and an object tool's action (accept, merge, split on a slice of 64-px neurons) from the
draft updated to the canvas background redrawn as the page does it (issue 29 asks < 300 ms at 2048²). Run by hand:
``python -m bench.annotate [--sizes 512 1024 2048] [--json FILE]``."""

from __future__ import annotations

import argparse
import base64
import io
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from bench.common import table, write_json
from domain.kinds import Tool
from storage.service import Neuroseg
from storage.settings import Settings
from tests.drafts import new_draft, start_options
from ui.paint import PALETTE, View, overlay, png_data_url, view_picture
from unet.prediction import objects
from unet.training.labels import MEMBRANE


def best_of(fn, repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def measure(size: int, folder: Path) -> dict:
    rng = np.random.default_rng(0)
    svc = Neuroseg(Settings.from_env(folder / f"store-{size}"), supervise=False)
    volume = rng.integers(0, 255, (2, size, size), dtype=np.uint8)
    labels = (rng.random((2, size, size)) > 0.3).astype(np.uint8) * 255
    tifffile.imwrite(folder / "v.tif", volume)
    tifffile.imwrite(folder / "l.tif", labels)
    with open(folder / "v.tif", "rb") as v, open(folder / "l.tif", "rb") as lab:
        info = svc.import_upload(v, lab, name="bench")
    option = start_options(svc, info.id, 0)[0]
    view = View.fit((size, size))
    rgba = np.zeros((*view.display_shape, 4), np.uint8)
    for k in range(20):  # twenty strokes across the slice
        rgba[(k * 37) % size:(k * 37) % size + 8, :] = (*PALETTE[MEMBRANE], 153)
    buf = io.BytesIO()
    Image.fromarray(rgba).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()

    def decode():
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(";base64,", 1)[1]))))

    draft = new_draft(svc, info.id, 0, option)
    draft.set_view(view)

    def merge():
        draft.apply(decode())

    def background():
        out = io.BytesIO()
        Image.fromarray(view.render(overlay(volume[0], draft.view_base, 0.35))).save(out, "PNG", compress_level=1)

    def save():
        fresh = new_draft(svc, info.id, 0, start_options(svc, info.id, 0)[0])
        fresh.set_view(view)
        fresh.apply(decode())
        svc.save_draft(fresh, "bench")

    cells = np.arange(size) // 64
    instances = (cells[:, None] * (size // 64 + 1) + cells[None, :] + 1).astype(np.int32)  # 64-px neurons
    boundary = rng.random((size, size)).astype(np.float32)
    centre = size // 2 // 64 * 64 + 32  # the middle of the neuron in the middle of the slice
    middle = int(instances[centre, centre])
    tools = {
        "accept": lambda m: objects.accept(m, instances, middle),
        "merge": lambda m: objects.merge(m, instances, middle, middle + 1),
        "split": lambda m: objects.split_seeds(m, instances, boundary, [(centre - 20, centre - 20),
                                                                         (centre + 20, centre + 20)]),
    }

    stored = svc.volume(info.id)  # as the page reads it: lazily, with the overview pyramid

    def redraw():  # what the page does after a change: the view's picture from the pyramid, as a PNG
        png_data_url(view_picture(stored, 0, view, draft.view_base, 0.35, (0.0, 255.0)))

    def tool_action(name):
        def action():
            draft.use_tool(tools[name](draft.working), Tool.ACCEPT if name == "accept" else Tool(name))
            redraw()
            draft.undo()
        return action

    return {"size": size, "display": view.display_shape[0], "decode_ms": 1e3 * best_of(decode),
            "merge_ms": 1e3 * best_of(merge), "background_ms": 1e3 * best_of(background),
            "save_ms": 1e3 * best_of(save), "redraw_ms": 1e3 * best_of(redraw),
            **{f"{name}_tool_ms": 1e3 * best_of(tool_action(name)) for name in tools}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(size, Path(tmp)) for size in args.sizes]
    print(table(rows, [("size", "slice", "d"), ("display", "canvas", "d"), ("decode_ms", "decode strokes ms", ".1f"),
                       ("merge_ms", "decode+merge ms", ".1f"), ("background_ms", "background PNG ms", ".1f"),
                       ("save_ms", "save version ms", ".1f"), ("redraw_ms", "page redraw ms", ".1f"),
                       ("accept_tool_ms", "accept+redraw ms", ".1f"),
                       ("merge_tool_ms", "merge+redraw ms", ".1f"), ("split_tool_ms", "split+redraw ms", ".1f")]))
    write_json(args.json, {"rows": rows})


if __name__ == "__main__":
    main()
