"""One prepared run on a GPU (issue 30), at most about 8 minutes: the environment, ``bench.speed``, the training
input pipeline against the network (``bench.pipeline``), prediction in slices per second, and the ISBI 2012
quality of the GPU preset. Prints a table per part and writes one JSON.

    python -m bench.gpu [--data DIR] [--budget-min 3.5] [--json bench/results/gpu-<device>.json]

It needs nothing beyond torch, NumPy, SciPy, scikit-image, scikit-learn and tifffile, and imports nothing from
``storage/`` (a lent GPU machine has those and no more). Each part runs on when another fails, and says why in
the JSON. Without ISBI 2012 (``--data``, ``$NEUROSEG_ISBI_DIR`` or ``../shared/data/isbi2012``) the quality
part is skipped with the reason. ``--device cpu --quick`` runs every part in a minute or two on a CPU, to check
the script before a GPU is lent.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback

import numpy as np
import torch

from bench.common import ROOT, isbi_dir, table, write_json


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


def speed(device: torch.device, peak: float, quick: bool) -> list[dict]:
    """bench.speed's rows: our network at widths 16, 32 and 64 and the textbook one at 64 (each in a fresh
    process, so each peak memory is its own)."""
    from bench.speed import measure_apart

    gpu = device.type == "cuda"
    patch, batch, steps = (512, 8, 20) if gpu else (128, 2, 2)
    rows = []
    for model, width in ([("ours", 16), ("ours", 32), ("ours", 64), ("textbook", 64)] if not quick
                         else [("ours", 16), ("textbook", 16)]):
        try:
            row = measure_apart(model, width, str(device), patch, batch, steps, "same", peak, timeout=300)
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            rows.append({"model": model, "width": width, "error": str(exc)[-1000:]})
            continue
        rows.append(row)
        print(f"  {model} width {width}: {row['train_steps_per_s']:.1f} steps/s "
              f"({row['train_fraction_of_peak']:.0%} of peak)", flush=True)
    return rows


def pipeline(device: torch.device, quick: bool) -> list[dict]:
    from bench.pipeline import measure

    names = ["gpu", "gpu-full"] if device.type == "cuda" else ["tiny" if quick else "cpu-quick"]
    return [measure(name, str(device), 1.0 if quick else 3.0) for name in names]


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
    ap.add_argument("--data", default=None, help="the ISBI 2012 folder")
    ap.add_argument("--quick", action="store_true", help="small sizes: check the script on a CPU")
    ap.add_argument("--skip", nargs="*", default=[], choices=["speed", "pipeline", "prediction", "quality"])
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    started = time.perf_counter()
    result: dict = {"environment": environment(device)}
    env = result["environment"]
    print(f"{env.get('name', env['device'])}: torch {env['torch']}, CUDA {env['cuda']}, {env['cores']} cores; "
          f"peak {env['peak_kind']} {env['peak_gflop_per_s']:.0f} GFLOP/s", flush=True)
    parts = [("speed", lambda: speed(device, env["peak_gflop_per_s"], args.quick)),
             ("pipeline", lambda: pipeline(device, args.quick)),
             ("prediction", lambda: prediction(device, args.quick)),
             ("quality", lambda: quality(0.2 if args.quick else args.budget_min, args.data, args.quick))]
    for name, run in parts:
        if name in args.skip:
            continue
        print(f"\n{name} …", flush=True)
        t0 = time.perf_counter()
        try:
            result[name] = run()
        except Exception as exc:  # (a prepared run goes on: the other parts still count)
            result[name] = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-3000:]}
            print(f"  failed: {exc}", flush=True)
        result.setdefault("seconds", {})[name] = time.perf_counter() - t0
    result["seconds"]["total"] = time.perf_counter() - started
    if isinstance(result.get("speed"), list):
        print("\nbench.speed, same padding:")
        print(table([r for r in result["speed"] if "error" not in r],
                    [("model", "model", ""), ("width", "width", "d"), ("train_steps_per_s", "train steps/s", ".1f"),
                     ("train_fraction_of_peak", "train % peak", ".0%"), ("infer_s_per_slice", "infer s/slice", ".4f"),
                     ("peak_mem_mb", "peak MB", ".0f")]))
    if isinstance(result.get("pipeline"), list):
        print("\ntraining input pipeline against the network:")
        print(table(result["pipeline"], [("preset", "preset", ""), ("network_steps_per_s", "network steps/s", ".1f"),
                                         ("device_batches_per_s", "device batches/s", ".1f"),
                                         ("device_batch_cost", "batch/step", ".0%"),
                                         ("device_loop_share", "loop/network", ".0%"),
                                         ("host_loop_share", "loop/network (host)", ".0%")]))
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
    print(f"\ntotal {result['seconds']['total']:.0f} s")
    name = env.get("name", env["device"]).replace(" ", "-").lower()
    write_json(args.json or str(ROOT / "bench" / "results" / f"gpu-{name}.json"), result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
