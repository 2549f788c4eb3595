"""Segmentation quality on ISBI 2012: our U-Net against an ilastik-style random forest.

    python -m bench.quality --budget-min 10 [--preset cpu-quick] [--json out.json] [--data DIR]

Both learn from slices 0–24 of ``train-volume.tif`` with the same wall-clock budget and are evaluated on
slices 25–29 through the same post-processing (threshold 0.5 for the pixel error, the app's default way to
neurons, :data:`unet.prediction.postprocess.DEFAULT_METHOD`, for Rand-F, VI and CREMI's scores; V_rand and V_info of
the maps at their best threshold). Then each post-processing is tuned on slices 20–24 and scored on 25–29,
on the same maps (``--tta``: also on the maps through the 8 flips/rotations). The U-Net is evaluated with
its *last* weights (not the checkpoint that scored best on 25–29, which would peek at the test slices);
its validation curve on 25–29 is recorded against wall-clock time so minutes-to-quality are visible.

Data: Cardona et al. 2010, PLoS Biol 8(10):e1000502; Arganda-Carreras et al. 2015, Front. Neuroanat.
9:142. Not shipped: read from ../shared/data/isbi2012/ or --data or $NEUROSEG_ISBI_DIR.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time

import numpy as np

from bench.common import isbi_dir, table, write_json
from unet.exchange.io import read_labels, read_stack
from unet.network.config import preset
from unet.prediction.infer import predict_stack
from unet.prediction.metrics import evaluate_slice, mean_metrics
from unet.training.data import TrainData
from unet.training.labels import labels_to_target
from unet.training.reporting import NullReporter
from unet.training.train import train

TRAIN = list(range(0, 25))
TUNE = list(range(20, 25))  # post-processing parameters are chosen on these (training slices) …
TEST = list(range(25, 30))  # … and scored on these


class _Progress(NullReporter):
    def __init__(self) -> None:
        self.last = 0.0

    def on_step(self, step: int, loss: float, lr: float, seconds: float) -> None:
        if seconds - self.last > 30:
            self.last = seconds
            print(f"  unet step {step:5d}  loss {loss:.4f}  lr {lr:.2e}  {seconds:6.0f} s", flush=True)

    def on_validation(self, step: int, metrics: dict[str, float], seconds: float) -> None:
        print(f"  unet validation @ {step} ({seconds:.0f} s): pixel error {metrics['val_pixel_error']:.4f}"
              f"  rand_f {metrics.get('val_rand_f', float('nan')):.4f}  vi {metrics.get('val_vi', float('nan')):.3f}",
              flush=True)


def evaluate(probs: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    rows = [evaluate_slice(p, t) for p, t in zip(probs, targets, strict=True)]
    m = mean_metrics(rows)
    return {k: m[k] for k in ("pixel_error", "rand_f", "vi", "dice", "v_rand", "v_info", "vi_split", "vi_merge", "are")}


#: The parameters each post-processing is tried with on slices 20-24 (smoothing and minimum size as given
#: by the defaults of unet.prediction.postprocess unless listed).
GRID = {
    "watershed": [{"threshold": t, "h": h} for t in (0.3, 0.4, 0.5, 0.6, 0.7)
                  for h in (1.0, 2.0, 4.0, 8.0, 12.0, 16.0)],
    "threshold": [{"threshold": t, "smooth": s} for t in (0.5, 0.6, 0.7, 0.8, 0.9, 0.95) for s in (0.0, 1.0, 2.0, 3.0)],
    "agglomerate": [{"threshold": t, "h": h, "smooth": s} for t in (0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5)
                    for h in (0.005, 0.01, 0.02, 0.05) for s in (0.5, 1.0, 1.5, 2.0, 3.0, 4.0)],
}


def score_instances(probs: np.ndarray, targets: np.ndarray, method: str, params: dict) -> dict[str, float]:
    """Mean scores of one post-processing over slices: ISBI's V_rand and V_info of its instances (thinned,
    foreground-restricted), CREMI's VI split, merge and adapted Rand error, and VI (split + merge)."""
    from unet.prediction.metrics import cremi_scores, isbi_scores_of
    from unet.prediction.postprocess import instances, segment
    from unet.training.labels import target_to_instances

    rows = []
    for prob, target in zip(probs, targets, strict=True):
        # "today": the seeded watershed with the defaults it had before the comparison
        seg = instances(prob) if method == "today" else segment(prob, method, **params)
        row = {**isbi_scores_of(seg, target), **cremi_scores(seg, target_to_instances(target))}
        row["vi"] = row["vi_split"] + row["vi_merge"]
        rows.append(row)
    return mean_metrics(rows)


