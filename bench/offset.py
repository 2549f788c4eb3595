"""Where the labels sit against the image: the sub-pixel offset between a stack's membrane labels and the
membranes in its images, and, given a model, how much of its pixel error that offset explains.

    python -m bench.offset [--volume V.tif --labels L.tif] [--checkpoint C.pt] [--score 25-29] [--json FILE]

Per slice, the membrane mask is registered to the inverted, lightly smoothed image by phase correlation
(:func:`unet.training.labels.slice_label_offset`: scikit-image's ``phase_cross_correlation``, 1/20 px). A
consistent offset is an annotation convention, not tissue: a network trained with rotations and flips
cannot learn a fixed offset (it turns with the patch), so it predicts the membranes where the image has
them, and every border pixel of the offset counts as an error against the labels, unless it trained with
``keep_label_offset`` (the flips keep the offset, and it draws them where the labels do). With
``--checkpoint`` the model predicts the ``--score`` slices and the table gives its pixel error as
predicted, with the prediction moved by the measured offset, and the share of its wrong pixels that lie
within one pixel of a label border.

Default data: the ISBI 2012 training stack (Cardona et al. 2010; Arganda-Carreras et al. 2015), read from
../shared/data/isbi2012/ or $NEUROSEG_ISBI_DIR; any stack with full labels works.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import numpy as np

from bench.common import labelled_stack, table, write_json


def model_scores(checkpoint: Path, volume: np.ndarray, targets: np.ndarray, slices: list[int],
                 offset: tuple[float, float]) -> dict[str, float]:
    from scipy import ndimage

    from unet.exchange.checkpoint import load_checkpoint
    from unet.prediction.infer import predict_slice
    from unet.prediction.metrics import pixel_error
    from unet.training.labels import IGNORE, NEURON

    model = load_checkpoint(checkpoint).build_model("cpu")
    plain, moved, near = [], [], []
    for z in slices:
        prob = predict_slice(model, volume[z])
        target = targets[z]
        plain.append(pixel_error(prob > 0.5, target))
        moved.append(pixel_error(ndimage.shift(prob, offset, order=1, mode="nearest") > 0.5, target))
        neuron = target == NEURON
        near_border = ndimage.morphological_gradient(neuron.astype(np.uint8), size=3) > 0  # both classes in 3×3
        wrong = ((prob > 0.5) != neuron) & (target != IGNORE)
        within = near_border & wrong
        near.append(within.sum() / max(int(wrong.sum()), 1))
    return {"pixel_error": float(np.mean(plain)), "pixel_error_moved": float(np.mean(moved)),
            "wrong_within_1px_of_border": float(np.mean(near))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.offset", description=__doc__.split("\n\n")[0])
    ap.add_argument("--volume", help="the stack (default: the ISBI 2012 training volume)")
    ap.add_argument("--labels", help="its full labels (default: the ISBI 2012 training labels)")
    ap.add_argument("--checkpoint", help="also score this model's pixel error with and without the offset")
    ap.add_argument("--score", default="25-29", help="the slices the checkpoint is scored on")
    ap.add_argument("--json", default=None, help="write the figures here")
    args = ap.parse_args(argv)
    from unet.exchange.io import parse_slices
    from unet.training.labels import slice_label_offset

    found = labelled_stack(args.volume, args.labels)
    if found is None:
        return 2
    volume_path, volume, targets = found
    rows = [{"slice": z, **dict(zip(("dy", "dx"), slice_label_offset(volume[z], targets[z]), strict=True))}
            for z in range(volume.shape[0])]
    print(table(rows, [("slice", "slice", "d"), ("dy", "dy px", "+.2f"), ("dx", "dx px", "+.2f")]))
    dy, dx = (float(np.median([r[k] for r in rows])) for k in ("dy", "dx"))
    spread = [float(np.std([r[k] for r in rows])) for k in ("dy", "dx")]
    print(f"\nlabels against image: median offset dy {dy:+.2f} px, dx {dx:+.2f} px "
          f"(spread over slices {spread[0]:.2f}, {spread[1]:.2f})")
    payload = {"volume": str(volume_path), "shape": list(volume.shape), "median_offset": [dy, dx],
               "spread": spread, "slices": rows, "machine": f"{platform.machine()}"}
    if args.checkpoint:
        scored = parse_slices(args.score, volume.shape[0])
        scores = model_scores(Path(args.checkpoint), volume, targets, scored, (dy, dx))
        print(f"{args.checkpoint} on {args.score}: pixel error {scores['pixel_error']:.4f} as predicted, "
              f"{scores['pixel_error_moved']:.4f} moved by the offset; "
              f"{scores['wrong_within_1px_of_border']:.0%} of its wrong pixels within 1 px of a label border")
        payload["model"] = {"checkpoint": args.checkpoint, "slices": args.score, **scores}
    write_json(args.json, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
