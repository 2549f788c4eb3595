"""Stacks bigger than memory: import, browse, predict and export synthetic uint8 volumes of growing size,
each stage in a process of its own whose peak resident memory is measured.

    python -m bench.scale [--sizes 0.5,2,8] [--slice 2048] [--model starter|tiny] [--predict-blocks N]
                          [--browser] [--work DIR] [--json FILE]

For each size (GB of uint8 voxels) a synthetic EM stack of ``--slice``² slices is written as a TIFF page by
page, then, each in a fresh process (as the server and the prediction process would):

- **import**: the TIFF converted into the OME-Zarr store (``storage.records.ingest.import_files``);
- **browse**: what the Datasets and Annotate pages read: a slice at full resolution, the same slice from
  the coarsest pyramid level, and a 512² tile, for the first, middle and last slices;
- **predict**: every slice (or the first ``--predict-blocks`` of them, spread over the stack: the cost of
  a block does not depend on the others), block by block (``storage.jobs.predict_worker``'s blockwise path, in
  one process so that its memory is the one measured: ``$NEUROSEG_PREDICT_WORKERS=1``);
- **export**: the mask as an ImageJ TIFF, streamed slice by slice;
- **browser** (``--browser``): the app served as ``./run.sh`` serves it and Chromium on the Annotate page:
  the seconds from a click on "Next ▶" until the next slice's canvas is on screen (the worst of five),
  and the server's peak memory.

It prints a table (seconds, peak RSS in MB, prediction megavoxels per second) and writes JSON. Figures
are the machine's own; nothing here is a test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import ROOT, spread, table, write_json

STAGE = r"""
import json, sys, time
from pathlib import Path
import numpy as np
stage, data, arg = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
from storage.service import Neuroseg
from storage.settings import Settings
svc = Neuroseg(Settings.from_env(data), supervise=False)
t = time.perf_counter()
out = {}
if stage == "import":
    from storage import ingest
    info = ingest.import_files(svc.sessions, svc.store, Path(arg), None, "scale")
    out["dataset"] = info.id
elif stage == "browse":
    volume = svc.volume(int(arg))
    times = []
    for z in (0, volume.shape[0] // 2, volume.shape[0] - 1):
        s = time.perf_counter()
        volume[z]; volume.levels[-1][z]; volume[z, :512, :512]
        times.append(time.perf_counter() - s)
    out["slice_s"] = max(times)
elif stage == "predict":
    from storage.jobs.predict_worker import run_prediction
    info = svc.predictions()[-1]
    run_prediction(info.id, svc.settings)
    job = svc.prediction(info.id)
    assert job.status == "FINISHED", job.error
elif stage == "export":
    from unet.exchange.writing import write_tiff_slices
    job = svc.predictions()[-1]
    write_tiff_slices(svc.prediction_output(job.id, "mask"), Path(arg))
out["seconds"] = time.perf_counter() - t
with open("/proc/self/status") as fh:  # this process's own peak (ru_maxrss would count the parent's too)
    out["peak_rss_mb"] = next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:")) / 1024
print("RESULT " + json.dumps(out))
"""


def _stage(stage: str, data: Path, arg: str) -> dict:
    """Run one stage in a fresh process; its result and its own peak RSS (VmHWM, read by the stage at its
    end: the kernel's ru_maxrss of a child starts from its parent's size at the fork, so it is not used)."""
    env = {**os.environ, "NEUROSEG_PREDICT_WORKERS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", STAGE, stage, str(data), arg], stdout=subprocess.PIPE,
                            text=True, env=env, cwd=ROOT)
    output = proc.stdout.read()
    if proc.wait() != 0:
        raise RuntimeError(f"stage {stage} failed:\n{output[-3000:]}")
    return json.loads(next(line for line in output.splitlines() if line.startswith("RESULT "))[7:])


def write_stack(path: Path, z: int, side: int) -> None:
    """A synthetic EM stack, page by page (BigTIFF when it needs to be)."""
    import tifffile

    from unet.training.synthetic import make_synthetic_em

    tile, _ = make_synthetic_em((1, min(side, 1024), min(side, 1024)), np.random.default_rng(0), cell_size=30)
    plane = np.tile(tile[0], (-(-side // tile.shape[1]), -(-side // tile.shape[2])))[:side, :side]
    with tifffile.TiffWriter(path, bigtiff=z * side * side > 2**31, imagej=z * side * side <= 2**31) as tif:
        tif.write((np.roll(plane, k * 7, axis=1) for k in range(z)), shape=(z, side, side), dtype=np.uint8,
                  **({"metadata": {"axes": "ZYX"}} if z * side * side <= 2**31 else {}))


def _browser(data: Path, dataset_id: int, side: int) -> dict:
    """Serve the app on the store and time Annotate in Chromium: click "Next ▶" five times from the middle
    of the stack, each until the next slice's caption and canvas are on screen."""
    sys.path.insert(0, str(ROOT))
    from tests.browser import app_server, canvas_key, chromium, signed_in

    times = []
    with app_server(data) as url, chromium() as browser:
        page = signed_in(browser.new_page(viewport={"width": 1400, "height": 1000}), url)
        page.goto(f"{url}/annotate?dataset={dataset_id}")
        page.locator("canvas.upper-canvas").first.wait_for(timeout=120_000)
        for _ in range(5):
            caption = page.get_by_text("· slice ", exact=False).first.inner_text()
            z = int(caption.split("· slice ")[1].split(":")[0])
            before = canvas_key(page)
            start = time.perf_counter()
            page.get_by_role("button", name="Next ▶").click()
            page.get_by_text(f"· slice {z + 1}: {side} × {side} pixels", exact=False).first.wait_for(timeout=60_000)
            page.wait_for_function(  # the next slice's canvas alone on screen (the old one gone)
                "old => { const boxes = document.querySelectorAll('[class*=\"st-key-canvas-\"]');"
                " return boxes.length === 1 && !boxes[0].className.split(/\\s+/).includes('st-key-' + old); }",
                arg=before, timeout=60_000)
            page.locator(f".st-key-{canvas_key(page)} canvas.upper-canvas").wait_for(timeout=60_000)
            times.append(time.perf_counter() - start)
        with open(f"/proc/{url.pid}/status") as fh:
            peak = next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))
    return {"annotate_next_s": max(times), "server_rss_mb": peak / 1024}


