"""What the lab server and the travelling models cost (issues 14 and 15), measured here and printed as a
table (``--json`` writes it):

- a sign-in: the argon2id verification of a password (the ``argon2-cffi`` defaults), and a wrong one;
- a BioImage.IO export of the starter model: describing and writing the package, the ``bioimageio.spec``
  validation, the ``bioimageio.core`` model test; the package's size;
- its import into a store: the zip checks, the validation and the package's own test, the copy.

    python -m bench.models --json bench/results/models-cpu.json
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import ROOT, table, write_json


def _timed(fn, repeat: int = 3) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)

    from storage.auth.passwords import HASHER, verify_password
    from unet.exchange.bioimageio import ISBI_CITE, UNET_CITE, ExportInfo, export_package, validate
    from unet.exchange.checkpoint import load_checkpoint
    from unet.training.synthetic import make_synthetic_em

    rows = []
    stored = HASHER.hash("a lab member's password")
    seconds, _ = _timed(lambda: verify_password(stored, "a lab member's password"), args.repeat)
    rows.append({"step": "sign-in: argon2id verify (right password)", "seconds": seconds})
    seconds, _ = _timed(lambda: verify_password(stored, "a wrong password"), args.repeat)
    rows.append({"step": "sign-in: argon2id verify (wrong password)", "seconds": seconds})

    starter = load_checkpoint(ROOT / "models" / "starter" / "membrane-w8.pt")
    image = make_synthetic_em((1, 512, 512), np.random.default_rng(0), cell_size=24)[0][0]
    info = ExportInfo("Neuroseg starter model", "A U-Net for EM membranes.", cite=[UNET_CITE, ISBI_CITE])
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "starter.zip"
        seconds, _ = _timed(lambda: export_package(starter, image, info, out, run_test=False), args.repeat)
        rows.append({"step": "export: describe, write, validate (spec)", "seconds": seconds})
        seconds, _ = _timed(lambda: export_package(starter, image, info, out), args.repeat)
        rows.append({"step": "export: … and the core's model test", "seconds": seconds,
                     "mb": out.stat().st_size / 1e6})
        seconds, _ = _timed(lambda: validate(out), args.repeat)
        rows.append({"step": "validate + test a written package", "seconds": seconds})

        from storage.service import Neuroseg
        from storage.settings import Settings

        svc = Neuroseg(Settings.from_env(Path(tmp) / "data"), supervise=False)

        def one_import():
            with open(out, "rb") as fh:
                return svc.import_model(fh, out.name)

        seconds, _ = _timed(one_import, args.repeat)
        rows.append({"step": "import: zip checks, validation, its own test, copy", "seconds": seconds})
        svc.close()

    machine = f"{platform.node()} · {platform.processor() or platform.machine()} · {__import__('os').cpu_count()} CPUs"
    print(f"machine: {machine}")
    print(table(rows, [("step", "step", "s"), ("seconds", "median s", ".3f"), ("mb", "package MB", ".1f")]))
    write_json(args.json, {"machine": machine, "repeat": args.repeat, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
