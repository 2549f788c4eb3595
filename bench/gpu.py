"""One prepared run on a GPU (issue 30), at most about 8 minutes: the environment, ``bench.speed``, the training
input pipeline against the network (``bench.pipeline``), prediction in slices per second, and the ISBI 2012
quality of the GPU preset. Prints a table per part and writes one JSON.

    python -m bench.gpu [--data DIR] [--budget-min 3.5] [--json bench/results/gpu-<device>.json]

It needs nothing beyond torch, NumPy, SciPy, scikit-image, scikit-learn and tifffile, and imports nothing from
``storage/`` (a lent GPU machine has those and no more). Each part runs on when another fails, and says why in
the JSON, which is written after every part and however the run ends (a timeout's SIGTERM included); a part that
no longer fits ``--deadline-min`` is skipped, and the ISBI training is shortened to fit. Without ISBI 2012
(``--data``, ``$NEUROSEG_ISBI_DIR`` or ``../shared/data/isbi2012``) the quality part is skipped with the reason.
``--device cpu --quick`` runs every part in a minute or two on a CPU, to check the script before a GPU is lent.
On a lent machine only the checkout travels: copy ``train-volume.tif`` and ``train-labels.tif`` into an ignored
folder of the checkout, carry it, and write the JSON under ``$OUT``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from bench.common import ROOT, isbi_dir, table


def environment(device: torch.device) -> dict:
    from bench.speed import measure_peak

    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cores": os.cpu_count(), "machine": platform.machine(), "device": str(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(name=props.name, memory_gb=round(props.total_memory / 2**30, 1),
                   bf16=torch.cuda.is_bf16_supported())
    env["peak_gflop_per_s"] = measure_peak(device, seconds=2.0)
    env["peak_kind"] = "bf16" if device.type == "cuda" else "fp32"
    return env


def speed(device: torch.device, peak: float, quick: bool, left=lambda: 300.0) -> list[dict]:
    """bench.speed's rows: our network at widths 16, 32 and 64 and the textbook one at 64 (each in a fresh
    process, so each peak memory is its own)."""
    from bench.speed import measure_apart

    gpu = device.type == "cuda"
    patch, batch, steps = (512, 8, 20) if gpu else (128, 2, 2)
    rows = []
    for model, width in ([("ours", 16), ("ours", 32), ("ours", 64), ("textbook", 64)] if not quick
                         else [("ours", 16), ("textbook", 16)]):
        timeout = min(300.0, left() - 200)  # (what the other parts need is kept for them)
        if timeout < 20:
            rows.append({"model": model, "width": width, "error": "skipped: the deadline is near"})
            continue
        try:
            row = measure_apart(model, width, str(device), patch, batch, steps, "same", peak, timeout=timeout)
        except (Exception, subprocess.TimeoutExpired) as exc:  # (one row's failure: the others still count)
            rows.append({"model": model, "width": width, "error": f"{type(exc).__name__}: {str(exc)[-1000:]}"})
            continue
        rows.append(row)
        print(f"  {model} width {width}: {row['train_steps_per_s']:.1f} steps/s "
              f"({row['train_fraction_of_peak']:.0%} of peak)", flush=True)
    return rows


def pipeline(device: torch.device, quick: bool) -> list[dict]:
    from bench.pipeline import measure

    names = ["gpu", "gpu-full"] if device.type == "cuda" else ["tiny" if quick else "cpu-quick"]
    rows = []
    for name in names:
        try:
            rows.append(measure(name, str(device), 1.0 if quick else 3.0))
        except Exception as exc:  # (e.g. gpu-full out of memory: the gpu row still counts)
            rows.append({"preset": name, "error": f"{type(exc).__name__}: {exc}"})
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def prediction(device: torch.device, quick: bool) -> list[dict]:
    """Slices of 512² per second through the app's prediction path (normalise, tile, blend) with the GPU
    preset's network: slice by slice, and with the tiles of 8 slices sharing the batches."""
    from unet.network.config import preset
    from unet.network.device import amp_dtype
    from unet.network.model import UNet
    from unet.prediction.infer import iter_predict_stack

    config = preset("tiny" if quick else "gpu")
    model = UNet(config.model).to(device).eval()
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    amp = amp_dtype(device, "auto")
    count = 8 if quick else 96
    volume = np.random.default_rng(0).integers(0, 255, (count, 512, 512)).astype(np.uint8)
    rows = []
    for together, batch in ((1, 4), (8, 16), (16, 32)):
        for _ in iter_predict_stack(model, volume[:together], together=together, batch_size=batch, amp=amp):
            pass  # (warm-up: kernels chosen, memory allocated)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in iter_predict_stack(model, volume, together=together, batch_size=batch, amp=amp):
            pass
        seconds = time.perf_counter() - start
        rows.append({"together": together, "batch": batch, "slices": count, "seconds": seconds,
                     "slices_per_s": count / seconds})
        print(f"  {together} slices together, batches of {batch}: {count / seconds:.1f} slices/s", flush=True)
    return rows


