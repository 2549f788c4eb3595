"""``python -m unet train | predict | evaluate``.

    python -m unet train --volume train-volume.tif --labels train-labels.tif \\
        --train-slices 0-24 --val-slices 25-29 --preset cpu-quick --out runs/a
    python -m unet predict --checkpoint runs/a/best.pt --volume test-volume.tif --out pred/
        # → pred/probabilities.tif, pred/mask.tif, pred/instances.tif, pred/neurons.tif (the app's outputs),
        #   block by block in bounded memory (unet.prediction.blockwise); stopped, the same command resumes it
    python -m unet evaluate --prediction pred/probabilities.tif --labels train-labels.tif --slices 25-29
    python -m unet export --checkpoint runs/a/best.pt --volume train-volume.tif --out model.zip
        # → a BioImage.IO package, validated and tested (ilastik, deepImageJ, bioimageio.core run it)
    python -m unet predict --model model.zip --volume test-volume.tif --out pred/
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import zarr
from tqdm import tqdm

from unet.exchange.bioimageio import ISBI_CITE, UNET_CITE, ExportInfo, export_package
from unet.exchange.checkpoint import load_checkpoint
from unet.exchange.io import inspect_stack, parse_slices, read_labels, read_stack
from unet.exchange.stacks import open_stack
from unet.exchange.writing import write_tiff_slices
from unet.network.config import PRESETS, preset
from unet.network.device import pick_device
from unet.network.threads import choose_threads
from unet.prediction.blocks import BlockJob, output_path
from unet.prediction.metrics import evaluate_slice, mean_metrics
from unet.prediction.postprocess import DEFAULT_METHOD, METHODS
from unet.prediction.schedule import run_blocks
from unet.prediction.segment import output_file
from unet.prediction.stitch import link_neurons
from unet.training.data import TrainData
from unet.training.ddp import run_distributed
from unet.training.labels import labels_to_target
from unet.training.reporting import NullReporter
from unet.training.train import train


def _train(args: argparse.Namespace) -> int:
    # under torchrun: one process per GPU (gloo on CPUs), same checkpoints and curves
    return run_distributed(lambda rank, world: _train_here(args, rank, world))


def _train_here(args: argparse.Namespace, rank: int, world: int) -> int:
    volume = read_stack(args.volume)
    labels = read_labels(args.labels, volume.shape)
    train_slices = parse_slices(args.train_slices, volume.shape[0])
    val_slices = parse_slices(args.val_slices, volume.shape[0]) if args.val_slices else []
    model_changes = {k: v for k, v in (("initial_features", args.width), ("depth", args.depth),
                                       ("padding", args.padding)) if v is not None}
    overrides = {k: v for k, v in (("steps", args.steps), ("batch_size", args.batch_size),
                                   ("patch_size", args.patch_size), ("lr", args.lr),
                                   ("max_seconds", args.max_minutes * 60 if args.max_minutes else None),
                                   ("seed", args.seed), ("device", args.device),
                                   ("border_weight", args.border_weight), ("val_every", args.val_every),
                                   ("early_stop_patience", args.patience)) if v is not None}
    if model_changes:
        overrides["model"] = model_changes
    config = preset(args.preset, **overrides)
    data = TrainData.from_stack(volume, labels, train_slices, val_slices)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2))

    class Bar(NullReporter):
        def __init__(self) -> None:
            self.bar = tqdm(total=config.steps, unit="step", dynamic_ncols=True)

        def on_step(self, step: int, loss: float, lr: float, seconds: float) -> None:
            self.bar.n = step
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.1e}", refresh=False)
            self.bar.refresh()

        def on_validation(self, step: int, metrics: dict[str, float], seconds: float) -> None:
            shown = ", ".join(f"{k[4:]} {v:.4f}" for k, v in sorted(metrics.items()))
            self.bar.write(f"step {step}: {shown}")

    if world == 1 and pick_device(config.device).type == "cpu":  # not every core: what trains fastest here
        torch.set_num_threads(choose_threads(config))
    bar = Bar() if rank == 0 else None
    try:
        result = train(config, data, bar, out_dir=out, resume=args.resume, init_from=args.init_from)
    finally:
        if bar is not None:
            bar.bar.close()
    if rank != 0:
        return 0
    (out / "history.json").write_text(json.dumps({"steps": result.history, "validations": result.validations}))
    shared = f" ({world} processes, DistributedDataParallel)" if world > 1 else ""
    print(f"{result.reason} after {result.steps_done} steps on {result.device}{shared}; checkpoints in {out}")
    if result.best:
        print("best: " + ", ".join(f"{k} {v:.4f}" for k, v in result.best.items() if k != "step"))
    return 0


def _predict(args: argparse.Namespace) -> int:
    """Predict a stack block by block with the app's engine (:mod:`unet.prediction.blockwise`): memory bounded by a
    block, never the stack; a run that is stopped resumes from the blocks it wrote (the same command
    again). The outputs are TIFFs (or OME-Zarr images, ``--format ome-zarr``), written slice by slice."""
    weights = Path(args.model or args.checkpoint).resolve()
    if not weights.is_file():
        raise ValueError(f"{weights} does not exist")
    source = Path(args.volume).resolve()
    volume = open_stack(source)  # the header checked; nothing read yet
    slices = parse_slices(args.slices, volume.shape[0])
    pixel_size = None
    if source.is_file():
        pixel_size = inspect_stack(source).pixel_size_nm
    out = Path(args.out)
    work = out / ".neuroseg-blocks"  # the engine's outputs and markers: what a resumed run reuses
    digest = hashlib.sha256()
    with open(weights, "rb") as fh:
        for part in iter(lambda: fh.read(1 << 20), b""):
            digest.update(part)
    stat = source.stat()
    identity = {"weights": digest.hexdigest(), "volume": [str(source), stat.st_size, stat.st_mtime_ns],
                "slices": slices, "threshold": args.threshold, "instances": not args.no_instances, "tta": args.tta,
                "postprocess": args.postprocess, "tile": args.tile or 0}
    recorded = work / "job.json"
    if recorded.is_file():
        if json.loads(recorded.read_text()) == identity:
            print(f"resuming the prediction in {work} (the blocks already written are kept)")
        else:
            print(f"{work} holds another prediction (other weights, stack or options): starting afresh")
            shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    recorded.write_text(json.dumps(identity))
    job = BlockJob(checkpoint=str(weights), volume=str(source), out=str(work), slices=tuple(slices),
                   threshold=args.threshold, with_instances=not args.no_instances, tta=args.tta,
                   device=args.device, method=args.postprocess, package=bool(args.model),
                   network_tile=args.tile or 0)
    shape = tuple(int(n) for n in volume.shape[1:])
    print(f"predicting {len(slices)} slice(s) of {shape[1]} × {shape[0]} from {source.name}", flush=True)
    with tqdm(unit="block", desc="predict", dynamic_ncols=True) as bar:
        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.n = done
            bar.refresh()

        run_blocks(job, shape, progress=progress, pixel_size_nm=pixel_size, workers=args.workers)
    if job.with_instances:
        neurons = link_neurons(job, shape)
        print(f"{neurons['count']} neurons linked through the predicted slices", flush=True)
    names = job.all_outputs
    written = []
    for name in names:
        if args.format == "ome-zarr":
            target = output_path(out, name)
            shutil.rmtree(target, ignore_errors=True)
            os.replace(output_path(work, name), target)
        else:
            array = zarr.open_array(output_path(work, name), path="0", mode="r")
            target = write_tiff_slices(array, out / (output_file(name) if name != "neurons" else "neurons.tif"),
                                       pixel_size)
        written.append(target.name)
    shutil.rmtree(work)
    print(f"wrote {len(slices)} slices to {out} ({', '.join(written)})")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    probs = read_stack(args.prediction).astype(np.float32)
    if probs.max() > 1.0:  # a 0/255 mask rather than probabilities
        probs = probs / probs.max()
    labels = read_labels(args.labels)
    slices = parse_slices(args.slices, labels.shape[0]) if args.slices else list(range(labels.shape[0]))
    if len(slices) != probs.shape[0]:
        raise ValueError(f"the prediction has {probs.shape[0]} slices but {len(slices)} label slices were "
                         "chosen; pass --slices to say which label slices it covers")
    targets = labels_to_target(labels[slices])
    if targets.shape != probs.shape:
        raise ValueError(f"prediction {probs.shape} and labels {targets.shape} differ in shape")
    rows = [evaluate_slice(p, t, method=args.postprocess) for p, t in zip(probs, targets, strict=True)]
    mean = mean_metrics(rows)
    # today's scores, then the field's: ISBI 2012's V_rand and V_info (thinned, best threshold) of the map,
    # CREMI's VI split and merge and adapted Rand error of the watershed's instances
    columns = [("pixel_error", 12, ".4f"), ("dice", 8, ".4f"), ("iou", 8, ".4f"), ("rand_f", 8, ".4f"),
               ("vi", 8, ".3f"), ("v_rand", 8, ".4f"), ("v_info", 8, ".4f"), ("vi_split", 9, ".3f"),
               ("vi_merge", 9, ".3f"), ("are", 8, ".4f")]

    def line(name, row):
        return f"{name:>6} " + " ".join(f"{row.get(k, float('nan')):>{w}{f}}" for k, w, f in columns)

    print(f"{'slice':>6} " + " ".join(f"{k:>{w}}" for k, w, _ in columns))
    for z, r in zip(slices, rows, strict=True):
        print(line(str(z), r))
    print(line("mean", mean))
    if args.json:
        Path(args.json).write_text(json.dumps({"slices": dict(zip(map(str, slices), rows, strict=True)),
                                               "mean": mean}, indent=2))
    return 0


def _export(args: argparse.Namespace) -> int:
    checkpoint = load_checkpoint(args.checkpoint)
    volume = read_stack(args.volume)
    if not 0 <= args.slice < volume.shape[0]:
        raise ValueError(f"--slice {args.slice} is outside the stack (0-{volume.shape[0] - 1})")
    info = ExportInfo(name=args.name or f"Neuroseg U-Net {Path(args.checkpoint).stem}", description=args.description,
                      authors=args.author or ["Neuroseg"], license=args.license,
                      cite=[UNET_CITE, ISBI_CITE] if args.isbi else [UNET_CITE],
                      pixel_size_nm=inspect_stack(args.volume).pixel_size_nm)
    result = export_package(checkpoint, np.asarray(volume[args.slice]), info, args.out)
    print(f"wrote {args.out}: bioimageio.spec {'valid' if result.valid else 'INVALID'}, "
          f"bioimageio.core model test {'passed' if result.tested else 'not run'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m unet", description="Neuroseg U-Net engine")
    sub = ap.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train from TIFF stacks")
    t.add_argument("--volume", required=True)
    t.add_argument("--labels", required=True, help="0/255, 0/1, bool or instance labels, same shape")
    t.add_argument("--train-slices", default="all", help="e.g. 0-24 or 0,2,4-9 (inclusive)")
    t.add_argument("--val-slices", default="", help="e.g. 25-29")
    t.add_argument("--preset", default="cpu-quick", choices=sorted(PRESETS))
    t.add_argument("--out", required=True, help="folder for checkpoints and history")
    t.add_argument("--steps", type=int)
    t.add_argument("--batch-size", type=int)
    t.add_argument("--patch-size", type=int)
    t.add_argument("--lr", type=float)
    t.add_argument("--width", type=int, help="initial features (the brief's hidden channels)")
    t.add_argument("--depth", type=int)
    t.add_argument("--padding", choices=["valid", "same"])
    t.add_argument("--border-weight", type=float, help="w0 of the paper's border weights (0 = off)")
    t.add_argument("--max-minutes", type=float, help="wall-clock budget")
    t.add_argument("--val-every", type=int, help="steps between validations")
    t.add_argument("--patience", type=int, help="stop after this many validations without a better loss (0: never)")
    t.add_argument("--seed", type=int)
    t.add_argument("--device", help="auto, cpu, cuda, cuda:1, mps")
    t.add_argument("--resume", action="store_true", help="continue from OUT/latest.pt")
    t.add_argument("--init-from", help="fine-tune from this checkpoint")
    t.set_defaults(func=_train)

    p = sub.add_parser("predict", help="predict a stack to TIFFs")
    weights = p.add_mutually_exclusive_group(required=True)
    weights.add_argument("--checkpoint", help="a checkpoint (.pt with its .json)")
    weights.add_argument("--model", help="a BioImage.IO package (.zip) exported by Neuroseg")
    p.add_argument("--volume", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--slices", default="all")
    p.add_argument("--tile", type=int, help="input tile size (default 512)")
    p.add_argument("--tta", action="store_true", help="average the 8 flips/rotations")
    p.add_argument("--threshold", type=float, default=0.5)
    p.add_argument("--no-instances", action="store_true")
    p.add_argument("--postprocess", choices=METHODS, default=DEFAULT_METHOD,
                   help=f"how neurons are made from the map (default {DEFAULT_METHOD})")
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, help="worker processes (default: one per GPU, or per core as the memory "
                   "allows; 1 runs the blocks in this process)")
    p.add_argument("--format", choices=("tiff", "ome-zarr"), default="tiff",
                   help="the outputs as ImageJ TIFFs (default) or OME-Zarr images (for stacks too big for a TIFF)")
    p.set_defaults(func=_predict)

    x = sub.add_parser("export", help="a checkpoint as a BioImage.IO package (.zip), validated and tested")
    x.add_argument("--checkpoint", required=True)
    x.add_argument("--volume", required=True, help="a stack the model knows: its test tensors come from it")
    x.add_argument("--slice", type=int, default=0, help="the slice the test input is cut from")
    x.add_argument("--out", required=True, help="the package to write (.zip)")
    x.add_argument("--name", default="", help="the model's name (default: Neuroseg U-Net <file name>)")
    x.add_argument("--description", default="A U-Net that maps an EM slice to its neuron (1 - membrane) "
                   "probability, trained with Neuroseg.")
    x.add_argument("--author", action="append", help="an author's name (repeat for several)")
    x.add_argument("--license", default="CC-BY-4.0", help="an SPDX licence id")
    x.add_argument("--isbi", action="store_true", help="cite the ISBI 2012 data (a model trained on it)")
    x.set_defaults(func=_export)

    e = sub.add_parser("evaluate", help="metrics of a prediction against labels")
    e.add_argument("--prediction", required=True, help="probabilities.tif (or a 0/255 mask)")
    e.add_argument("--labels", required=True)
    e.add_argument("--slices", help="which label slices the prediction covers, e.g. 25-29")
    e.add_argument("--json")
    e.add_argument("--postprocess", choices=METHODS, default=DEFAULT_METHOD,
                   help=f"how the instances scored are made from the map (default {DEFAULT_METHOD})")
    e.set_defaults(func=_evaluate)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, RuntimeError, FloatingPointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


