"""What the server costs per user: CPU seconds per page switch and resident memory per open session.

A real server (``streamlit run web/asgi.py``, or ``app.py`` in a checkout from before the guard, with the
checkout's own ``.streamlit/config.toml``, as ``./run.sh`` starts it) over a store holding a 20-slice
stack, a tiny run and its prediction of every slice; Debian's Chromium (Playwright) as the users. One
session walks the six pages round after round: the server's own CPU time (``/proc/<pid>/stat``, workers
excluded) per switch. Then more sessions open the prediction viewer one by one: the server's resident
memory after each, and after they close.

Run by hand: ``python -m bench.server [--root CHECKOUT] [--size 1024] [--sessions 4] [--json FILE]``.
``--root`` measures another checkout (an older commit in a worktree) with this script, for before/after.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from bench.common import ROOT, table, write_json
from tests.browser import CHROMIUM, CHROMIUM_FLAGS, app_server, signed_in  # the tests' server and browser

SETUP = """
import io, sys, numpy as np, tifffile
from storage.service import Neuroseg
from storage.settings import Settings
from unet.network.config import preset
from unet.training.synthetic import make_synthetic_em
import os, select
size = int(sys.argv[2])
try:
    svc = Neuroseg(Settings.from_env(sys.argv[1]), supervise=False)
except TypeError:  # a checkout from before the supervisor (--root for a before/after figure)
    svc = Neuroseg(Settings.from_env(sys.argv[1]), start_jobs=False)
volume, labels = make_synthetic_em((20, size, size), np.random.default_rng(0), cell_size=max(20, size // 25))
def tif(a, name):
    b = io.BytesIO(); tifffile.imwrite(b, a, imagej=True, metadata={"axes": "ZYX"}); b.seek(0); b.name = name; return b
d = svc.import_upload(tif(volume, "stack.tif"), tif(labels, "labels.tif"), name="20-slice stack")
def wait(pid):
    fd = os.pidfd_open(pid); select.select([fd], [], []); os.close(fd)
run = svc.submit_training([{"dataset_id": d.id, "slices": list(range(17))}], [{"dataset_id": d.id, "slices": [17]}],
                          preset("tiny"), preset="tiny")
wait(svc.run(run.id).pid)
field = lambda c, name: getattr(c, name) if hasattr(c, name) else c[name]  # records, or dicts before them
best = next(c for c in svc.checkpoints(run.id) if field(c, "kind") == "best")
job = svc.predict(field(best, "id"), d.id, list(range(20)))
wait(svc.prediction(job.id).pid)
print("prediction", svc.prediction(job.id).status)
"""
PAGES = [("Datasets", "Datasets"), ("Annotate", "Annotate"), ("Train", "Train"), ("Predict", "Predict"),
         ("Runs", "Runs"), ("Home", "Neuroseg")]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", text).group(1)) / 1024


def media_mb(url: str) -> float:
    try:
        with urllib.request.urlopen(f"{url}/_stcore/metrics", timeout=30) as r:
            text = r.read().decode()
    except urllib.error.HTTPError:  # (an admin's only since the guard: not measured then)
        return float("nan")
    return sum(float(m.group(1)) for m in re.finditer(
        r'cache_memory_bytes\{[^}]*cache_type="st_memory_media_file_storage"[^}]*\} ([\d.e+]+)', text)) / 2**20


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default=str(ROOT), help="the checkout whose app is served (default: this one)")
    ap.add_argument("--size", type=int, default=1024, help="slice edge of the 20-slice stack")
    ap.add_argument("--sessions", type=int, default=4, help="viewers of the prediction opened one by one")
    ap.add_argument("--rounds", type=int, default=3, help="rounds through the six pages")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args(argv)
    root = Path(args.root).resolve()
    from playwright.sync_api import expect, sync_playwright

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        print(f"preparing a store: 20 × {args.size}² stack, a tiny run, a prediction of 20 slices …", flush=True)
        subprocess.run([sys.executable, "-c", SETUP, str(data), str(args.size)], cwd=root, check=True,
                       env={**os.environ, "PYTHONPATH": str(root)})
        with app_server(data, root=root) as url, sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
            expect.set_options(timeout=120_000)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(120_000)
            # a commit with sign-in (its accounts module moved into storage/auth/ later): sign in first
            accounts = any((root / "storage" / where).exists() for where in ("accounts.py", "auth/accounts.py"))
            if accounts:
                signed_in(page, url)
            page.goto(url)
            page.get_by_role("heading", name="Neuroseg").wait_for()
            for link, heading in PAGES:  # one round to warm up (imports, caches)
                page.get_by_role("link", name=link).first.click()
                page.get_by_role("heading", name=heading, exact=True).wait_for()
            time.sleep(2)  # let the last rerun settle before counting
            cpu0, t0, switches, walls = cpu_seconds(url.pid), time.perf_counter(), 0, []
            for _ in range(args.rounds):
                for link, heading in PAGES:
                    start = time.perf_counter()
                    page.get_by_role("link", name=link).first.click()
                    page.get_by_role("heading", name=heading, exact=True).wait_for()
                    if heading == "Predict":
                        page.get_by_text("slice 0: mask").wait_for()
                    page.locator('[data-testid="stStatusWidget"]').wait_for(state="hidden")
                    walls.append(time.perf_counter() - start)
                    switches += 1
            time.sleep(2)
            cpu_per_switch = (cpu_seconds(url.pid) - cpu0) / switches
            elapsed = time.perf_counter() - t0
            page.get_by_role("link", name="Home").first.click()
            page.get_by_role("heading", name="Neuroseg").wait_for()
            time.sleep(2)
            memory = [{"sessions": 1, "rss_mb": rss_mb(url.pid), "media_mb": media_mb(url)}]
            viewers = []
            for n in range(2, args.sessions + 2):
                ctx = browser.new_context(viewport={"width": 1400, "height": 1000})
                viewer = ctx.new_page()
                viewer.set_default_timeout(120_000)
                if accounts:
                    signed_in(viewer, url)
                viewer.goto(f"{url}/predict")
                viewer.get_by_text("slice 0: mask").wait_for()
                viewer.get_by_role("button", name=re.compile("Probabilities")).wait_for()
                time.sleep(2)
                viewers.append(ctx)
                memory.append({"sessions": n, "rss_mb": rss_mb(url.pid), "media_mb": media_mb(url)})
            for ctx in viewers:
                ctx.close()
            time.sleep(10)
            after_close = rss_mb(url.pid)
            browser.close()
    per_session = (memory[-1]["rss_mb"] - memory[1]["rss_mb"]) / max(1, len(memory) - 2)
    print(table([{"switches": switches, "cpu": cpu_per_switch, "wall": sorted(walls)[len(walls) // 2],
                  "total": elapsed}],
                [("switches", "page switches", "d"), ("cpu", "server CPU s / switch", ".2f"),
                 ("wall", "median wall s / switch", ".2f"), ("total", "wall s", ".1f")]))
    print()
    print(table([*memory, {"sessions": "closed", "rss_mb": after_close}],
                [("sessions", "open sessions", ""), ("rss_mb", "server RSS (MB)", ".0f"),
                 ("media_mb", "media held (MB)", ".1f")]))
    print(f"\nRSS per extra prediction viewer: {per_session:.0f} MB")
    write_json(args.json, {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "root": str(root), "size": args.size, "switches": switches, "cpu_s_per_switch": cpu_per_switch,
        "median_wall_s_per_switch": sorted(walls)[len(walls) // 2], "memory": memory,
        "rss_mb_after_close": after_close, "rss_mb_per_viewer": per_session})


if __name__ == "__main__":
    main()
