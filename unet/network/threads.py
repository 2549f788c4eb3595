"""How many threads torch trains with on a CPU, chosen by measurement on the machine (issue 30).

Torch takes every core by default. A narrow network's layers are too small to share among many threads: on a
16-core server ``cpu-quick`` trained slower than on a 2-core VM. :func:`choose_threads` times a few training
steps of the run's own network, batch and patch at 1, 2, 4, … threads up to the cores, and keeps the fastest
(the fewest threads within 5% of it: the rest of the machine stays free for the server, the batches and other
runs). The choice is kept in a small JSON file per machine, network and batch, so it is measured once;
``$NEUROSEG_TRAIN_THREADS`` overrides it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import torch

from unet.network.config import TrainConfig
from unet.network.model import UNet

log = logging.getLogger(__name__)

WITHIN = 0.05  # a count within this share of the fastest is as good: the fewest such wins


def candidates(cores: int) -> list[int]:
    """1, 2, 4, … up to ``cores``, and ``cores`` itself."""
    out, n = [], 1
    while n < cores:
        out.append(n)
        n *= 2
    return [*out, cores]


def usable_cores() -> int:
    """The cores this process may run on: its affinity, narrowed by a container's CPU quota (``docker run
    --cpus 2`` on a 16-core host leaves the affinity at 16: :func:`quota_cpus`)."""
    try:
        cores = max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    quota = quota_cpus()
    return max(1, min(cores, quota)) if quota else cores


def available_memory() -> int:
    """The memory the machine can still give, in bytes (``MemAvailable``; 0: not known)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def omp_threads() -> int | None:
    """The threads per process an operator set with ``$OMP_NUM_THREADS`` (None: not set, or not a number)."""
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(value) if value.isdigit() and int(value) >= 1 else None


def quota_cpus(root: Path = Path("/sys/fs/cgroup"), own: Path = Path("/proc/self/cgroup")) -> int | None:
    """The CPUs that this process's cgroup quota allows, rounded up (None without a quota): cgroup v2's
    ``cpu.max`` of its group and the groups above it, or v1's ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``."""
    found: list[int] = []
    try:
        groups = own.read_text().splitlines()
    except OSError:
        groups = []
    v2 = next((line[3:] for line in groups if line.startswith("0::")), None)
    folder = root / v2.strip("/") if v2 is not None else None
    while folder is not None:  # v2: the group's own limit and its parents' (a slice may set it)
        try:
            quota, period = (folder / "cpu.max").read_text().split()[:2]
            if quota != "max" and int(period) > 0:
                found.append(-(-int(quota) // int(period)))
        except (OSError, ValueError):
            pass
        folder = folder.parent if folder != root and root in folder.parents else None
    for v1 in ("cpu", "cpu,cpuacct"):
        try:
            quota, period = (int((root / v1 / name).read_text()) for name in ("cpu.cfs_quota_us", "cpu.cfs_period_us"))
            if quota > 0 and period > 0:
                found.append(-(-quota // period))
        except (OSError, ValueError):
            pass
    return max(1, min(found)) if found else None


def default_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "neuroseg" / "threads.json"


def _key(config: TrainConfig, cores: int) -> str:
    m = config.model
    return (f"{cores} cores, torch {torch.__version__}, width {m.initial_features}, depth {m.depth}, {m.padding}, "
            f"batch {config.batch_size} × {config.patch_size}²")


def steps_per_second(config: TrainConfig, threads: int, seconds: float = 0.5, min_steps: int = 2) -> float:
    """Training steps per second of ``config``'s network on the CPU with ``threads`` torch threads (random
    input: the network's own rate, as a batch of real patches costs the same)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        model = UNet(config.model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        x = torch.randn(config.batch_size, 1, config.patch_size, config.patch_size)

        def step() -> None:
            loss = model(x).float().mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        step()  # (the first step allocates)
        count, start = 0, time.perf_counter()
        while count < min_steps or time.perf_counter() - start < seconds:
            step()
            count += 1
        return count / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(before)


def choose_threads(config: TrainConfig, *, cores: int | None = None, cache: Path | None = None,
                   seconds: float = 0.5) -> int:
    """The torch thread count to train ``config`` with on this CPU: ``$NEUROSEG_TRAIN_THREADS``, else the
    measured choice (kept in ``cache``, by default ``~/.cache/neuroseg/threads.json``)."""
    cores = cores or usable_cores()
    forced = os.environ.get("NEUROSEG_TRAIN_THREADS", "").strip()
    if forced:
        if forced.isdigit() and int(forced) >= 1:
            return min(int(forced), cores)
        log.warning("$NEUROSEG_TRAIN_THREADS is %r, not a number of threads: measuring instead", forced)
    if cores == 1:
        return 1
    key = _key(config, cores)
    known: dict = {}
    try:
        cache = cache or default_cache()
        loaded = json.loads(cache.read_text())
        known = loaded if isinstance(loaded, dict) else {}
    except (OSError, RuntimeError, ValueError):  # (none kept yet, or unreadable: measured again)
        pass
    entry = known.get(key)
    kept = entry.get("threads") if isinstance(entry, dict) else None
    if isinstance(kept, int) and not isinstance(kept, bool) and kept >= 1:
        return min(kept, cores)
    rates = {n: steps_per_second(config, n, seconds) for n in candidates(cores)}
    best = max(rates.values())
    chosen = min(n for n, r in rates.items() if r >= (1 - WITHIN) * best)
    log.info("training threads: %s (steps/s by threads: %s)", chosen,
             ", ".join(f"{n}: {r:.2f}" for n, r in rates.items()))
    try:  # (a cache that cannot be written costs a measurement next time, nothing more)
        cache = cache or default_cache()
        cache.parent.mkdir(parents=True, exist_ok=True)
        known[key] = {"threads": chosen, "steps_per_s": {str(n): round(r, 3) for n, r in rates.items()}}
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known, indent=1))
        tmp.replace(cache)
    except (OSError, RuntimeError) as exc:
        log.warning("the thread choice was not kept: %s", exc)
    return chosen


def shared_threads(chosen: int, others: int, cores: int | None = None) -> int:
    """The torch threads of a CPU job while ``others`` other CPU jobs of the app (a training, predictions)
    run beside it: its own choice, but no more than its share of the cores. Two processes of two threads on 2
    cores trained 4× slower in all than one thread each (``bench.pipeline --beside``): spinning threads of
    one process wait on the other's."""
    cores = cores or usable_cores()
    return max(1, min(chosen, cores // (others + 1)))
