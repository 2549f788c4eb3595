"""How long the Annotate page's steps take at a given slice size: decoding the canvas's strokes, merging
them into the mask, encoding the canvas background, and saving a version (merge + TIFF + checksum +
database row). Run by hand: ``python -m bench.annotate [--sizes 512 1024 2048] [--json FILE]``."""

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
from storage.service import Neuroseg
from storage.settings import Settings
from tests.drafts import new_draft, start_options
from ui.paint import PALETTE, View, overlay
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

    return {"size": size, "display": view.display_shape[0], "decode_ms": 1e3 * best_of(decode),
            "merge_ms": 1e3 * best_of(merge), "background_ms": 1e3 * best_of(background),
            "save_ms": 1e3 * best_of(save)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(size, Path(tmp)) for size in args.sizes]
    print(table(rows, [("size", "slice", "d"), ("display", "canvas", "d"), ("decode_ms", "decode strokes ms", ".1f"),
                       ("merge_ms", "decode+merge ms", ".1f"), ("background_ms", "background PNG ms", ".1f"),
                       ("save_ms", "save version ms", ".1f")]))
    write_json(args.json, {"rows": rows})


if __name__ == "__main__":
    main()