def quality(budget_min: float, data: str | None, quick: bool) -> dict:
    """bench.quality of the GPU preset on ISBI 2012 (U-Net only): trained ``budget_min`` minutes on 0–24,
    scored on 25–29, the post-processing tuned on 20–24."""
    from bench import quality as q

    folder = isbi_dir(data)
    if not (folder / "train-volume.tif").is_file():
        return {"skipped": f"ISBI 2012 not found in {folder}"}
    with tempfile.TemporaryDirectory() as work:
        out = os.path.join(work, "quality.json")
        argv = ["--preset", "tiny" if quick else "gpu", "--budget-min", str(budget_min), "--only", "unet",
                "--json", out, "--data", str(folder), "--methods", "agglomerate",
                "--workers", str(max(1, (os.cpu_count() or 1) - 1))]
        code = q.main(argv)
        if code:
            return {"error": f"bench.quality exited with {code}"}
        with open(out) as f:
            return json.load(f)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default=None, help="cuda (default when present) or cpu")
    ap.add_argument("--budget-min", type=float, default=3.5, help="the GPU preset's training time on ISBI")
    ap.add_argument("--deadline-min", type=float, default=8.0,
                    help="the whole run's time: a part that no longer fits is skipped, and the ISBI training is "
                         "shortened to fit")
    ap.add_argument("--data", default=None, help="the ISBI 2012 folder")
    ap.add_argument("--quick", action="store_true", help="small sizes: check the script on a CPU")
    ap.add_argument("--skip", nargs="*", default=[], choices=["speed", "pipeline", "prediction", "quality"])
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    started = time.perf_counter()
    deadline = started + args.deadline_min * 60

    def left() -> float:
        return deadline - time.perf_counter()

    result: dict = {"seconds": {}, "deadline_s": args.deadline_min * 60}
    path = args.json
    # the JSON is written after every part and however the run ends (an error, Ctrl-C, a timeout's SIGTERM)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        try:
            result["environment"] = environment(device)
        except Exception as exc:
            result["environment"] = {"device": str(device), "error": f"{type(exc).__name__}: {exc}",
                                     "peak_gflop_per_s": float("nan"), "peak_kind": "?", "torch": torch.__version__,
                                     "cuda": torch.version.cuda, "cores": os.cpu_count()}
        env = result["environment"]
        name = str(env.get("name", env["device"])).replace(" ", "-").lower()
        path = path or str(ROOT / "bench" / "results" / f"gpu-{name}.json")
        print(f"{env.get('name', env['device'])}: torch {env['torch']}, CUDA {env['cuda']}, {env['cores']} cores; "
              f"peak {env['peak_kind']} {env['peak_gflop_per_s']:.0f} GFLOP/s", flush=True)
        save(path, result)
        quality_s = (0.2 if args.quick else args.budget_min) * 60
        # (the seconds a part needs at least: one that no longer fits is skipped, with the reason)
        parts = [("speed", 30, lambda: speed(device, env["peak_gflop_per_s"], args.quick, left)),
                 ("pipeline", 20, lambda: pipeline(device, args.quick)),
                 ("prediction", 20, lambda: prediction(device, args.quick)),
                 ("quality", 120, lambda: quality(min(quality_s, left() - QUALITY_OVERHEAD_S) / 60, args.data,
                                                  args.quick))]
        for part, needs, run in parts:
            if part in args.skip:
                continue
            print(f"\n{part} …", flush=True)
            t0 = time.perf_counter()
            if left() < needs:
                result[part] = {"skipped": f"{left():.0f} s left of the {args.deadline_min:g}-minute deadline"}
                print(f"  skipped: {result[part]['skipped']}", flush=True)
                continue
            try:
                result[part] = run()
            except Exception as exc:  # (a prepared run goes on: the other parts still count)
                result[part] = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-3000:]}
                print(f"  failed: {exc}", flush=True)
            result["seconds"][part] = time.perf_counter() - t0
            save(path, result)
        report(result)
    finally:
        result["seconds"]["total"] = time.perf_counter() - started
        print(f"\ntotal {result['seconds']['total']:.0f} s")
        if path:
            save(path, result)
            print(f"wrote {path}")
    return 0


