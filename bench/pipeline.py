"""The training input pipeline against the step it feeds, and the step rate against the thread count (issue 30).

    python -m bench.pipeline [--preset cpu-quick] [--device cpu|cuda] [--threads 1 2 4] [--seconds 4] [--json F]

For a preset, on a synthetic 8 × 512² stack (no data needed):

- **batches/s** of each pipeline alone: ``host`` (NumPy and SciPy, :class:`unet.training.data.PatchSampler`) and
  ``device`` (torch ops where the network runs, :mod:`unet.training.device_batches`);
- the **network's own step rate**: the same batch again and again, nothing to make;
- the **training loop's step rate** with each pipeline (:meth:`unet.training.train.Trainer.step`, batches made
  as training makes them), and what share of the network's rate it keeps;
- the **cost of a batch** as a share of a step (batch seconds / step seconds).

With ``--threads``, the network's step rate and the loop's are measured again at each torch thread count (on a
CPU), as :func:`unet.network.threads.choose_threads` measures them to choose. Prints a table and writes JSON.

    python -m bench.pipeline --beside [--preset cpu-quick] [--processes 1 2] [--threads 1 2] [--seconds 5] [--json F]

``--beside``: the network's step rate in CPU processes that train **at the same time**, each with the given torch
thread count (a lab's CPU server trains, predicts and serves at once). The table gives each process's rate and
their sum for every (processes, threads each) pair: on 2 cores, two processes of two threads (torch's default)
against one thread each shows what oversubscribing the cores costs (:func:`unet.network.threads.shared_threads`).
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time

import numpy as np
import torch

from bench.common import table, write_json
from unet.network.config import preset
from unet.network.device import describe_device, pick_device
from unet.training.data import TrainData
from unet.training.synthetic import make_synthetic_em
from unet.training.train import Trainer


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rate(fn, device: torch.device, seconds: float, warmup: int = 2) -> float:
    """Calls of ``fn`` per second over about ``seconds`` (after ``warmup`` calls), the device waited for."""
    for _ in range(warmup):
        fn()
    _sync(device)
    count, start = 0, time.perf_counter()
    while True:
        fn()
        count += 1
        if count % 5 == 0 or device.type != "cuda":
            _sync(device)
            if time.perf_counter() - start >= seconds:
                break
    _sync(device)
    return count / (time.perf_counter() - start)


def trainer_for(name: str, device: str, pipeline: str, work: str) -> Trainer:
    volume, labels = make_synthetic_em((8, 512, 512), np.random.default_rng(0))
    data = TrainData.from_stack(volume, labels, range(8))
    config = dataclasses.replace(preset(name), device=device, pipeline=pipeline, steps=10**9)
    trainer = Trainer(config, data, None, work)
    trainer.restore()
    return trainer


def measure(name: str, device_name: str, seconds: float) -> dict:
    """One row: both pipelines' batches/s, the network's step rate, the loop's with each pipeline."""
    row: dict = {"preset": name, "threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as work:
        for pipeline in ("host", "device"):
            trainer = trainer_for(name, device_name, pipeline, work)
            device, batch = trainer.device, trainer.config.batch_size
            sampler = trainer.batches  # (the endless batches the loop draws from)
            row[f"{pipeline}_batches_per_s"] = rate(lambda s=sampler: next(s), device, seconds)
            row[f"{pipeline}_loop_steps_per_s"] = rate(trainer.step, device, seconds)
            trainer.flush()
            if pipeline == "device":  # the network alone: one batch, made once, stepped on again and again
                made = next(trainer.batches)
                trainer.batches = iter(lambda m=made: m, None)
                row["network_steps_per_s"] = rate(trainer.step, device, seconds)
                trainer.flush()
                row["device"] = describe_device(device)
                row["batch"], row["patch"] = batch, trainer.config.patch_size
    network = row["network_steps_per_s"]
    for pipeline in ("host", "device"):
        row[f"{pipeline}_loop_share"] = row[f"{pipeline}_loop_steps_per_s"] / network
        row[f"{pipeline}_batch_cost"] = network / row[f"{pipeline}_batches_per_s"]  # batch s / step s
    return row


def _rate_beside(preset_name: str, threads: int, seconds: float, start, out) -> None:
    from unet.network.threads import steps_per_second  # (a spawned process: only --beside measures this way)

    torch.set_num_threads(threads)
    config = preset(preset_name)
    steps_per_second(config, threads, 0.2)  # (warm: the first steps allocate)
    start.wait()  # every process measures at the same time
    out.put(steps_per_second(config, threads, seconds))


def beside(preset_name: str, processes: int, threads: int, seconds: float) -> list[float]:
    """Steps/s of ``processes`` CPU processes training ``preset_name``'s network at once, ``threads`` each."""
    ctx = mp.get_context("spawn")  # a fresh torch in each, with its own thread pool
    start, out = ctx.Barrier(processes), ctx.Queue()
    procs = [ctx.Process(target=_rate_beside, args=(preset_name, threads, seconds, start, out))
             for _ in range(processes)]
    for p in procs:
        p.start()
    rates = [out.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
    return sorted(rates)


def main_beside(args: argparse.Namespace) -> int:
    name = args.preset or "cpu-quick"
    rows = []
    for processes in args.processes:
        for threads in args.threads or [1, 2]:
            rates = beside(name, processes, threads, args.seconds)
            rows.append({"processes": processes, "threads_each": threads,
                         "steps_per_s_each": [round(r, 2) for r in rates], "steps_per_s_total": round(sum(rates), 2)})
    cores = len(os.sched_getaffinity(0))
    print(f"{name}, {cores} cores ({platform.processor() or 'CPU'}), processes training at once, "
          f"{args.seconds:.0f} s each\n")
    shown = [{**r, "each": ", ".join(f"{x:.2f}" for x in r["steps_per_s_each"])} for r in rows]
    print(table(shown, [("processes", "processes", "d"), ("threads_each", "threads each", "d"),
                        ("each", "steps/s of each", "s"), ("steps_per_s_total", "steps/s in all", ".2f")]))
    write_json(args.json, {"preset": name, "cores": cores, "seconds": args.seconds, "beside": rows})
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.pipeline", description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default=None, help="default: cpu-quick on a CPU, gpu on a GPU")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, nargs="*", default=None, help="torch thread counts to compare (CPU)")
    ap.add_argument("--seconds", type=float, default=4.0, help="per measurement")
    ap.add_argument("--json", default=None)
    ap.add_argument("--beside", action="store_true", help="CPU processes training at once (see above)")
    ap.add_argument("--processes", type=int, nargs="+", default=[1, 2], help="with --beside: how many at once")
    args = ap.parse_args(argv)
    if args.beside:
        return main_beside(args)
    device = pick_device(args.device)
    name = args.preset or ("gpu" if device.type == "cuda" else "cpu-quick")
    counts = args.threads or [torch.get_num_threads()]
    rows = []
    for threads in counts:
        torch.set_num_threads(threads)
        row = measure(name, str(device), args.seconds)
        rows.append(row)
        print(f"  {threads} threads: {row['network_steps_per_s']:.2f} network steps/s, loop "
              f"{row['host_loop_steps_per_s']:.2f} (host) / {row['device_loop_steps_per_s']:.2f} (device)",
              flush=True)
    print(f"\n{name} on {rows[0]['device']}, batch {rows[0]['batch']} × {rows[0]['patch']}²; "
          f"{os.cpu_count()} cores")
    print(table(rows, [("threads", "threads", "d"), ("network_steps_per_s", "network steps/s", ".2f"),
                       ("host_batches_per_s", "host batches/s", ".1f"),
                       ("device_batches_per_s", "device batches/s", ".1f"),
                       ("host_batch_cost", "host batch/step", ".0%"),
                       ("device_batch_cost", "device batch/step", ".0%"),
                       ("host_loop_steps_per_s", "loop steps/s (host)", ".2f"),
                       ("device_loop_steps_per_s", "loop steps/s (device)", ".2f"),
                       ("host_loop_share", "loop/network (host)", ".0%"),
                       ("device_loop_share", "loop/network (device)", ".0%")]))
    write_json(args.json, {"preset": name, "machine": f"{platform.processor() or platform.machine()}, "
                           f"{os.cpu_count()} cores", "torch": torch.__version__, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
