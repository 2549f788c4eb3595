"""Another lab's stack, the way a new user meets it: the starter model alone, against an ilastik-style
random forest trained on two fully labelled slices, and then the live loop started from the starter once
those two slices are corrected, scored as it trains.

    python -m bench.lab --volume V.tif --labels L.tif [--corrected 0,1] [--held-out 2-9]
                        [--start starter|CHECKPOINT.pt] [--minutes 3] [--forest-pixels 50000] [--json FILE]
                        [--tools 60] [--skip-forest]

This is the test of issue 11 on a labelled stack from another lab (ssTEM, 1024² slices): the starter must
beat the forest alone, and the live loop from it, after the two slices are corrected, must be ahead of the
forest on all three metrics (pixel error, Rand-F, VI on ``--held-out``) within 3 CPU minutes of training.

The U-Net side goes through the app: a real store and service, a dataset imported from ``--volume``, a
live session (:mod:`storage.jobs.live_worker`, its own process, one thread on a 2-core machine) started from
``--start``, and the corrected slices saved as mask versions of the full labels (what Accept and a few
strokes end with). From the moment the session has learned both saves, each checkpoint the session
writes (every minute) is scored on the held-out slices in this process, and after ``--minutes`` the
session is stopped and its last weights scored. The forest (100 trees, :mod:`bench.quality`'s features)
learns ``--forest-pixels`` pixels drawn uniformly from each corrected slice (ilastik users paint far
fewer; all 2 × 1024² pixels would only make it slower, not better).

With ``--tools N`` (issue 29) the corrected slices are not saved whole: N actions of Annotate's object tools
(:class:`bench.annotator.Tools`, each the one that fixes the largest error, where the queue says), spread over
them, correct the start's prediction of each, and the live session learns those masks instead.

Without ``--volume`` it runs on ISBI 2012 with slices 25–26 corrected and 27–29 held out, from the
starter's twin when given (``--start DIR/twin/stage2/latest.pt``; the shipped starter saw those slices).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import ROOT, labelled_stack, table, write_json
from bench.loop import open_live, save_mask, score, start_folder, wait_until


def predict(checkpoint: Path, volume: np.ndarray, slices: list[int]) -> list[np.ndarray]:
    """A checkpoint's neuron probabilities of ``slices`` (what Predict does, without test-time flips)."""
    from unet.exchange.checkpoint import load_checkpoint
    from unet.prediction.infer import predict_stack

    return list(predict_stack(load_checkpoint(checkpoint).build_model("cpu"), volume, slices))


def forest_scores(volume: np.ndarray, targets: np.ndarray, corrected: list[int], held: list[int],
                  pixels: int, seed: int = 0) -> dict:
    """The forest trained on ``pixels`` labelled pixels of each corrected slice, scored on ``held``."""
    from sklearn.ensemble import RandomForestClassifier

    from bench.quality import rf_features
    from unet.training.labels import IGNORE

    rng = np.random.default_rng(seed)
    started = time.perf_counter()
    xs, ys = [], []
    for z in corrected:
        f = rf_features(volume[z])
        f = f.reshape(-1, f.shape[-1])
        known = np.flatnonzero(targets[z].ravel() != IGNORE)
        pick = rng.choice(known, size=min(pixels, known.size), replace=False)
        xs.append(f[pick])
        ys.append(targets[z].ravel()[pick])
    forest = RandomForestClassifier(n_estimators=100, n_jobs=-1, min_samples_leaf=2, random_state=seed)
    forest.fit(np.concatenate(xs), np.concatenate(ys))
    train_s = time.perf_counter() - started
    neuron = list(forest.classes_).index(1)
    probs = []
    for z in held:
        f = rf_features(volume[z])
        probs.append(forest.predict_proba(f.reshape(-1, f.shape[-1]))[:, neuron].reshape(volume.shape[1:])
                     .astype(np.float32))
    return {**score(probs, [targets[z] for z in held]), "train_seconds": train_s,
            "training_pixels": int(sum(len(y) for y in ys))}


