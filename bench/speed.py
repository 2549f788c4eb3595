"""Training and inference speed of our U-Net against a textbook U-Net of the same width.

    python -m bench.speed [--json out.json] [--widths 16 32 64] [--device cpu|cuda]

On the machine at hand (CUDA when present, else CPU): training steps/s, inference seconds per 512²
slice (our full tiled-inference path against a bare forward pass of the textbook model), FLOPs per
step (counted by ``torch.utils.flop_counter``), achieved GFLOP/s as a fraction of the machine's peak
measured in the same run (a large fp32 matrix product on CPU, bf16 on GPU), and peak memory. Each
(model, width) is measured in a fresh subprocess so its peak memory is its own. Last, the training input
pipeline's batches/s beside the step rate of the preset the device gets (``cpu-quick`` or ``gpu``):
:mod:`bench.pipeline`, which also compares thread counts.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import table, write_json


def measure_peak(device: torch.device, seconds: float = 3.0) -> float:
    """Achieved GFLOP/s of a large matrix product: fp32 on CPU, bf16 on GPU (tensor cores)."""
    n = 8192 if device.type == "cuda" else 2048
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    _sync(device)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
        _sync(device)
    return 2 * n**3 * count / (time.perf_counter() - start) / 1e9


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _seconds_per_call(fn, device: torch.device, warmup: int, reps: int) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / reps


def _build(model_name: str, width: int, device: torch.device, padding: str):
    from bench.textbook import TextbookUNet
    from unet.network.config import ModelConfig
    from unet.network.model import UNet

    torch.manual_seed(0)
    if model_name == "ours":
        return UNet(ModelConfig(initial_features=width, depth=4, padding=padding, batch_norm=True)).to(device)
    return TextbookUNet(width=width, depth=4).to(device)


def _flops(model, x: torch.Tensor, backward: bool) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        if backward:
            model(x).float().mean().backward()
        else:
            with torch.inference_mode():
                model(x)
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def measure_one(model_name: str, width: int, device_name: str, patch: int, batch: int, steps: int,
                padding: str) -> dict:
    from unet.network.device import amp_dtype, autocast
    from unet.prediction.infer import predict_slice

    device = torch.device(device_name)
    amp = amp_dtype(device, "auto")
    model = _build(model_name, width, device, padding)
    channels_last = device.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 1, patch, patch, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    train_flops = _flops(model, x, backward=True)
    if device.type == "cuda":  # CUDA-only: the peak of the timed (AMP) steps, not of the fp32 count above
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)

    def step():
        with autocast(device, amp):
            out = model(x)
        loss = out.float().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    train_s = _seconds_per_call(step, device, warmup=2, reps=steps)

    model.eval()
    image = np.random.default_rng(0).integers(0, 255, (512, 512)).astype(np.uint8)
    if model_name == "ours":
        # our whole path: normalisation, mirror padding, tiling, blending (valid padding needs the
        # paper's overlap tiles; same padding goes through as one 512² tile)
        def infer():
            return predict_slice(model, image, tile=512 if padding == "same" else 572, device=device, amp=amp)

        from unet.network.sizes import output_size
        tile = 512 if padding == "same" else 572
        tiles = int(np.ceil(512 / output_size(model.config, tile))) ** 2
        xi = torch.randn(1, 1, tile, tile, device=device)
        infer_flops = _flops(model, xi, backward=False) * tiles
    else:
        xi = torch.randn(1, 1, 512, 512, device=device)

        def infer():
            with torch.inference_mode(), autocast(device, amp):
                out = torch.sigmoid(model(xi)).float().cpu()
            return out

        infer_flops = _flops(model, xi, backward=False)
    gpu = device.type == "cuda"
    infer_s = _seconds_per_call(infer, device, warmup=2 if gpu else 1, reps=10 if gpu else 2)
    if device.type == "cuda":
        peak_mem = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak_mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"model": model_name, "width": width, "train_steps_per_s": 1 / train_s,
            "infer_s_per_slice": infer_s, "train_gflop_per_step": train_flops / 1e9,
            "train_gflop_per_s": train_flops / train_s / 1e9, "infer_gflop_per_slice": infer_flops / 1e9,
            "gflop_per_s": infer_flops / infer_s / 1e9, "peak_mem_mb": peak_mem,
            "patch": patch, "batch": batch, "padding": padding if model_name == "ours" else "same"}


def measure_apart(model_name: str, width: int, device: str, patch: int, batch: int, steps: int, padding: str,
                  peak: float, timeout: float | None = None) -> dict:
    """:func:`measure_one` in a fresh process (so its peak memory is its own), with its fractions of ``peak``;
    :class:`RuntimeError` with the child's error output when it fails."""
    cmd = [sys.executable, "-m", "bench.speed", "--one", model_name, str(width), "--device", device,
           "--patch", str(patch), "--batch", str(batch), "--steps", str(steps), "--padding", padding]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=timeout,
                         cwd=Path(__file__).resolve().parent.parent)
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    row = json.loads(out.stdout.strip().splitlines()[-1])
    row["infer_fraction_of_peak"] = row["gflop_per_s"] / peak
    row["train_fraction_of_peak"] = row["train_gflop_per_s"] / peak
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.speed", description=__doc__.split("\n")[0])
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    ap.add_argument("--widths", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--patch", type=int, default=None, help="training patch (default 128 CPU, 512 GPU)")
    ap.add_argument("--batch", type=int, default=None, help="training batch (default 2 CPU, 8 GPU)")
    ap.add_argument("--steps", type=int, default=None, help="timed training steps (default 3 CPU, 20 GPU)")
    ap.add_argument("--padding", default="same", choices=["same", "valid"], help="our network's padding")
    ap.add_argument("--threads", type=int, nargs="*", default=None, help="on a CPU: the pipeline and the step rate "
                    "at each of these torch thread counts (steps/s against threads)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--one", nargs=2, metavar=("MODEL", "WIDTH"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    patch = args.patch or (512 if gpu else 128)
    batch = args.batch or (8 if gpu else 2)
    steps = args.steps or (20 if gpu else 3)
    if args.one:
        row = measure_one(args.one[0], int(args.one[1]), str(device), patch, batch, steps, args.padding)
        print(json.dumps(row))
        return 0

    peak = measure_peak(device)
    threads = torch.get_num_threads()
    name = torch.cuda.get_device_name(device) if gpu else f"{platform.processor() or 'CPU'} ({threads} threads)"
    print(f"device: {name}; peak {'bf16' if gpu else 'fp32'} matmul {peak:.0f} GFLOP/s; "
          f"training {batch}×{patch}², inference one 512² slice")
    rows = []
    for width in args.widths:
        for model_name in ("ours", "textbook"):
            try:
                row = measure_apart(model_name, width, str(device), patch, batch, steps, args.padding, peak)
            except RuntimeError as exc:
                print(exc, file=sys.stderr)
                return 1
            rows.append(row)
            print(f"  {model_name:8s} width {width:3d}: {row['train_steps_per_s']:.2f} steps/s, "
                  f"{row['infer_s_per_slice']:.3f} s/slice", flush=True)
    print()
    print(table(rows, [("model", "model", ""), ("width", "width", "d"),
                       ("train_steps_per_s", "train steps/s", ".3f"),
                       ("train_gflop_per_step", "GFLOP/step", ".1f"),
                       ("train_fraction_of_peak", "train % peak", ".0%"),
                       ("infer_s_per_slice", "infer s/slice", ".3f"),
                       ("gflop_per_s", "infer GFLOP/s", ".0f"),
                       ("infer_fraction_of_peak", "infer % peak", ".0%"),
                       ("peak_mem_mb", "peak MB", ".0f")]))
    # the training input pipeline beside the step it feeds, on the same device (bench.pipeline)
    from bench.pipeline import measure  # (bench.pipeline imports the training loop; --one needs none of it)

    pipe_preset = "gpu" if gpu else "cpu-quick"
    pipes = []
    for count in (args.threads or [torch.get_num_threads()]) if not gpu else [torch.get_num_threads()]:
        torch.set_num_threads(count)
        pipe = measure(pipe_preset, str(device), 3.0)
        pipes.append(pipe)
        print(f"\ninput pipeline, {pipe_preset} ({pipe['batch']} × {pipe['patch']}²), {count} threads: the network "
              f"alone {pipe['network_steps_per_s']:.2f} steps/s; batches/s host {pipe['host_batches_per_s']:.1f} "
              f"({pipe['host_batch_cost']:.0%} of a step), device {pipe['device_batches_per_s']:.1f} "
              f"({pipe['device_batch_cost']:.0%}); the loop keeps {pipe['host_loop_share']:.0%} (host) and "
              f"{pipe['device_loop_share']:.0%} (device) of the network's rate", flush=True)
    write_json(args.json, {"device": name, "peak_gflop_per_s": peak, "peak_kind": "bf16" if gpu else "fp32",
                           "training": {"patch": patch, "batch": batch}, "rows": rows, "pipeline": pipes})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
