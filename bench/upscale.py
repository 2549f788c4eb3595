"""A 1024² labelled stack of our own for ``bench.lab`` (issue 29's second figure): the ISBI 2012 training
stack magnified, the image bilinearly and the labels by nearest neighbour, so its neurons are ``--factor``
times the size the starter saw. Its files are written outside the repository (``--out``), never committed.

    python -m bench.upscale [--factor 2] [--slices 10] --out DIR     # DIR/volume.tif, DIR/labels.tif
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import tifffile
from scipy import ndimage as ndi

from bench.common import isbi_dir


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.upscale", description=__doc__.split("\n\n")[0])
    ap.add_argument("--factor", type=int, default=2)
    ap.add_argument("--slices", type=int, default=10, help="the first N slices of the stack")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    source = isbi_dir()
    if not (source / "train-volume.tif").is_file():
        print(f"no ISBI 2012 stack in {source}", file=sys.stderr)
        return 2
    volume = tifffile.imread(source / "train-volume.tif")[:args.slices]
    labels = tifffile.imread(source / "train-labels.tif")[:args.slices]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    big = np.stack([np.clip(ndi.zoom(s.astype(np.float32), args.factor, order=1), 0, 255).astype(np.uint8)
                    for s in volume])
    tifffile.imwrite(out / "volume.tif", big, photometric="minisblack")
    tifffile.imwrite(out / "labels.tif", np.stack([ndi.zoom(s, args.factor, order=0) for s in labels]),
                     photometric="minisblack")
    print(f"wrote {out / 'volume.tif'} and {out / 'labels.tif'}: {big.shape}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