def compare_postprocessing(probs: np.ndarray, targets: np.ndarray, methods: list[str] | None = None,
                           workers: int = 1) -> list[dict]:
    """Every post-processing's best parameters on the first five slices (20-24, by V_rand, then V_info) and
    its scores with them on the last five (25-29); today's seeded watershed with its default parameters
    beside them. ``methods``: only these; ``workers``: parameter sets tried in that many processes."""
    from concurrent.futures import ProcessPoolExecutor  # (only the comparison runs processes)

    tune_p, tune_t, test_p, test_t = probs[:5], targets[:5], probs[5:], targets[5:]
    rows = [{"post-processing": "watershed (before: its defaults)", "params": {},
             **score_instances(test_p, test_t, "today", {})}]
    for method, grid in GRID.items():
        if methods and method not in methods:
            continue
        started = time.perf_counter()
        if workers > 1:
            with ProcessPoolExecutor(workers) as pool:
                scores = list(pool.map(score_instances, *zip(*[(tune_p, tune_t, method, p) for p in grid],
                                                              strict=True)))
            tried = list(zip(scores, grid, strict=True))
        else:
            tried = [(score_instances(tune_p, tune_t, method, params), params) for params in grid]
        best_scores, best = max(tried, key=lambda sp: (sp[0]["v_rand"], sp[0]["v_info"]))
        print(f"  {method}: {len(grid)} parameter sets on 20-24 in {time.perf_counter() - started:.0f} s; best {best} "
              f"(V_rand {best_scores['v_rand']:.4f})", flush=True)
        rows.append({"post-processing": method, "params": best, "tune_v_rand": best_scores["v_rand"],
                     **score_instances(test_p, test_t, method, best)})
    return rows


