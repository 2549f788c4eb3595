"""The check a TorchScript model of another tool passes before Neuroseg runs it: its operators against an
allowlist, then its own test tensors, in a process of its own with bounded memory, time and file writes and
no network.

Why: a TorchScript file is code. Its ``forward`` may call ``torch.from_file`` (``aten::from_file``, which
reads any file the server can) or ``aten::save`` (which writes one), and ``torch.jit.load`` already runs a
class's ``__setstate__``. So the server never loads a foreign TorchScript file itself before this check
said yes:

1. :func:`check` starts ``python -I unet/exchange/torchscript_guard.py`` (isolated: no ``PYTHON*`` variables, no
   user site, not even the script's folder on ``sys.path``; an environment of a few fixed variables; the
   server's descriptors closed; under ``unshare --net`` when we are root and it works, else without) and
   reads one JSON verdict from its standard output;
2. the child (:func:`main`) first replaces ``socket.socket``, ``create_connection``, ``getaddrinfo`` and
   ``socketpair`` with ones that refuse, then imports torch (a CUDA build maps gigabytes of libraries, so
   the limits count from there on); when the server is root it then opens its files (copies, mode 0644, in
   a fresh folder) and drops to ``nobody`` (no groups), so the model cannot write the server's files even
   through a shared memory map; then it bounds its address space (``RLIMIT_AS``: torch as imported plus
   ``memory_mb``), its CPU time (``RLIMIT_CPU``: ``seconds`` more, on one thread) and the files it may
   write (``RLIMIT_FSIZE``: its standard error only);
3. it reads the archive before ``torch.jit.load`` (:func:`unet.exchange.torchscript_rules.check_archive`): its zip
   frame by hand (nothing before the first member, one end record, the central directory where the end
   record says), then with
   PyTorch's own zip reader (the loader's) and with Python's, which must see the same members with the same
   bytes (a file built so that two readers see two archives is refused); a model with a ``__setstate__``
   (code that runs while loading) is refused unread;
4. after ``torch.jit.load(..., map_location="cpu")`` every method of every submodule (and every forward
   hook) is inlined and each node's ``kind()`` is held against
   :data:`unet.exchange.torchscript_rules.ALLOWED_OPS` /
   :data:`unet.exchange.torchscript_rules.ALLOWED_PREFIXES` (an allowlist: tensor arithmetic, convolutions,
   pooling, resampling, activations, normalisation, reductions, shape and list operations, TorchScript's
   control flow); the first operator outside it is named in the refusal. Nothing that touches files,
   processes, the network, raw storage or uninitialised memory, nor any custom ``torch.ops`` namespace, is
   on the list; calls that inlining could not resolve (``prim::CallMethod`` / ``prim::CallFunction`` of an
   interface) and ``prim::fork`` are refused with them;
5. only then the model runs once on the package's test input (its pre-processing applied as
   :func:`unet.exchange.torchscript_rules.preprocess` does, a sigmoid when its post-processing has one) and its
   output is compared with the package's test output (``numpy.allclose``, bioimageio.core's default
   tolerances). A stored model (no test tensors: :func:`unet.exchange.checkpoint.load_checkpoint`) is
   checked by steps 1-4 only, once per file.

What remains: a model this check accepted is loaded by the server's processes and runs in the prediction
worker (and a held-out evaluation) on real slices, unbounded: its operators are arithmetic on tensors, but
nothing limits its memory or time there (a model that passed on its small test input and loops or
allocates on a real slice ties up that worker), and no sandbox is around it. A child that is root but may
not change its user (a container that maps no other user) says so on its standard error and checks as
root (its :class:`Verdict` gives the ``uid``).

Limits come from ``NEUROSEG_IMPORT_MEMORY_MB`` (4096) and ``NEUROSEG_IMPORT_SECONDS`` (120) unless given.
What the model is held against (the allowlist, the archive's checks, the test tensors) is
:mod:`unet.exchange.torchscript_rules`, which the child loads by its path (it runs with ``-I``: the project is
not on its ``sys.path``). At module level both files import the standard library only: the child must
refuse the network before torch is imported.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import importlib.util
import json
import os
import pwd
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__:  # imported by the server's processes
    from unet.exchange import torchscript_rules as rules
else:  # the child, run as a file with -I: the project is not on sys.path, so the rules beside it are loaded by path
    _spec = importlib.util.spec_from_file_location("torchscript_rules",
                                                   Path(__file__).with_name("torchscript_rules.py"))
    rules = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(rules)

STARTUP_S = 60  # the wall-clock allowance for starting Python and importing torch, beyond `seconds`
STDERR_BYTES = 1 << 20  # what the child may write to its standard error (a file)


def default_memory_mb() -> int:
    return int(os.environ.get("NEUROSEG_IMPORT_MEMORY_MB", "4096"))


def default_seconds() -> int:
    return int(os.environ.get("NEUROSEG_IMPORT_SECONDS", "120"))

@dataclass(frozen=True)
class Verdict:
    """What the check found for a model it accepted."""

    ops: tuple[str, ...]  # the operator kinds its graphs use
    max_error: float  # against the package's test output (0.0 when it was not run: ``tested`` False)
    network_namespace: bool  # the child also ran without a network interface (unshare --net)
    sha256: str = ""  # of the file the child checked
    uid: int | None = None  # the user the child loaded it as (65534, nobody, when the server is root)
    tested: bool = True  # the model ran on test tensors (not when only its archive and operators were checked)


CHECK_VERSION = 2  # (raised when what the check refuses changes: stored verdicts of older checks are redone)


def fingerprint() -> str:
    """What a stored verdict was given under: this check's version and its allowlist. A verdict kept beside
    a file (:func:`unet.exchange.checkpoint.load_checkpoint`) counts only under the same fingerprint."""
    listed = "\n".join([*sorted(rules.ALLOWED_OPS), "--", *rules.ALLOWED_PREFIXES])
    return f"{CHECK_VERSION}:{hashlib.sha256(listed.encode()).hexdigest()[:16]}"


# --- the parent: start the child, read its verdict ------------------------------------------------------------
@functools.cache
def _unshare() -> list[str]:
    """``unshare --net --`` when we are root and it works here (a container may forbid it), else nothing."""
    tool = shutil.which("unshare")
    if not tool or not hasattr(os, "geteuid") or os.geteuid() != 0:
        return []
    try:
        done = subprocess.run([tool, "--net", "--", sys.executable, "-c", ""], stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [tool, "--net", "--"] if done.returncode == 0 else []


def _as_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def check(weights: str | os.PathLike, test_input: str | os.PathLike | None = None,
          test_output: str | os.PathLike | None = None, plan: dict | None = None, *, memory_mb: int | None = None,
          seconds: int | None = None) -> Verdict:
    """Check a foreign TorchScript file in a child process (see the module): its archive, its operators, then
    its test when ``test_input`` and ``test_output`` are given (else it is not run: the check of a stored
    model, whose test tensors are not kept). ``plan`` is the ``package`` entry of
    :class:`unet.exchange.foreign_model.ForeignModel` (``pre``, ``sigmoid``). Returns the :class:`Verdict` of an
    accepted model; :class:`unet.exchange.torchscript_rules.TorchScriptRefused` says why another is not run. The
    server never loads the file itself before this returned.

    When the server runs as root, the child gets copies of the files (mode 0644, in a fresh folder no one
    else writes) and drops to ``nobody`` before it reads them."""
    memory_mb = default_memory_mb() if memory_mb is None else int(memory_mb)
    seconds = default_seconds() if seconds is None else int(seconds)
    plan = plan or {}
    weights = Path(weights).resolve()
    sources = [weights, *(Path(t).resolve() for t in (test_input, test_output) if t is not None)]
    if len(sources) == 2:
        raise ValueError("check() takes both test tensors or neither")
    wrapper = _unshare()
    try:
        folder = tempfile.TemporaryDirectory(prefix=".neuroseg-check-", dir=weights.parent)
    except OSError:  # (a folder the server may not write: the system's temporary folder)
        folder = tempfile.TemporaryDirectory(prefix="neuroseg-check-")
    with folder as tmp, tempfile.TemporaryFile() as errors:
        home = Path(tmp)
        os.chmod(home, 0o755)
        files = sources
        if _as_root():  # copies the child may read as nobody, which no one else writes
            files = [home / f"{n}{source.suffix[:8]}" for n, source in enumerate(sources)]
            for source, copy in zip(sources, files, strict=True):
                shutil.copyfile(source, copy)
                os.chmod(copy, 0o644)
        command = [*wrapper, sys.executable, "-I", str(Path(__file__).resolve()), str(files[0]),
                   *(["--test-input", str(files[1]), "--test-output", str(files[2])] if len(files) == 3 else []),
                   "--plan", json.dumps({"pre": list(plan.get("pre") or []), "sigmoid": bool(plan.get("sigmoid"))}),
                   "--memory-mb", str(memory_mb), "--seconds", str(seconds)]
        env = {"PATH": "/usr/bin:/bin", "HOME": str(home), "LC_ALL": "C.UTF-8", "OMP_NUM_THREADS": "1",
               "MKL_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "TMPDIR": str(home)}
        try:
            done = subprocess.run(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=errors,
                                  env=env, cwd=home, timeout=seconds + STARTUP_S, check=False)
        except subprocess.TimeoutExpired:
            raise rules.TorchScriptRefused(f"its check ran past {seconds + STARTUP_S} s and was stopped") from None
        errors.seek(0, os.SEEK_END)
        errors.seek(max(0, errors.tell() - 2000))
        tail = errors.read().decode(errors="replace").strip().splitlines()[-3:]
    if done.returncode < 0:
        raise rules.TorchScriptRefused(_stopped(-done.returncode, memory_mb, seconds))
    try:
        verdict = json.loads(done.stdout.decode().strip().splitlines()[-1])
    except (ValueError, IndexError, UnicodeDecodeError):
        raise rules.TorchScriptRefused(f"its check gave no verdict (exit code {done.returncode}: "
                                       f"{' / '.join(tail) or 'no message'})") from None
    if not verdict.get("ok"):
        raise rules.TorchScriptRefused(str(verdict.get("reason") or "its check refused it"))
    return Verdict(tuple(verdict.get("ops") or ()), float(verdict.get("max_error", 0.0)), bool(wrapper),
                   str(verdict.get("sha256") or ""), verdict.get("uid"), bool(verdict.get("tested")))


def _stopped(signum: int, memory_mb: int, seconds: int) -> str:
    if signum == signal.SIGXCPU:
        return f"it ran past its time limit ({seconds} s of computing) and was stopped"
    if signum == signal.SIGXFSZ:
        return "it wrote more than its check allows and was stopped"
    if signum in (signal.SIGKILL, signal.SIGSEGV, signal.SIGBUS, signal.SIGABRT):
        return (f"its check was stopped by {signal.Signals(signum).name} (past its memory limit of "
                f"{memory_mb:,} MB, or a crash)")
    return f"its check was stopped by signal {signum}"


# --- the child ---------------------------------------------------------------------------------------------
def _refuse_network() -> None:
    """Every new socket, connection and name lookup of this process refuses (the child's first act)."""
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise OSError("no network while a TorchScript model is checked")

    class NoSocket(socket.socket):  # (still a class: modules that subclass socket.socket import)
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            refuse()

    socket.socket = NoSocket  # type: ignore[misc]
    socket.create_connection = refuse  # type: ignore[assignment]
    socket.getaddrinfo = refuse  # type: ignore[assignment]
    socket.socketpair = refuse  # type: ignore[assignment]


def _limit(memory_mb: int, seconds: int) -> None:
    """Bound this process from here on: address space (what it holds now plus ``memory_mb``), CPU time
    (``seconds`` more), file size (its standard error file only) and no core file."""
    held = 0
    try:
        with open("/proc/self/status") as status:
            held = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
    except (OSError, StopIteration, ValueError):
        pass
    def cap(kind: int, soft: int, hard: int) -> None:  # (never above a hard limit already set)
        _, current = resource.getrlimit(kind)
        if current != resource.RLIM_INFINITY:
            soft, hard = min(soft, current), min(hard, current)
        resource.setrlimit(kind, (soft, hard))

    space = held + (memory_mb << 20)
    cap(resource.RLIMIT_AS, space, space)
    used = resource.getrusage(resource.RUSAGE_SELF)
    cpu = int(used.ru_utime + used.ru_stime) + 1 + seconds
    cap(resource.RLIMIT_CPU, cpu, cpu + 5)
    cap(resource.RLIMIT_FSIZE, STDERR_BYTES, STDERR_BYTES)
    cap(resource.RLIMIT_CORE, 0, 0)  # (a model stopped for its time leaves no core file)


def _drop_privileges() -> int:
    """As root: become ``nobody`` (no supplementary groups; real, effective and saved ids), so that the model
    cannot write the server's files, not even through a shared memory map of one. The user it runs as
    after this; as another user nothing changes. Where the system refuses (a container that maps no other
    user), the child says so on its standard error and stays root: its other bounds still hold."""
    if not _as_root():
        return os.geteuid() if hasattr(os, "geteuid") else -1
    try:
        entry = pwd.getpwnam("nobody")
        uid, gid = entry.pw_uid, entry.pw_gid
    except KeyError:
        uid = gid = 65534
    try:
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    except OSError as exc:
        print(f"neuroseg check: could not drop root ({exc}); checking as root", file=sys.stderr)
        return os.geteuid()
    if 0 in (*os.getresuid(), *os.getresgid()):
        raise RuntimeError("root was not dropped")
    return uid


def _open_before_dropping(paths: list[str | None]) -> list[str | None]:
    """As root: each file opened now and named by its descriptor (``/proc/self/fd/N``), which the process
    still reads as ``nobody`` whatever the folders above it allow (the file itself is 0644)."""
    if not _as_root() or not os.path.isdir("/proc/self/fd"):
        return paths
    return [None if p is None else f"/proc/self/fd/{os.open(p, os.O_RDONLY)}" for p in paths]


def _sha256(path: str) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _judge(weights: str, test_input: str | None, test_output: str | None, plan: dict, memory_mb: int,
           seconds: int) -> dict:
    import numpy as np  # noqa: F401 (imported before the limits, as torch)
    import torch  # only in the child, once the network is refused (not in the server's import of this file)

    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    weights, test_input, test_output = _open_before_dropping([weights, test_input, test_output])
    uid = _drop_privileges()
    _limit(memory_mb, seconds)
    digest = _sha256(weights)
    rules.check_archive(weights)
    tested = test_input is not None and test_output is not None
    if tested:
        x = rules.read_tensor(test_input, what="test input")
        expected = rules.read_tensor(test_output, what="test output")
    try:
        module = torch.jit.load(weights, map_location="cpu")
    except Exception as exc:  # (whatever the loader says is the reason)
        raise rules.TorchScriptRefused(f"its TorchScript could not be loaded ({type(exc).__name__}: "
                                       f"{str(exc).splitlines()[0][:300] if str(exc) else ''})") from None
    kinds = rules.op_kinds(module)
    bad = [k for k in kinds if not rules.allowed(k)]
    if bad:
        more = f" (and {len(bad) - 1} more: {', '.join(bad[1:4])}{'…' if len(bad) > 4 else ''})" if bad[1:] else ""
        raise rules.TorchScriptRefused(f"its TorchScript uses the operator {bad[0]}{more}, which Neuroseg does not "
                                       "run: an imported model may compute on tensors (convolution, pooling, "
                                       "resampling, activations, normalisation, shapes) but not reach files, the "
                                       "network, processes or custom operators")
    error = 0.0
    if tested:
        module.eval()
        with torch.no_grad():
            y = module(rules.preprocess(torch.from_numpy(x), list(plan.get("pre") or [])))
            if not isinstance(y, torch.Tensor):
                raise rules.TorchScriptRefused(f"its model returns a {type(y).__name__}, not one tensor")
            if plan.get("sigmoid"):
                y = torch.sigmoid(y)
        error = rules.compare(y.float().numpy(), expected)
    return {"ok": True, "ops": kinds, "max_error": error, "sha256": digest, "uid": uid, "tested": tested}


def _reason(exc: BaseException, memory_mb: int) -> str:
    text = str(exc)
    if isinstance(exc, MemoryError) or "allocate" in text.lower() or "out of memory" in text.lower():
        return f"it needed more memory than its check allows ({memory_mb:,} MB)"
    first = text.splitlines()[0][:300] if text else ""
    return f"it fails its own model test: it raised {type(exc).__name__}: {first}"


def main(argv: list[str] | None = None) -> int:
    """The child: ``torchscript_guard.py WEIGHTS [--test-input NPY --test-output NPY] --plan JSON --memory-mb N
    --seconds N`` prints one JSON verdict (``ok``, ``reason`` or ``ops``, ``max_error``, ``sha256``, ``uid``,
    ``tested``) on its standard output, which nothing else writes to (the model's own prints go to standard
    error)."""
    _refuse_network()
    parser = argparse.ArgumentParser(description="Check a TorchScript model before Neuroseg runs it.")
    parser.add_argument("weights")
    parser.add_argument("--test-input")
    parser.add_argument("--test-output")
    parser.add_argument("--plan", default="{}")
    parser.add_argument("--memory-mb", type=int, default=default_memory_mb())
    parser.add_argument("--seconds", type=int, default=default_seconds())
    args = parser.parse_args(argv)
    verdict_out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    try:
        verdict = _judge(args.weights, args.test_input, args.test_output, json.loads(args.plan), args.memory_mb,
                         args.seconds)
    except rules.TorchScriptRefused as exc:
        verdict = {"ok": False, "reason": str(exc)}
    except Exception as exc:  # (a model's failure is a refusal, said in words)
        verdict = {"ok": False, "reason": _reason(exc, args.memory_mb)}
    verdict_out.write(json.dumps(verdict) + "\n")
    verdict_out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
