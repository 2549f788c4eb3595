"""``python -m unet predict`` on a stack bigger than a laptop's patience, against the app's blockwise path.

    python -m bench.cli [--slices 100] [--side 4096] [--predict N] [--workers 1] [--repeat 1] [--skip-app]
                        [--work DIR] [--json FILE]

A synthetic uint8 EM stack of ``--slices`` × ``--side``² (100 × 4096²: a 1.6 GB TIFF, page by page) and an
untrained ``tiny`` network (the same weights every run). Then, each in a fresh process whose whole process
tree is sampled for its resident memory every 0.2 s (the peak of the sum):

- **cli**: ``python -m unet predict --checkpoint tiny.pt --volume stack.tif --out …`` (TIFF outputs,
  instances and 3D neurons included), of every slice or of ``--predict`` slices spread over the stack; the
  whole command (start-up and writing the TIFFs included), and the engine alone: from its "predicting …"
  line (imports, weights and stack header done) until its neurons are linked;
- **app** (unless ``--skip-app``): the same slices as the app predicts them: the TIFF imported into a
  store (not timed), then the prediction process (``storage.jobs.predict_worker``, neurons linked included),
  with the same number of workers.

With ``--repeat N`` each path runs N times, alternating which goes first, after the page cache's dirty pages
are written (``os.sync``), so neither pays for the other's writes; the table gives every run and the median of
each path. It prints a table (seconds, megavoxels per second, peak RSS of the process tree) and writes JSON.
Figures are this machine's own; nothing here is a test."""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.common import ROOT, spread, table, write_json

APP = r"""
import sys
from pathlib import Path
from storage.service import Neuroseg
from storage.settings import Settings
from storage import ingest, predictions, starter
from storage.jobs.predict_worker import run_prediction
data, tiff, chosen = Path(sys.argv[1]), Path(sys.argv[2]), [int(z) for z in sys.argv[3].split(",")]
svc = Neuroseg(Settings.from_env(data), supervise=False)
info = ingest.import_files(svc.sessions, svc.store, tiff, None, "bench")
with svc.sessions.begin() as s:
    starter.register(s, svc.store)
with svc.sessions.begin() as s:
    job = predictions.submit_prediction(s, svc.checkpoint_choices()[0].id, info.id, chosen)
print("PREDICT", flush=True)  # the import is done: from here on, the prediction is timed
run_prediction(job.id, svc.settings)
assert svc.prediction(job.id).status == "FINISHED", svc.prediction(job.id).error
print("DONE", flush=True)
"""


def _tree_rss(pid: int) -> int:
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += p.memory_info().rss
    return total