def run_unet(volume, targets, budget_s: float, preset_name: str, steps: int | None, seed: int, tta: bool = False,
             save_model: str | None = None) -> dict:
    overrides = {"max_seconds": budget_s, "seed": seed}
    if steps:
        overrides["steps"] = steps
    else:
        overrides["steps"] = 10**6  # the budget decides
    config = preset(preset_name, **overrides)
    data = TrainData.from_stack(volume, targets, TRAIN, TEST, encoded=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        result = train(config, data, _Progress(), out_dir=tmp)
        from unet.exchange.checkpoint import load_checkpoint

        model = load_checkpoint(f"{tmp}/latest.pt").build_model(result.device)
        if save_model:  # the weights and their config side file
            from unet.exchange.checkpoint import side_file

            shutil.copyfile(f"{tmp}/latest.pt", save_model)
            shutil.copyfile(side_file(f"{tmp}/latest.pt"), side_file(save_model))
    train_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    probs = predict_stack(model, volume[TEST])
    infer_s = time.perf_counter() - t1
    tune = predict_stack(model, volume[TUNE])
    out = evaluate(probs, targets[TEST])
    curve = [{"seconds": v["seconds"], "step": v["step"], "pixel_error": v.get("val_pixel_error"),
              "rand_f": v.get("val_rand_f"), "vi": v.get("val_vi")} for v in result.validations]
    found = {**out, "seconds": train_s, "train_seconds": train_s, "infer_seconds": infer_s,
             "steps": result.steps_done, "preset": preset_name, "device": result.device, "curve": curve,
             "_probs": np.concatenate([tune, probs])}
    if tta:  # the same weights through the 8 flips/rotations (Predict's "test-time augmentation")
        t1 = time.perf_counter()
        probs_tta = predict_stack(model, volume[TEST], tta=True)
        found["tta"] = {**evaluate(probs_tta, targets[TEST]), "infer_seconds": time.perf_counter() - t1}
        found["_probs_tta"] = np.concatenate([predict_stack(model, volume[TUNE], tta=True), probs_tta])
    return found


def rf_features(image: np.ndarray) -> np.ndarray:
    """The forest's features (:func:`unet.training.forest.pixel_features`: the live loop's teacher uses the same)."""
    from unet.training.forest import pixel_features

    return pixel_features(image, workers=2)


def run_random_forest(volume, targets, budget_s: float, seed: int, max_trees: int = 100) -> dict:
    """ilastik's pixel classifier in miniature: scikit-image multiscale features (intensity, edges,
    texture over 6 scales) and a random forest, grown 10 trees at a time until the budget or
    ``max_trees`` is reached."""
    from sklearn.ensemble import RandomForestClassifier

    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    xs, ys = [], []
    per_slice = 12000
    for z in TRAIN:
        f = rf_features(volume[z])
        # pixels drawn uniformly, so the forest learns the true class prior (a 50/50 sample made it
        # call membrane far too often: pixel error 0.135 instead of 0.10)
        pick = rng.choice(f.shape[0] * f.shape[1], size=per_slice, replace=False)
        xs.append(f.reshape(-1, f.shape[-1])[pick])
        ys.append(targets[z].ravel()[pick])
    x, y = np.concatenate(xs), np.concatenate(ys)
    forest = RandomForestClassifier(n_estimators=0, warm_start=True, n_jobs=-1, min_samples_leaf=2,
                                    random_state=seed)
    while forest.n_estimators < max_trees:
        started = time.perf_counter()
        forest.n_estimators += 10
        forest.fit(x, y)
        chunk = time.perf_counter() - started
        if time.perf_counter() - t0 + chunk > budget_s:
            break
    train_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    probs = []
    for z in TEST:
        f = rf_features(volume[z])
        probs.append(forest.predict_proba(f.reshape(-1, f.shape[-1]))[:, 1].reshape(volume.shape[1:]))
    infer_s = time.perf_counter() - t1
    tune = []
    for z in TUNE:
        f = rf_features(volume[z])
        tune.append(forest.predict_proba(f.reshape(-1, f.shape[-1]))[:, 1].reshape(volume.shape[1:]))
    out = evaluate(np.stack(probs).astype(np.float32), targets[TEST])
    return {**out, "seconds": train_s, "train_seconds": train_s, "infer_seconds": infer_s,
            "trees": forest.n_estimators, "training_pixels": len(y),
            "_probs": np.stack(tune + probs).astype(np.float32)}


def linking(probs: np.ndarray, targets: np.ndarray, all_targets: np.ndarray) -> dict:
    """3D neurons: slices 25-29 segmented by the default post-processing and linked into one volume,
    scored (3D VI split and merge, adapted Rand error) against their labels' neurons linked the same way;
    and the time to link the labels' instances of all 30 slices (512² each)."""
    from unet.prediction.link import link_volume
    from unet.prediction.metrics import cremi_scores
    from unet.prediction.postprocess import DEFAULT_METHOD, segment
    from unet.training.labels import target_to_instances

    truth = np.stack([target_to_instances(t) for t in all_targets])
    started = time.perf_counter()
    linked_truth = link_volume(truth)
    seconds = time.perf_counter() - started
    test_truth = link_volume(truth[TEST])
    neurons = link_volume(np.stack([segment(p, DEFAULT_METHOD) for p in probs[5:]]))
    scores = cremi_scores(neurons.ravel(), test_truth.ravel())
    result = {"post-processing": DEFAULT_METHOD, "link_30_slices_s": seconds,
              "neurons_30_slices": int(linked_truth.max()), "neurons_25_29": int(neurons.max()),
              "label_neurons_25_29": int(test_truth.max()), **scores}
    print(f"\n3D neurons of slices 25-29 ({DEFAULT_METHOD}): {result['neurons_25_29']} (labels: "
          f"{result['label_neurons_25_29']}); 3D VI split {scores['vi_split']:.3f}, merge {scores['vi_merge']:.3f}, "
          f"adapted Rand error {scores['are']:.4f}; linking the labels of all 30 slices took {seconds:.2f} s")
    return result


def postprocessing_table(probs: dict[str, np.ndarray], targets: np.ndarray, preset_name: str,
                         methods: list[str] | None = None, workers: int = 1) -> dict:
    """Compare the post-processings on each method's probabilities of slices 20-29; print a table."""
    results, rows = {}, []
    for key, name in (("unet", f"U-Net {preset_name}"), ("unet_tta", f"U-Net {preset_name} + TTA"),
                      ("random_forest", "random forest")):
        if key in probs:
            print(f"\npost-processing of the {name}'s probabilities …", flush=True)
            results[key] = compare_postprocessing(probs[key], targets[TUNE + TEST], methods, workers)
            rows += [{"method": name, **row} for row in results[key]]
    if "unet" in probs:
        results["linking"] = linking(probs["unet"], targets[TUNE + TEST], targets)
    print("\nPost-processing, parameters chosen on slices 20-24, scores on 25-29 (instances):")
    print(table(rows, [("method", "method", ""), ("post-processing", "post-processing", ""),
                       ("v_rand", "V_rand ↑", ".4f"), ("v_info", "V_info ↑", ".4f"), ("are", "ARE ↓", ".4f"),
                       ("vi", "VI ↓", ".3f"), ("vi_split", "VI split ↓", ".3f"), ("vi_merge", "VI merge ↓", ".3f")]))
    return results


def definitions(probs: np.ndarray, targets: np.ndarray) -> list[dict]:
    """How the scores' definitions changed in stop 43, on the same maps of slices 25–29 (``--definitions``):
    V_rand and V_info of the maps before (the ground truth thinned too, each slice's own best threshold)
    and now (the challenge's); Rand-F and VI against the labels with a 12-px unlabelled band down each slice
    (before, it cut the neurons it crosses in two); Rand-F of no neuron against one labelled neuron."""
    from scipy import ndimage as ndi

    from unet.prediction.metrics import THRESHOLDS, evaluate_slice, rand_f, thin_borders, v_rand_info, vi
    from unet.prediction.postprocess import segment
    from unet.training.labels import IGNORE, MEMBRANE, NEURON, target_to_instances

    def before(prob: np.ndarray, target: np.ndarray) -> list[float]:  # (the earlier definition, kept here only)
        gt = thin_borders(target_to_instances(target))
        gt[target == IGNORE] = 0
        scores = [v_rand_info(thin_borders(ndi.label(prob > t)[0]), gt) for t in THRESHOLDS]
        return [max(v[0] for v in scores), max(v[1] for v in scores)]

    old = np.mean([before(p, t) for p, t in zip(probs, targets, strict=True)], axis=0)
    now = mean_metrics([evaluate_slice(p, t) for p, t in zip(probs, targets, strict=True)])
    banded = targets.copy()
    banded[:, :, 250:262] = IGNORE
    segs = [segment(p) for p in probs]
    cut = {"rand_f": np.mean([rand_f(s, target_to_instances(t)) for s, t in zip(segs, banded, strict=True)]),
           "vi": np.mean([vi(s, target_to_instances(t)) for s, t in zip(segs, banded, strict=True)])}
    left_out = mean_metrics([evaluate_slice(p, t, seg=s) for p, t, s in zip(probs, banded, segs, strict=True)])
    whole = mean_metrics([evaluate_slice(p, t, seg=s) for p, t, s in zip(probs, targets, segs, strict=True)])
    one = np.full(targets[0].shape, IGNORE, np.uint8)
    one[100:140, 100:140] = MEMBRANE
    one[102:138, 102:138] = NEURON
    empty = np.zeros(one.shape, np.float32)
    return [{"score": "v_rand of the map", "before": float(old[0]), "after": now["v_rand"]},
            {"score": "v_info of the map", "before": float(old[1]), "after": now["v_info"]},
            *({"score": f"{k}, a 12-px unlabelled band (without: {whole[k]:.4f})", "before": float(cut[k]),
               "after": left_out[k]} for k in ("rand_f", "vi")),
            {"score": "rand_f of no neuron, one neuron labelled", "before": rand_f(segment(empty), target_to_instances(
                one)), "after": evaluate_slice(empty, one).get("rand_f", float("nan"))}]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__.split("\n")[0])
    ap.add_argument("--budget-min", type=float, default=10.0, help="wall-clock training budget per method")
    ap.add_argument("--preset", default="cpu-quick")
    ap.add_argument("--steps", type=int, default=None, help="cap the U-Net's steps (default: the budget decides)")
    ap.add_argument("--data", default=None, help="folder with train-volume.tif and train-labels.tif")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", nargs="*", choices=sorted(GRID), help="tune only these post-processings")
    ap.add_argument("--workers", type=int, default=1, help="processes trying the parameter sets")
    ap.add_argument("--only", choices=["unet", "rf"], help="run one method only")
    ap.add_argument("--tta", action="store_true", help="also score the U-Net's maps predicted through the 8 "
                    "flips/rotations (test-time augmentation, Predict's option), the mean of the eight")
    ap.add_argument("--save-model", default=None, help="keep the U-Net's last weights here (.pt)")
    ap.add_argument("--save-probs", default=None, help="keep each method's probabilities of slices 20-29 (.npz)")
    ap.add_argument("--probs", default=None, help="compare post-processings on probabilities saved before "
                    "(--save-probs) instead of training")
    ap.add_argument("--definitions", action="store_true", help="with --probs: the scores before and after their "
                    "definitions changed (stop 43) on the U-Net's maps, instead of the post-processings")
    args = ap.parse_args(argv)

    folder = isbi_dir(args.data)
    if not (folder / "train-volume.tif").is_file() or not (folder / "train-labels.tif").is_file():
        print(f"ISBI 2012 data not found in {folder} (train-volume.tif, train-labels.tif); "
              "pass --data or set NEUROSEG_ISBI_DIR", file=sys.stderr)
        return 2
    volume = read_stack(folder / "train-volume.tif")
    targets = labels_to_target(read_labels(folder / "train-labels.tif", volume.shape))
    budget_s = args.budget_min * 60
    print(f"ISBI 2012 from {folder}: train slices 0-24, evaluate 25-29, budget {args.budget_min:g} min each")

    results: dict = {"split": {"train": "0-24", "test": "25-29", "data": str(folder),
                               "budget_min": args.budget_min}}
    if args.probs and args.definitions:
        rows = definitions(np.load(args.probs)["unet"][5:].astype(np.float32), targets[TEST])  # (20-29 saved)
        print(table(rows, [("score", "score", ""), ("before", "before", ".4f"), ("after", "after", ".4f")]))
        write_json(args.json, {**results, "definitions": rows})
        return 0
    if args.probs:
        saved = np.load(args.probs)
        results["postprocessing"] = postprocessing_table({k: saved[k] for k in saved.files}, targets, args.preset)
        write_json(args.json, results)
        return 0
    if args.only != "unet":
        print("random forest …", flush=True)
        results["random_forest"] = run_random_forest(volume, targets, budget_s, args.seed)
    if args.only != "rf":
        print(f"U-Net ({args.preset}) …", flush=True)
        results["unet"] = run_unet(volume, targets, budget_s, args.preset, args.steps, args.seed,
                                   tta=args.tta, save_model=args.save_model)

    probs = {key: results[key].pop("_probs") for key in ("unet", "random_forest") if key in results}
    if "_probs_tta" in results.get("unet", {}):
        probs["unet_tta"] = results["unet"].pop("_probs_tta")
    if args.save_probs:
        np.savez_compressed(args.save_probs, **probs)
    rows = [{"method": name, **results[key]} for key, name in
            (("unet", f"U-Net {args.preset}"), ("random_forest", "random forest")) if key in results]
    if "tta" in results.get("unet", {}):
        rows.insert(1, {"method": f"U-Net {args.preset} + TTA", **results["unet"]["tta"]})
    print()
    print(table(rows, [("method", "method", ""), ("pixel_error", "pixel error ↓", ".4f"),
                       ("rand_f", "Rand-F ↑", ".4f"), ("vi", "VI ↓", ".3f"), ("dice", "Dice ↑", ".4f"),
                       ("v_rand", "V_rand ↑", ".4f"), ("v_info", "V_info ↑", ".4f"), ("vi_split", "VI split ↓", ".3f"),
                       ("vi_merge", "VI merge ↓", ".3f"), ("are", "ARE ↓", ".4f"),
                       ("train_seconds", "train s", ".0f"), ("infer_seconds", "infer s (5 slices)", ".1f")]))
    if results.get("unet", {}).get("curve"):
        print("\nU-Net validation curve on slices 25-29 (wall clock):")
        print(table(results["unet"]["curve"], [("seconds", "s", ".0f"), ("step", "step", "d"),
                                              ("pixel_error", "pixel error", ".4f"),
                                              ("rand_f", "Rand-F", ".4f"), ("vi", "VI", ".3f")]))
    results["postprocessing"] = postprocessing_table(probs, targets, args.preset, args.methods, args.workers)
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
