"""The live loop measured with a simulated annotator, against an ilastik-style random forest that learns
from exactly the same kind of strokes.

    python -m bench.loop [--volume V.tif --labels L.tif] [--annotate 0-24] [--held-out 25-29]
                         [--start random|starter|CHECKPOINT.pt] [--rounds 10] [--k 10] [--radius 8]
                         [--seconds 30] [--steps-per-round 0] [--paint-seconds 0] [--page] [--zoom 1]
                         [--json FILE] [--skip-forest]

Each round the annotator takes the next slice to annotate (a fixed shuffled order of ``--annotate``),
looks at the model's prediction of it, finds the K largest wrongly predicted regions against the full
labels (not painted yet), and "paints" the true labels inside a disk of ``--radius`` pixels at the middle
of each; everything else stays unlabelled. The U-Net side does this through the app itself: a real store
and service, a live session (:mod:`storage.jobs.live_worker`, a separate process) started from ``--start``,
the painted masks saved as mask versions, the session left to train for ``--seconds`` (and, with
``--steps-per-round N``, until its step count reaches N a round, so that annotators who work at different
speeds compare at equal training), and the held-out
slices scored from the session's own live predictions (the bench asks for them as a viewer would). The
time from each save until the live overlay of the slice comes from weights that learned it is measured;
with ``--page`` one Annotate page is open in Chromium all along (the server as ``./run.sh`` runs it),
following the annotator's slice with Live on, as a user has it. With ``--zoom N`` the annotator (and the
page) look at the middle 1/N × 1/N of each slice, as Annotate's zoom shows it, and paint only there: the
live session predicts that region first.
The forest side is retrained (100 trees, scikit-image features as in :mod:`bench.quality`) on all painted
pixels after each round and predicts the same slices. Both print and write per round: pixel error, Rand-F
and VI on the held-out slices, painted pixels so far and wall-clock seconds.

Any stack with full labels works (ISBI 2012 by default; 1024² and larger too: nothing holds more than a
slice's features at once, and the live session predicts one slice at a time).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.annotator import Brush, Queue, RandomOrder, Round, Tools, noc, paint, wrong_regions
from bench.common import ROOT, labelled_stack, table, write_json
from bench.page import annotate_page

POLL_S = 0.1


def score(probs: list[np.ndarray], targets: list[np.ndarray]) -> dict[str, float]:
    from unet.prediction.metrics import evaluate_slice, mean_metrics

    m = mean_metrics([evaluate_slice(p, t) for p, t in zip(probs, targets, strict=True)])
    return {"pixel_error": m["pixel_error"], "rand_f": m["rand_f"], "vi": m["vi"]}


# --- the U-Net through the app ----------------------------------------------------------------------
def start_folder(start: str, work: Path) -> Path:
    """A folder with the checkpoint the session starts from, registered by the service as its starter (none
    from random weights: the session starts as Annotate's "random initialisation" does)."""
    from unet.exchange.checkpoint import side_file

    folder = work / "start"
    if folder.is_dir() and any(folder.iterdir()):  # (made already: --page starts the server first)
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    if start == "starter":
        from storage.records.starter import shipped

        path = shipped()
        if path is None:
            raise SystemExit("no starter model is shipped (models/starter/*.pt): train it with bench.starter")
        shutil.copy(path, folder / path.name)
        shutil.copy(side_file(path), side_file(folder / path.name))
    elif start != "random":
        path = Path(start)
        shutil.copy(path, folder / path.name)
        if side_file(path).exists():
            shutil.copy(side_file(path), side_file(folder / path.name))
    return folder


def wait_until(what: str, get, timeout: float = 600.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = get()
        if value:
            return value
        time.sleep(POLL_S)
    raise TimeoutError(f"timed out waiting for {what}")


def open_live(start: str, volume_path: Path, work: Path, supervise: bool = True):
    """A service on a new store in ``work``, the stack imported as a dataset and a live session on it from
    ``start`` (random, starter or a checkpoint file), its worker running: ``(svc, dataset_id, run_id)``.
    ``supervise=False`` when a server on the same store supervises the jobs (``--page``)."""
    from storage.records import datasets
    from storage.service import Neuroseg
    from storage.settings import Settings

    os.environ["NEUROSEG_STARTER_DIR"] = str(start_folder(start, work))
    svc = Neuroseg(Settings.from_env(work / "data"), supervise=supervise)
    if not supervise:
        from storage.records import starter

        with svc.sessions.begin() as s:
            starter.register(s, svc.store)
    with svc.sessions.begin() as s:
        ds = datasets.import_dataset(s, svc.store, volume_path, name=work.name).id
    if start == "random":
        session, _ = svc.live_start(ds, None, "annotator", scratch=True)
    else:
        session, _ = svc.live_start(ds, svc.checkpoint_choices()[0].id, "annotator")
    wait_until("the live worker", lambda: svc.run(session.run_id).status == "RUNNING")
    return svc, ds, session.run_id


def save_mask(svc, ds: int, z: int, mask: np.ndarray):
    """Save ``mask`` (training targets, IGNORE where unlabelled) as slice z's next mask version, as the
    Annotate page's Save does with a draft."""
    from ui.annotation import Draft

    draft = Draft.begin(svc.draft_start(ds, z, "latest" if svc.history(ds, z) else "nothing"))
    edit = mask.astype(np.uint8)
    edit.setflags(write=False)
    draft.working = edit
    draft.revision += 1
    return svc.save_draft(draft, "annotator", owner="annotator")


def unet_loop(args, volume_path: Path, targets: np.ndarray, order: list[int], held: list[int]) -> dict:
    from unet.training.labels import IGNORE

    work = Path(tempfile.mkdtemp(prefix="neuroseg-loop-"))
    svc = None
    page = None
    stack = contextlib.ExitStack()
    try:
        if args.page:  # the app as ./run.sh serves it, with its own supervisor, and one Annotate page
            (work / "data").mkdir(parents=True, exist_ok=True)
            os.environ["NEUROSEG_STARTER_DIR"] = str(start_folder(args.start, work))
            page = stack.enter_context(annotate_page(work / "data", args.zoom))
        svc, ds, run_id = open_live(args.start, volume_path, work, supervise=page is None)
        painted = {z: np.zeros(targets.shape[1:], bool) for z in order}
        masks = {z: np.full(targets.shape[1:], IGNORE, np.uint8) for z in order}
        actions, used = 0, {}

        def make(z: int, r: int):
            if args.annotator == "brush":
                return Brush(targets[z], args.radius)
            return Tools(targets[z], args.where, seed=args.seed * 1000 + r, radius=args.radius)

        rows, latencies = [], []
        began = time.monotonic()

        def fresh(z: int, since: float):
            """The live prediction of z made after ``since`` (wall clock)."""
            def get():
                p = svc.live_prediction(run_id, z, uncertainty=True)
                return p if p is not None and p.created.timestamp() >= since else None
            return get

        from ui.paint import View

        view = View.fit(targets.shape[1:], args.zoom)  # (the page's region at this zoom, centred)
        region = (view.y0, view.x0, view.h, view.w) if args.zoom > 1 else None
        outside = np.ones(targets.shape[1:], bool)
        outside[view.y0:view.y0 + view.h, view.x0:view.x0 + view.w] = False
        picker = None
        if args.annotator == "tools":
            picker = (Queue(svc, ds, order) if args.where == "queue"
                      else RandomOrder(order, targets.shape[1:], seed=args.seed))
            rounds = Round(svc, run_id, ds, order, picker, wait_until,
                           lambda z, mask: save_mask(svc, ds, z, mask), fresh)
        for r in range(args.rounds):
            if picker is not None:  # a few actions on each item, a save, then Next (the queue's or a random one)
                z, before, seen, last, saved, done = rounds.run(masks, lambda z, r=r: make(z, r), time.time(), args.k,
                                                          args.per_item)
                actions += done
                for tool, n in rounds.used.items():
                    used[tool] = used.get(tool, 0) + n
            else:
                z = order[r % len(order)]
                t_look = time.time()
                if page is not None:
                    page(ds, z)  # the page follows the annotator to the slice, with Live on
                svc.live_see(run_id, "annotator", z, region)
                seen = wait_until(f"a live prediction of slice {z}", fresh(z, t_look))
                before = masks[z]
            if args.annotator == "brush":  # K disks where the prediction is most wrong: K actions
                centres = wrong_regions(seen.probabilities, targets[z], painted[z] | outside, args.k, args.radius)
                paint(painted[z], centres, args.radius)
                masks[z] = np.where(painted[z], targets[z], IGNORE).astype(np.uint8)
                actions += len(centres)
                if args.paint_seconds > 0:
                    time.sleep(args.paint_seconds)  # the strokes take a person this long; the session trains on
                saved, last = save_mask(svc, ds, z, masks[z]), z
            t_save = time.monotonic()
            clicks = None
            if args.noc_cap:  # (while the session trains on the save)
                clicks = noc(lambda z=z, r=r: make(z, r), seen.probabilities, seen.uncertainty, targets[z], before,
                             args.noc_goal, args.noc_cap)
            wait_until("the live overlay to include the save", lambda z=last, mask=saved.id: (
                p := svc.live_prediction(run_id, z)) is not None and p.masks_seen >= mask)
            latencies.append(time.monotonic() - t_save)
            rest = args.seconds - (time.monotonic() - t_save)
            if rest > 0:
                time.sleep(rest)  # the annotator looks and thinks; the session trains
            if args.steps_per_round:  # equal training for every annotator: the round ends at a step count
                goal = (r + 1) * args.steps_per_round
                wait_until(f"the session to reach step {goal}",
                           lambda goal=goal: svc.snapshot(run_id).progress.step >= goal, timeout=1800)
            t_score = time.time()
            for h in held:
                svc.live_see(run_id, f"scorer-{h}", h)
            probs = [wait_until(f"a live prediction of held-out slice {h}", fresh(h, t_score)).probabilities
                     for h in held]
            for h in held:
                svc.live_leave(run_id, f"scorer-{h}")
            metrics = score(probs, [targets[h] for h in held])
            step = svc.snapshot(run_id).progress.step
            rows.append({"round": r + 1, "slice": z, "actions": actions, "tools": dict(used), "noc": clicks,
                         "painted": int(sum(np.count_nonzero(m != IGNORE) for m in masks.values())),
                         "seconds": time.monotonic() - began, "save_to_overlay_s": latencies[-1], "step": step,
                         **metrics})
            print(f"unet  round {r + 1:2d} ({actions} actions, NoC {clicks}): {metrics} · overlay "
                  f"{latencies[-1]:.1f} s after the save", flush=True)
        svc.live_stop(run_id)
        wait_until("the session to end", lambda: not svc.run(run_id).active, timeout=120)
        return {"rounds": rows, "save_to_overlay_s": {"median": statistics.median(latencies), "max": max(latencies),
                                                       "all": latencies}}
    except BaseException:
        kept = Path(tempfile.mkdtemp(prefix="neuroseg-loop-logs-"))
        for log in work.rglob("*.log"):  # the live worker's and the server's: what went wrong
            shutil.copy(log, kept / f"{log.parent.name}-{log.name}")
        print(f"the logs are kept in {kept}", file=sys.stderr, flush=True)
        raise
    finally:
        if svc is not None:
            svc.close()
        stack.close()
        shutil.rmtree(work, ignore_errors=True)


# --- the random forest ------------------------------------------------------------------------------
def forest_loop(args, volume: np.ndarray, targets: np.ndarray, order: list[int], held: list[int]) -> dict:
    from sklearn.ensemble import RandomForestClassifier

    from bench.quality import rf_features

    painted = {z: np.zeros(targets.shape[1:], bool) for z in order}
    xs: dict[int, np.ndarray] = {}
    ys: dict[int, np.ndarray] = {}
    forest = None
    rows = []
    began = time.monotonic()

    def predict(z: int) -> np.ndarray:
        if forest is None:
            return np.full(volume.shape[1:], 0.5, np.float32)
        f = rf_features(volume[z])
        return forest.predict_proba(f.reshape(-1, f.shape[-1]))[:, list(forest.classes_).index(1)] \
            .reshape(volume.shape[1:]).astype(np.float32) if 1 in forest.classes_ else \
            np.zeros(volume.shape[1:], np.float32)

    for r in range(args.rounds):
        z = order[r % len(order)]
        centres = wrong_regions(predict(z), targets[z], painted[z], args.k, args.radius)
        paint(painted[z], centres, args.radius)
        f = rf_features(volume[z])
        xs[z], ys[z] = f[painted[z]], targets[z][painted[z]]
        forest = RandomForestClassifier(n_estimators=100, n_jobs=-1, min_samples_leaf=2, random_state=0)
        forest.fit(np.concatenate(list(xs.values())), np.concatenate(list(ys.values())))
        metrics = score([predict(h) for h in held], [targets[h] for h in held])
        rows.append({"round": r + 1, "slice": z, "painted": int(sum(p.sum() for p in painted.values())),
                     "seconds": time.monotonic() - began, **metrics})
        print(f"forest round {r + 1:2d}: {metrics}", flush=True)
    return {"rounds": rows}


def main(argv: list[str] | None = None) -> int:
    from unet.exchange.io import parse_slices

    ap = argparse.ArgumentParser(prog="python -m bench.loop", description=__doc__.split("\n\n")[0])
    ap.add_argument("--volume", help="the stack (default: the ISBI 2012 training volume)")
    ap.add_argument("--labels", help="its full labels (default: the ISBI 2012 training labels)")
    ap.add_argument("--annotate", default="0-24", help="the slices the annotator works on")
    ap.add_argument("--held-out", default="25-29", help="the slices scored after each round")
    ap.add_argument("--start", default="random", help="random, starter, or a checkpoint file")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--k", type=int, default=10, help="disks painted per round")
    ap.add_argument("--radius", type=int, default=8, help="the disks' radius in pixels")
    ap.add_argument("--seconds", type=float, default=30.0, help="training time per round (from the save)")
    ap.add_argument("--steps-per-round", type=int, default=0, help="also train until the session has made this "
                    "many steps a round (round r scores at step r × N at least), so annotators that work at "
                    "different speeds are compared at equal training (0: time only)")
    ap.add_argument("--seed", type=int, default=0, help="the order in which slices are annotated")
    ap.add_argument("--skip-forest", action="store_true")
    ap.add_argument("--paint-seconds", type=float, default=0.0, help="the annotator's time from seeing the "
                    "slice's prediction to saving the strokes (a person painting K disks takes several seconds)")
    ap.add_argument("--page", action="store_true", help="keep one Annotate page open in Chromium (the app served "
                    "as ./run.sh serves it), following the annotator's slice with Live on")
    ap.add_argument("--annotator", default="brush", choices=("brush", "tools"), help="disks of true labels "
                    "(brush), or Annotate's object tools (tools); --k is the actions per round either way")
    ap.add_argument("--where", default="queue", choices=("queue", "random"), help="the tools' annotator works "
                    "where the queue says (the live prediction's uncertainty and fragments) or at random")
    ap.add_argument("--per-item", type=int, default=3, help="the tools' annotator: the most actions on one "
                    "item (a region of a slice) before it saves and takes the next")
    ap.add_argument("--noc-goal", type=float, default=0.95, help="NoC: actions until the slice's own Rand-F "
                    "(its prediction with the edit laid over it) reaches this")
    ap.add_argument("--noc-cap", type=int, default=30, help="the most actions NoC counts (0: no NoC)")
    ap.add_argument("--zoom", type=int, default=1, choices=(1, 2, 4, 8), help="look at and paint only the "
                    "middle 1/N of each slice, as Annotate's zoom shows it (the live session predicts it first)")
    ap.add_argument("--json", default=str(ROOT / "bench" / "results" / "loop.json"))
    args = ap.parse_args(argv)
    found = labelled_stack(args.volume, args.labels)
    if found is None:
        return 2
    volume_path, volume, targets = found
    order = parse_slices(args.annotate, volume.shape[0])
    np.random.default_rng(args.seed).shuffle(order)
    held = parse_slices(args.held_out, volume.shape[0])
    if set(order) & set(held):
        print("--annotate and --held-out overlap", file=sys.stderr)
        return 2
    if args.annotator == "tools" and args.zoom > 1:
        print("--annotator tools works on whole slices (--zoom 1)", file=sys.stderr)
        return 2
    result = {"volume": str(volume_path), "shape": list(volume.shape), "start": args.start, "k": args.k,
              "annotator": args.annotator, "where": args.where if args.annotator == "tools" else None,
              "per_item": args.per_item if args.annotator == "tools" else None,
              "noc_goal": args.noc_goal, "noc_cap": args.noc_cap,
              "page": args.page, "paint_seconds": args.paint_seconds, "zoom": args.zoom,
              "radius": args.radius, "seconds_per_round": args.seconds,
              "steps_per_round": args.steps_per_round, "held_out": held,
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"}
    result["unet"] = unet_loop(args, volume_path, targets, order, held)
    if not args.skip_forest:
        result["forest"] = forest_loop(args, volume, targets, order, held)
    columns = [("round", "round", "d"), ("painted", "painted px", "d"), ("seconds", "s", ".0f"),
               ("pixel_error", "pixel error", ".4f"), ("rand_f", "Rand-F", ".4f"), ("vi", "VI", ".3f")]
    print("\nU-Net, live session from", args.start)
    print(table(result["unet"]["rounds"], [columns[0], ("actions", "actions", "d"), *columns[1:],
                                           ("noc", f"NoC@{args.noc_goal:g}", ""), ("step", "steps", "d"),
                                           ("save_to_overlay_s", "save→overlay s", ".1f")]))
    if "forest" in result:
        print("\nrandom forest, retrained each round")
        print(table(result["forest"]["rounds"], columns))
    lat = result["unet"]["save_to_overlay_s"]
    print(f"\nsave → live overlay that includes it: median {lat['median']:.1f} s, max {lat['max']:.1f} s")
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