def tool_masks(start_file: Path, volume: np.ndarray, targets: np.ndarray, corrected: list[int],
               actions: int) -> tuple[dict[int, np.ndarray], dict]:
    """The corrected slices as ``actions`` object tools (spread evenly over them) leave the start's prediction
    of each, by :class:`bench.annotator.Tools` working where the queue says: the masks, and what it did."""
    from bench.annotator import Tools
    from unet.training.labels import IGNORE

    masks, used, done = {}, {}, 0
    for i, (z, prob) in enumerate(zip(corrected, predict(start_file, volume, corrected), strict=True)):
        budget = actions // len(corrected) + (1 if i < actions % len(corrected) else 0)
        annotator = Tools(targets[z], "queue")
        annotator.begin(prob)
        masks[z] = np.full(targets[z].shape, IGNORE, np.uint8)
        for _ in range(budget):
            after = annotator.act(masks[z])
            if after is None:
                break
            masks[z], done = after, done + 1
            used[annotator.last_tool] = used.get(annotator.last_tool, 0) + 1
    labelled = int(sum(np.count_nonzero(m != IGNORE) for m in masks.values()))
    return masks, {"actions": done, "tools": used, "labelled_pixels": labelled}


def live_scores(args, volume_path: Path, volume: np.ndarray, targets: np.ndarray, corrected: list[int],
                held: list[int], masks: dict[int, np.ndarray] | None = None) -> dict:
    """The live session from ``--start`` after the corrected slices are saved (their full labels, or
    ``masks``), scored at each checkpoint."""
    from unet.exchange.checkpoint import load_checkpoint, side_file

    work = Path(tempfile.mkdtemp(prefix="neuroseg-lab-"))
    svc = None
    try:
        svc, ds, run_id = open_live(args.start, volume_path, work)
        for z in corrected:
            saved = save_mask(svc, ds, z, targets[z] if masks is None else masks[z])
        t_saved = time.monotonic()
        svc.live_see(run_id, "annotator", corrected[-1])
        wait_until("the live overlay to include both saves", lambda: (
            p := svc.live_prediction(run_id, corrected[-1])) is not None and p.masks_seen >= saved.id)
        learned_s = time.monotonic() - t_saved
        print(f"live session {run_id} learned both saves {learned_s:.1f} s after the last", flush=True)
        folder = svc.store.run_dir(run_id)
        rows = []
        seen = (folder / "latest.pt").stat().st_mtime if (folder / "latest.pt").exists() else None  # not learned
        deadline = t_saved + args.minutes * 60

        def fresh():
            latest = folder / "latest.pt"
            return latest.exists() and latest.stat().st_mtime != seen and (folder / "best.pt").exists()

        while True:
            left = deadline - time.monotonic()
            try:
                last = left <= 0 or not wait_until("a checkpoint", fresh, timeout=left)
            except TimeoutError:
                last = True
            if last:
                svc.live_stop(run_id)
                wait_until("the session to end", lambda: not svc.run(run_id).active, timeout=120)
            at = time.monotonic() - t_saved
            seen = (folder / "latest.pt").stat().st_mtime
            copy = work / "scored.pt"
            shutil.copy(folder / "best.pt", copy)  # the weights that predict (the worker may write again)
            shutil.copy(side_file(folder / "best.pt"), side_file(copy))

            step = int(load_checkpoint(copy).meta.get("step", 0))
            metrics = score(predict(copy, volume, held), [targets[z] for z in held])
            rows.append({"seconds": at, "step": step, **metrics})
            print(f"live  {at:5.0f} s after the saves, step {step}: {metrics}", flush=True)
            if last:
                break
        return {"run_id": run_id, "learned_both_s": learned_s, "checkpoints": rows}
    finally:
        if svc is not None:
            svc.close()
        shutil.rmtree(work, ignore_errors=True)


def ahead(unet: dict, forest: dict) -> bool:
    return unet["pixel_error"] < forest["pixel_error"] and unet["rand_f"] > forest["rand_f"] and \
        unet["vi"] < forest["vi"]


