"""The live loop's learner on its own, for choosing its recipe: ``bench.loop``'s simulated annotator and
scores, with the :class:`~unet.training.live.LiveTrainer` driven directly (no store, no worker process) for a fixed
number of steps a round, so that recipes compare step for step and several slice orders run side by side.

    python -m bench.livesim [--start random|CHECKPOINT.pt] [--lr 1e-3] [--ema 0.98] [--forest 0.3]
                            [--steps 190] [--seeds 0,1,2] [--rounds 10] [--k 10] [--radius 8]
                            [--with-forest] [--json FILE]

190 steps a round is what a live session from random weights trains in ``bench.loop``'s 30 seconds on one
thread of the 2-core VM. ``--forest W``: a random forest on the same strokes teaches the unpainted pixels at
weight W (the live worker's default from random weights, with ``--ema 0.98``). ``--with-forest`` also runs
``bench.loop``'s random-forest loop on each order, the baseline. Printed per seed and round: pixel error,
Rand-F and VI on the held-out slices, and their means over rounds 6–10 (one round's score swings too much
to compare recipes on).
Default data: the ISBI 2012 training stack (annotate 0–24, score 25–29).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

from bench.annotator import paint, wrong_regions
from bench.common import labelled_stack, table, write_json
from bench.loop import forest_loop, score

KEYS = ("pixel_error", "rand_f", "vi")


def one_order(volume: np.ndarray, targets: np.ndarray, seed: int, args, work: Path) -> list[dict]:
    import torch

    from unet.exchange.checkpoint import load_checkpoint, save_checkpoint
    from unet.exchange.io import parse_slices
    from unet.network.config import TrainConfig, preset
    from unet.network.model import UNet
    from unet.training.forest import PixelForest
    from unet.training.labels import IGNORE
    from unet.training.live import LiveTrainer, live_config

    torch.manual_seed(seed)
    if args.start == "random":
        base, start = preset("cpu-quick"), work / f"random-{seed}.pt"
        save_checkpoint(start, UNet(base.model), meta={"kind": "starter", "step": 0, "train_config": base.to_dict()})
        trained = False
    else:
        start = Path(args.start)
        meta = load_checkpoint(start).meta
        base, trained = TrainConfig.from_dict(meta["train_config"]), int(meta.get("step", 0)) > 0
    rate = {} if args.lr is None else {"lr": args.lr} if trained else {"scratch_lr": args.lr}
    config = live_config(replace(base, device="cpu"), trained=trained, **rate)
    teacher = {"distill": args.forest, "reference": PixelForest()} if args.forest > 0 else {}
    learner = LiveTrainer(config, work / f"run-{seed}", init_from=start, ema=args.ema, **teacher)
    annotate = parse_slices(args.annotate, volume.shape[0])
    held = parse_slices(args.held_out, volume.shape[0])
    np.random.default_rng(seed).shuffle(annotate)
    painted = {z: np.zeros(volume.shape[1:], bool) for z in annotate}
    slices: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    rows = []
    for r in range(args.rounds):
        z = annotate[r % len(annotate)]
        prob = learner.predict(volume[z]) if learner.ready else np.full(volume.shape[1:], 0.5, np.float32)
        paint(painted[z], wrong_regions(prob, targets[z], painted[z], args.k, args.radius), args.radius)
        slices[z] = (volume[z], np.where(painted[z], targets[z], IGNORE).astype(np.uint8))
        learner.set_slices(slices, new=[z])
        learner.refresh_teacher(1e9)  # the worker renews the forest's answers on older slices between bursts
        learner.train_for(1e9, max_steps=args.steps)
        m = score([learner.predict(volume[h]) for h in held], [targets[h] for h in held])
        rows.append({"seed": seed, "round": r + 1, "step": learner.steps, "lr": config.lr, **m})
        print(f"seed {seed} round {r + 1:2d}: " + ", ".join(f"{k} {m[k]:.3f}" for k in KEYS), flush=True)
    return rows


def late_means(rows: list[dict], rounds: int) -> list[dict]:
    """Each order's means over the second half of the rounds, and their mean."""
    late = [r for r in rows if r["round"] > rounds // 2]
    summary = [{"seed": s, **{k: float(np.mean([r[k] for r in late if r["seed"] == s])) for k in KEYS}}
               for s in sorted({r["seed"] for r in rows})]
    summary.append({"seed": "mean", **{k: float(np.mean([r[k] for r in summary])) for k in KEYS}})
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.livesim", description=__doc__.split("\n\n")[0])
    ap.add_argument("--volume", help="the stack (default: the ISBI 2012 training volume)")
    ap.add_argument("--labels", help="its full labels (default: the ISBI 2012 training labels)")
    ap.add_argument("--annotate", default="0-24")
    ap.add_argument("--held-out", default="25-29")
    ap.add_argument("--start", default="random", help="random or a checkpoint file")
    ap.add_argument("--lr", type=float, default=None, help="the live rate (default: live_config's, 1e-3 from "
                    "random weights, 2e-4 from trained ones)")
    ap.add_argument("--ema", type=float, default=0.0, help="moving-average decay of the predicting weights")
    ap.add_argument("--forest", type=float, default=0.0, help="weight of a random forest's answer on unpainted "
                    "pixels (0: no forest teaches)")
    ap.add_argument("--with-forest", action="store_true", help="also run the random-forest loop on each order")
    ap.add_argument("--steps", type=int, default=190, help="training steps a round")
    ap.add_argument("--seeds", default="0,1,2", help="orders of the slices to annotate")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--radius", type=int, default=8)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    import torch

    from unet.exchange.io import parse_slices

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or 1))
    found = labelled_stack(args.volume, args.labels)
    if found is None:
        return 2
    _, volume, targets = found
    rows: list[dict] = []
    forest_rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="neuroseg-livesim-") as work:
        for seed in (int(s) for s in args.seeds.split(",")):
            rows += one_order(volume, targets, seed, args, Path(work))
            if args.with_forest:
                order = parse_slices(args.annotate, volume.shape[0])
                np.random.default_rng(seed).shuffle(order)
                found = forest_loop(args, volume, targets, order, parse_slices(args.held_out, volume.shape[0]))
                forest_rows += [{"seed": seed, **r} for r in found["rounds"]]
    lr = rows[0]["lr"]
    print(f"\nrounds {args.rounds // 2 + 1}-{args.rounds}, start {args.start}, lr {lr:g}, ema {args.ema:g}, "
          f"forest teacher {args.forest:g}, {args.steps} steps a round")
    columns = [("seed", "seed", ""), ("pixel_error", "pixel error", ".3f"), ("rand_f", "Rand-F", ".3f"),
               ("vi", "VI", ".3f")]
    summary = late_means(rows, args.rounds)
    print(table(summary, columns))
    result = {"start": args.start, "lr": lr, "ema": args.ema, "forest_teacher": args.forest,
              "steps_per_round": args.steps, "k": args.k, "radius": args.radius, "rounds": rows,
              "late_means": summary, "last_round": [r for r in rows if r["round"] == args.rounds]}
    if forest_rows:
        result["forest"] = {"rounds": forest_rows, "late_means": late_means(forest_rows, args.rounds),
                            "last_round": [r for r in forest_rows if r["round"] == args.rounds]}
        print("\nthe random-forest loop, same orders")
        print(table(result["forest"]["late_means"], columns))
    print(f"\nround {args.rounds}, U-Net")
    print(table(result["last_round"], columns))
    if forest_rows:
        print(f"\nround {args.rounds}, random forest")
        print(table(result["forest"]["last_round"], columns))
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