def _measure(cmd: list[str], env: dict[str, str], start_mark: str | None = None) -> dict:
    """Run ``cmd``; its wall seconds (from the line ``start_mark`` when given) and the peak of its process
    tree's resident memory."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _tree_rss(proc.pid))
            done.wait(0.2)

    threading.Thread(target=sample, daemon=True).start()
    t0 = time.perf_counter()
    lines = []
    engine_start = engine_done = None
    for line in proc.stdout:
        lines.append(line)
        if start_mark and line.strip() == start_mark:
            t0 = time.perf_counter()
        if line.startswith("predicting "):  # the command line has its imports, weights and stack header
            engine_start = time.perf_counter()
        if "neurons linked" in line and engine_start is not None:  # its engine is done; its TIFFs come next
            engine_done = time.perf_counter() - engine_start
    rc = proc.wait()
    seconds = time.perf_counter() - t0
    done.set()
    if rc != 0:
        raise RuntimeError(f"{cmd[:4]} failed ({rc}):\n{''.join(lines)[-3000:]}")
    return {"seconds": seconds, "engine_seconds": engine_done, "peak_rss_mb": peak[0] / 2**20}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.cli", description=__doc__.split("\n\n")[0])
    ap.add_argument("--slices", type=int, default=100)
    ap.add_argument("--side", type=int, default=4096)
    ap.add_argument("--predict", type=int, default=0, help="predict this many slices, spread over the stack (0: all)")
    ap.add_argument("--workers", type=int, default=1, help="worker processes of both paths")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each path, alternating which goes first")
    ap.add_argument("--skip-app", action="store_true", help="only the command line")
    ap.add_argument("--work", help="a scratch folder with room for the stack (default: a temporary one)")
    ap.add_argument("--json", default=str(ROOT / "bench" / "results" / "cli-predict.json"))
    args = ap.parse_args(argv)
    from bench.scale import tiny_model, write_stack

    work = Path(args.work or tempfile.mkdtemp(prefix="neuroseg-cli-"))
    work.mkdir(parents=True, exist_ok=True)
    tiny_model(work / "models", "tiny")
    tiff = work / "stack.tif"
    if not tiff.is_file() or tiff.stat().st_size < args.slices * args.side ** 2:
        print(f"writing {args.slices} × {args.side}² …", flush=True)
        write_stack(tiff, args.slices, args.side)
    z = args.slices
    chosen = spread(z, args.predict)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NEUROSEG_PREDICT_WORKERS": str(args.workers)}
    voxels = len(chosen) * args.side ** 2
    rows = []
    out = work / "cli-out"

    def run_cli() -> dict:
        shutil.rmtree(out, ignore_errors=True)
        os.sync()
        cli = _measure([sys.executable, "-m", "unet", "predict", "--checkpoint", str(work / "models" / "tiny.pt"),
                        "--volume", str(tiff), "--out", str(out), "--slices", ",".join(map(str, chosen)),
                        "--workers", str(args.workers), "--device", "cpu"], env)
        shutil.rmtree(out, ignore_errors=True)
        return {"path": "python -m unet predict", **cli, "mvox_s": voxels / 1e6 / cli["seconds"],
                "engine_mvox_s": voxels / 1e6 / cli["engine_seconds"] if cli["engine_seconds"] else None}

    def run_app() -> dict:
        data = work / "app-data"
        shutil.rmtree(data, ignore_errors=True)
        os.sync()
        app = _measure([sys.executable, "-c", APP, str(data), str(tiff), ",".join(map(str, chosen))],
                       {**env, "NEUROSEG_STARTER_DIR": str(work / "models")}, start_mark="PREDICT")
        shutil.rmtree(data, ignore_errors=True)
        return {"path": "the app (predict_worker)", **app, "mvox_s": voxels / 1e6 / app["seconds"]}

    for i in range(max(1, args.repeat)):
        order = [run_cli] if args.skip_app else [run_cli, run_app] if i % 2 == 0 else [run_app, run_cli]
        for run in order:
            rows.append({**run(), "run": i + 1})
            print(rows[-1], flush=True)
    if args.repeat > 1:
        import statistics

        for path in dict.fromkeys(r["path"] for r in rows):
            mine = [r for r in rows if r["path"] == path]
            rows.append({"path": f"{path}: median", "run": "median",
                         **{k: statistics.median(values) for k in ("seconds", "mvox_s", "peak_rss_mb",
                                                                   "engine_seconds", "engine_mvox_s")
                            if (values := [r[k] for r in mine if r.get(k) is not None])}})
    print(f"{len(chosen)} of {z} slices of {args.side}² (uint8, {tiff.stat().st_size / 1e9:.2f} GB TIFF), tiny "
          f"network, {args.workers} worker(s), {os.cpu_count()} cores")
    print(table(rows, [("path", "path", ""), ("run", "run", ""), ("seconds", "s", ".0f"), ("mvox_s", "Mvox/s", ".2f"),
                       ("engine_seconds", "until predicted s", ".0f"), ("engine_mvox_s", "predicted Mvox/s", ".2f"),
                       ("peak_rss_mb", "peak RSS MB", ".0f")]))
    write_json(args.json, {"machine": platform.platform(), "cores": os.cpu_count(), "slices": z, "side": args.side,
                           "predicted": len(chosen), "workers": args.workers, "repeat": args.repeat,
                           "tiff_bytes": tiff.stat().st_size, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