#: what bench.quality needs beside its training: loading ISBI, predicting 20–29, tuning the agglomeration
QUALITY_OVERHEAD_S = 75


def save(path: str, result: dict) -> None:
    """Write the JSON so far (whole or not at all: a run stopped while writing keeps the last one)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    part = Path(f"{path}.part")
    part.write_text(json.dumps(result, indent=2, default=str))
    part.replace(path)


def report(result: dict) -> None:
    """The tables of the parts that ran."""
    if isinstance(result.get("speed"), list):
        print("\nbench.speed, same padding:")
        print(table([r for r in result["speed"] if "error" not in r],
                    [("model", "model", ""), ("width", "width", "d"), ("train_steps_per_s", "train steps/s", ".1f"),
                     ("train_fraction_of_peak", "train % peak", ".0%"), ("infer_s_per_slice", "infer s/slice", ".4f"),
                     ("peak_mem_mb", "peak MB", ".0f")]))
    if isinstance(result.get("pipeline"), list):
        print("\ntraining input pipeline against the network:")
        print(table([r for r in result["pipeline"] if "error" not in r],
                    [("preset", "preset", ""), ("network_steps_per_s", "network steps/s", ".1f"),
                     ("device_batches_per_s", "device batches/s", ".1f"), ("device_batch_cost", "batch/step", ".0%"),
                     ("device_loop_share", "loop/network", ".0%"), ("host_loop_share", "loop/network (host)", ".0%")]))
    if isinstance(result.get("prediction"), list):
        print("\nprediction, 512² slices:")
        print(table(result["prediction"], [("together", "slices together", "d"), ("batch", "batch", "d"),
                                           ("slices_per_s", "slices/s", ".1f")]))
    unet = result.get("quality", {}).get("unet") if isinstance(result.get("quality"), dict) else None
    if unet:
        print(f"\nISBI 25–29 after {unet.get('train_seconds', 0):.0f} s ({unet.get('steps', '?')} steps): pixel error "
              f"{unet.get('pixel_error', float('nan')):.4f}, Rand-F {unet.get('rand_f', float('nan')):.4f}, "
              f"V_rand {unet.get('v_rand', float('nan')):.4f} (the map at its best threshold)")
        tuned = [r for r in result["quality"].get("postprocessing", {}).get("unet", [])
                 if r.get("post-processing") == "agglomerate"]
        if tuned:
            print(f"  agglomeration tuned on 20–24 ({tuned[0]['params']}): V_rand {tuned[0]['v_rand']:.4f}, "
                  f"V_info {tuned[0]['v_info']:.4f}")

if __name__ == "__main__":
    sys.exit(main())
