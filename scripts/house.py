"""How the house stands: modules and lines per room (folder), the largest modules, imports inside functions,
and the string literals that stand for statuses and kinds. For the before/after table of a reorganisation.

    python scripts/house.py [--json FILE]

It reads the source as text (``ast``), runs nothing of the project, and counts the app's code only (not
tests, benchmarks, migrations or scripts).
"""

from __future__ import annotations

import argparse
import ast
import json
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("app.py", "pages", "ui", "domain", "storage", "unet", "web")
#: Values that name a status or a kind and should come from the shared types, not be written out.
LITERALS = ("QUEUED", "RUNNING", "FINISHED", "FAILED", "CANCELLED", "starter", "live", "uploaded", "painted",
            "predicted", "scribble", "predicted→painted")


def modules() -> list[Path]:
    found = []
    for name in PACKAGES:
        path = ROOT / name
        found += [path] if path.is_file() else sorted(p for p in path.rglob("*.py") if "migrations" not in p.parts)
    return found


def in_function_imports(tree: ast.AST, lines: list[str]) -> tuple[int, int]:
    """(imports inside functions, how many of them say why in a comment on their line)."""
    found = {n.lineno for node in ast.walk(tree) if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
             for n in ast.walk(node) if isinstance(n, ast.Import | ast.ImportFrom)}
    return len(found), sum("#" in lines[i - 1] for i in found)


def literal_counts(tree: ast.AST) -> Counter:
    """String constants equal to one of :data:`LITERALS` (docstrings are whole sentences: never equal)."""
    return Counter(n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and n.value in LITERALS)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python scripts/house.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args(argv)
    rooms: dict[str, list[int]] = {}
    sizes, inner, explained, literals = [], 0, 0, Counter()
    for path in modules():
        text = path.read_text(encoding="utf-8")
        lines = len(text.splitlines())
        tree = ast.parse(text)
        room = str(path.parent.relative_to(ROOT)) if path.parent != ROOT else "."
        rooms.setdefault(room, []).append(lines)
        sizes.append((lines, str(path.relative_to(ROOT))))
        count, reasons = in_function_imports(tree, text.splitlines())
        inner, explained = inner + count, explained + reasons
        if path.parent.name != "domain":  # (where the kinds are defined, once)
            literals += literal_counts(tree)
    print(f"{'room':<24} {'modules':>7} {'lines':>7}")
    for room, counts in sorted(rooms.items()):
        print(f"{room:<24} {len(counts):>7} {sum(counts):>7}")
    print("\nlargest modules:")
    for lines, name in sorted(sizes, reverse=True)[:10]:
        print(f"  {lines:>5}  {name}")
    print(f"\nimports inside functions: {inner} ({explained} of them say why)")
    print("status and kind literals: " + ", ".join(f"{k!r} × {v}" for k, v in literals.most_common()))
    if args.json:
        Path(args.json).write_text(json.dumps({
            "rooms": {r: {"modules": len(c), "lines": sum(c)} for r, c in rooms.items()},
            "largest": sorted(sizes, reverse=True)[:10], "in_function_imports": inner, "explained": explained,
            "literals": dict(literals)}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