def main(argv: list[str] | None = None) -> int:
    from unet.exchange.io import parse_slices

    ap = argparse.ArgumentParser(prog="python -m bench.lab", description=__doc__.split("\n\n")[0])
    ap.add_argument("--volume", help="the stack (default: the ISBI 2012 training volume)")
    ap.add_argument("--labels", help="its full labels (default: the ISBI 2012 training labels)")
    ap.add_argument("--corrected", default=None, help="the two slices corrected first (default 0,1; ISBI: 25,26)")
    ap.add_argument("--held-out", default=None, help="the slices scored (default: all the others; ISBI: 27-29)")
    ap.add_argument("--start", default="starter", help="starter, or a checkpoint file")
    ap.add_argument("--minutes", type=float, default=3.0, help="training time of the live session")
    ap.add_argument("--forest-pixels", type=int, default=50_000, help="pixels per corrected slice for the forest")
    ap.add_argument("--tools", type=int, default=0, help="correct the slices with this many object-tool actions "
                    "on the start's prediction (bench.annotator.Tools) instead of saving their full labels")
    ap.add_argument("--skip-forest", action="store_true")
    ap.add_argument("--json", default=str(ROOT / "bench" / "results" / "lab.json"))
    args = ap.parse_args(argv)
    if args.start == "random":
        ap.error("the test starts from a trained model: --start starter or a checkpoint")
    found = labelled_stack(args.volume, args.labels)
    if found is None:
        return 2
    volume_path, volume, targets = found
    isbi = args.volume is None
    corrected = parse_slices(args.corrected or ("25,26" if isbi else "0,1"), volume.shape[0])
    held = parse_slices(args.held_out, volume.shape[0]) if args.held_out else \
        ([27, 28, 29] if isbi else [z for z in range(volume.shape[0]) if z not in corrected])
    if set(corrected) & set(held) or not held:
        print("--corrected and --held-out overlap, or nothing is held out", file=sys.stderr)
        return 2
    folder = start_folder(args.start, Path(tempfile.mkdtemp(prefix="neuroseg-lab-start-")))
    start_file = next(folder.glob("*.pt"))
    alone = score(predict(start_file, volume, held), [targets[z] for z in held])
    print(f"start alone ({args.start}): {alone}", flush=True)
    forest = None if args.skip_forest else forest_scores(volume, targets, corrected, held, args.forest_pixels)
    print(f"forest on slices {corrected}: {forest}", flush=True)
    masks, by_tools = None, None
    if args.tools:
        masks, by_tools = tool_masks(start_file, volume, targets, corrected, args.tools)
        print(f"the corrected slices by tools: {by_tools}", flush=True)
    live = live_scores(args, volume_path, volume, targets, corrected, held, masks)
    shutil.rmtree(folder.parent, ignore_errors=True)
    rows = [{"model": f"start alone ({Path(args.start).name})", **alone},
            *([{"model": f"random forest on slices {','.join(map(str, corrected))}", **forest}] if forest else []),
            *({"model": f"live from the start, {r['seconds']:.0f} s", **r} for r in live["checkpoints"])]
    print(table(rows, [("model", "model", "s"), ("step", "steps", "d"), ("pixel_error", "pixel error", ".4f"),
                       ("rand_f", "Rand-F", ".4f"), ("vi", "VI", ".3f")]))
    verdict = {}
    if forest is not None:
        first = next((r for r in live["checkpoints"] if ahead(r, forest)), None)
        verdict = {"start_beats_forest": ahead(alone, forest),
                   "live_ahead_after_s": None if first is None else first["seconds"]}
        print(f"the start alone beats the forest on all three: {verdict['start_beats_forest']}; the live loop is "
              + ("never ahead on all three" if first is None else f"ahead on all three {first['seconds']:.0f} s "
                 "after the saves"))
    write_json(args.json, {"volume": str(volume_path), "shape": list(volume.shape), "start": args.start,
                           "corrected": corrected, "held_out": held, "minutes": args.minutes,
                           "start_alone": alone, "forest": forest, "live": live, "by_tools": by_tools, **verdict,
                           "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