def tiny_model(folder: Path, which: str) -> None:
    """The starting model as the store's starter ($NEUROSEG_STARTER_DIR)."""
    from unet.exchange.checkpoint import save_checkpoint
    from unet.network.config import preset
    from unet.network.model import UNet

    folder.mkdir(parents=True, exist_ok=True)
    if which == "starter":
        from storage.records.starter import shipped

        path = shipped()
        if path is None:
            raise SystemExit("no starter model is shipped; use --model tiny")
        shutil.copy(path, folder / path.name)
        shutil.copy(path.with_suffix(".json"), folder / path.with_suffix(".json").name)
    else:
        import torch

        config = preset("tiny")
        torch.manual_seed(0)  # the same untrained weights every run: their maps decide the watershed's cost
        save_checkpoint(folder / "tiny.pt", UNet(config.model),
                        meta={"kind": "starter", "step": 1, "train_config": config.to_dict()})
    os.environ["NEUROSEG_STARTER_DIR"] = str(folder)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="0.5,2,8", help="GB of uint8 voxels, comma-separated")
    ap.add_argument("--slice", type=int, default=2048, help="slice side in pixels (8192 for the wide case)")
    ap.add_argument("--model", default="starter", choices=["starter", "tiny"])
    ap.add_argument("--predict-blocks", type=int, default=0, help="predict this many slices (0: all)")
    ap.add_argument("--browser", action="store_true", help="time the Annotate page in Chromium too")
    ap.add_argument("--work", help="a scratch folder with room for the stacks (default: a temporary one)")
    ap.add_argument("--json", default=str(ROOT / "bench" / "results" / "scale.json"))
    args = ap.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="neuroseg-scale-"))
    tiny_model(work / "models", args.model)
    rows = []
    for size in (float(s) for s in args.sizes.split(",")):
        z = max(1, round(size * 1e9 / args.slice ** 2))
        case = work / f"{size:g}GB"
        shutil.rmtree(case, ignore_errors=True)
        case.mkdir(parents=True)
        tiff = case / "stack.tif"
        print(f"{size:g} GB: writing {z} × {args.slice}² …", flush=True)
        write_stack(tiff, z, args.slice)
        data = case / "data"
        imported = _stage("import", data, str(tiff))
        tiff.unlink()
        browsed = _stage("browse", data, str(imported["dataset"]))
        from storage.service import Neuroseg
        from storage.settings import Settings

        svc = Neuroseg(Settings.from_env(data), supervise=False)  # no supervisor: the bench starts the job
        from storage.records import predictions, starter

        with svc.sessions.begin() as s:
            starter.register(s, svc.store)
        with svc.sessions.begin() as s:
            chosen = spread(z, args.predict_blocks)
            predictions.submit_prediction(s, svc.checkpoint_choices()[0].id, imported["dataset"], chosen)
        svc.close()
        predicted = _stage("predict", data, "")
        exported = _stage("export", data, str(case / "mask.tif"))
        voxels = len(chosen) * args.slice ** 2
        browser = _browser(data, imported["dataset"], args.slice) if args.browser else {}
        row = {"size_gb": size, "shape": f"{z}×{args.slice}²", "blocks": len(chosen), **browser,
               "import_s": imported["seconds"],
               "import_rss_mb": imported["peak_rss_mb"], "browse_slice_s": browsed["slice_s"],
               "browse_rss_mb": browsed["peak_rss_mb"], "predict_s": predicted["seconds"],
               "predict_rss_mb": predicted["peak_rss_mb"], "mvox_per_s": voxels / 1e6 / predicted["seconds"],
               "export_s": exported["seconds"], "export_rss_mb": exported["peak_rss_mb"]}
        rows.append(row)
        print(json.dumps(row), flush=True)
        shutil.rmtree(case, ignore_errors=True)
    print(table(rows, [("size_gb", "GB", "g"), ("shape", "Z×Y×X", "s"), ("import_s", "import s", ".0f"),
                       ("import_rss_mb", "RSS MB", ".0f"), ("browse_slice_s", "slice s", ".2f"),
                       ("browse_rss_mb", "RSS MB", ".0f"), ("predict_s", "predict s", ".0f"),
                       ("predict_rss_mb", "RSS MB", ".0f"), ("mvox_per_s", "Mvox/s", ".2f"),
                       ("export_s", "export s", ".0f"), ("export_rss_mb", "RSS MB", ".0f"),
                       ("annotate_next_s", "Annotate next s", ".2f"), ("server_rss_mb", "server MB", ".0f")]))
    write_json(args.json, {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                           "model": args.model, "slice": args.slice, "rows": rows})
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
