"""Shared helpers of the benchmark scripts."""

from __future__ import annotations

import json
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ISBI_ENV = "NEUROSEG_ISBI_DIR"


def isbi_dir(override: str | None = None) -> Path:
    """Where the ISBI 2012 stacks are: ``--data``, then ``$NEUROSEG_ISBI_DIR``, then ``../shared/data``."""
    return Path(override or os.environ.get(ISBI_ENV) or ROOT.parent / "shared" / "data" / "isbi2012")


def labelled_stack(volume: str | None, labels: str | None):
    """A stack and its full labels as training targets, ``(volume_path, volume, targets)``: the files given,
    else the ISBI 2012 training stack; None (after saying why on stderr) when either file is missing."""
    import sys

    from unet.exchange.io import read_labels, read_stack
    from unet.training.labels import labels_to_target

    volume_path = Path(volume or isbi_dir() / "train-volume.tif")
    labels_path = Path(labels or isbi_dir() / "train-labels.tif")
    if not volume_path.is_file() or not labels_path.is_file():
        print(f"no stack at {volume_path} / {labels_path}: pass --volume and --labels", file=sys.stderr)
        return None
    stack = read_stack(volume_path)
    return volume_path, stack, labels_to_target(read_labels(labels_path, stack.shape))


def table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """A plain-text table: ``columns`` are (key, header, format)."""
    cells = [[h for _, h, _ in columns]]
    for r in rows:
        cells.append([("-" if r.get(k) is None else format(r[k], f)) for k, _, f in columns])
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_json(path: str | None, payload: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2))
        print(f"wrote {path}")


def spread(z: int, n: int) -> list[int]:
    """``n`` slices spread evenly over a stack of ``z`` (all of them when ``n`` is 0 or at least ``z``)."""
    if not n or n >= z:
        return list(range(z))
    return [z // 2] if n == 1 else sorted({round(i * (z - 1) / (n - 1)) for i in range(n)})
