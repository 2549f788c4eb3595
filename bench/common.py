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
