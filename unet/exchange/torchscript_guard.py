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
3. it reads the archive before ``torch.jit.load`` (:func:`check_archive`): its zip frame by hand (nothing
   before the first member, one end record, the central directory where the end record says), then with
   PyTorch's own zip reader (the loader's) and with Python's, which must see the same members with the same
   bytes (a file built so that two readers see two archives is refused); a model with a ``__setstate__``
   (code that runs while loading) is refused unread;
4. after ``torch.jit.load(..., map_location="cpu")`` every method of every submodule (and every forward
   hook) is inlined and each node's ``kind()`` is held against :data:`ALLOWED_OPS` /
   :data:`ALLOWED_PREFIXES` (an allowlist: tensor arithmetic, convolutions, pooling, resampling,
   activations, normalisation, reductions, shape and list operations, TorchScript's control flow); the
   first operator outside it is named in the refusal. Nothing that touches files, processes, the network,
   raw storage or uninitialised memory, nor any custom ``torch.ops`` namespace, is on the list; calls that
   inlining could not resolve (``prim::CallMethod`` / ``prim::CallFunction`` of an interface) and
   ``prim::fork`` are refused with them;
5. only then the model runs once on the package's test input (its pre-processing applied as
   :func:`preprocess` does, a sigmoid when its post-processing has one) and its output is compared with the
   package's test output (``numpy.allclose``, bioimageio.core's default tolerances). A stored model (no
   test tensors: :func:`unet.exchange.checkpoint.load_checkpoint`) is checked by steps 1-4 only, once per file.

What remains: a model this check accepted is loaded by the server's processes and runs in the prediction
worker (and a held-out evaluation) on real slices, unbounded: its operators are arithmetic on tensors, but
nothing limits its memory or time there (a model that passed on its small test input and loops or
allocates on a real slice ties up that worker), and no sandbox is around it. A child that is root but may
not change its user (a container that maps no other user) says so on its standard error and checks as
root (its :class:`Verdict` gives the ``uid``).

Limits come from ``NEUROSEG_IMPORT_MEMORY_MB`` (4096) and ``NEUROSEG_IMPORT_SECONDS`` (120) unless given.
At module level this file imports the standard library only: the child must refuse the network before
torch is imported.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RTOL = 1e-3  # bioimageio.core's defaults for a model test
ATOL = 1e-3
STARTUP_S = 60  # the wall-clock allowance for starting Python and importing torch, beyond `seconds`
STDERR_BYTES = 1 << 20  # what the child may write to its standard error (a file)


def default_memory_mb() -> int:
    return int(os.environ.get("NEUROSEG_IMPORT_MEMORY_MB", "4096"))


def default_seconds() -> int:
    return int(os.environ.get("NEUROSEG_IMPORT_SECONDS", "120"))


class TorchScriptRefused(ValueError):
    """A TorchScript model that is not run here, with the reason."""


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
    listed = "\n".join([*sorted(ALLOWED_OPS), "--", *ALLOWED_PREFIXES])
    return f"{CHECK_VERSION}:{hashlib.sha256(listed.encode()).hexdigest()[:16]}"


def _inplace(*names: str) -> tuple[str, ...]:
    return tuple(n for name in names for n in (name, name + "_"))


_MATH = _inplace(
    "add", "sub", "rsub", "mul", "div", "true_divide", "floor_divide", "remainder", "fmod", "neg", "abs",
    "pow", "sqrt", "rsqrt", "square", "exp", "exp2", "expm1", "log", "log1p", "log2", "log10", "reciprocal",
    "sign", "floor", "ceil", "round", "trunc", "frac", "clamp", "clamp_min", "clamp_max", "clip", "minimum",
    "maximum", "fmin", "fmax", "lerp", "addcmul", "addcdiv", "sin", "cos", "tan", "asin", "acos", "atan",
    "atan2", "sinh", "cosh", "erf", "erfc", "hypot", "nan_to_num", "masked_fill", "fill", "zero", "copy",
    "logical_and", "logical_or", "logical_not", "logical_xor", "bitwise_and", "bitwise_or", "bitwise_not",
    "bitwise_xor", "__and__", "__or__", "__xor__", "__iand__", "__ior__", "__ixor__",
    # activations
    "relu", "relu6", "leaky_relu", "elu", "selu", "celu", "gelu", "silu", "mish", "sigmoid", "hardsigmoid",
    "hardswish", "hardtanh", "softplus", "softshrink", "hardshrink", "tanh", "logit", "threshold", "prelu",
    "glu", "log_sigmoid",
)
_TENSOR = (
    "softmax", "log_softmax", "_softmax", "_log_softmax", "softmin",
    # normalisation (dropout is the identity in eval mode)
    "batch_norm", "instance_norm", "group_norm", "layer_norm", "rms_norm", "local_response_norm",
    *_inplace("dropout", "feature_dropout", "alpha_dropout", "feature_alpha_dropout"),
    "_convolution", "convolution", "linear", "matmul", "mm", "bmm", "addmm", "baddbmm", "einsum", "t",
    "pad", "constant_pad_nd", "pixel_shuffle", "pixel_unshuffle", "channel_shuffle",
    # shape and layout
    "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "squeeze", "squeeze_", "unsqueeze",
    "unsqueeze_", "permute", "transpose", "transpose_", "movedim", "contiguous", "expand", "expand_as",
    "repeat", "repeat_interleave", "tile", "cat", "concat", "concatenate", "stack", "hstack", "vstack",
    "split", "split_with_sizes", "tensor_split", "chunk", "unbind", "narrow", "select", "slice",
    "index_select", "gather", "index", "flip", "roll", "rot90", "where", "masked_select", "nonzero",
    "size", "dim", "numel", "sym_size", "sym_numel", "is_floating_point", "is_contiguous", "item",
    "to", "type_as", "float", "double", "half", "bfloat16", "int", "long", "bool", "cpu", "cuda", "detach",
    "detach_", "clone", "alias", "contiguous", "requires_grad_", "set_grad_enabled",
    "zeros", "ones", "full", "zeros_like", "ones_like", "full_like", "arange", "linspace", "tensor",
    "scalar_tensor", "as_tensor", "new_zeros", "new_ones", "new_full", "new_tensor", "eye", "tril", "triu",
    # reductions and comparisons
    "sum", "mean", "std", "var", "std_mean", "var_mean", "max", "min", "amax", "amin", "aminmax", "argmax",
    "argmin", "prod", "norm", "linalg_vector_norm", "frobenius_norm", "logsumexp", "cumsum", "cumprod",
    "quantile", "nanquantile", "median", "nanmedian", "sort", "argsort", "topk", "kthvalue", "all", "any",
    "eq", "ne", "lt", "le", "gt", "ge", "isnan", "isinf", "isfinite", "equal", "allclose", "isclose",
    "count_nonzero",
    # what TorchScript makes of Python: numbers, lists, dicts, strings, errors
    "Int", "Float", "Bool", "ScalarImplicit", "IntImplicit", "FloatImplicit", "Complex",
    "__getitem__", "__contains__", "__is__", "__isnot__", "__not__", "__range_length", "__derive_index",
    "__round_to_zero_floordiv", "_set_item", "len", "list", "append", "pop", "insert", "extend", "reverse",
    "copy", "clear", "remove", "count", "dict", "keys", "values", "items", "get", "setdefault", "floordiv",
    "format", "str", "join", "startswith", "endswith", "lower", "upper", "warn", "divmod", "mathremainder",
    "numel", "device", "dtype",
)
ALLOWED_OPS: frozenset[str] = frozenset(
    {f"aten::{n}" for n in (*_MATH, *_TENSOR)}
    | {f"prim::{n}" for n in (
        "Constant", "GetAttr", "SetAttr", "ListConstruct", "ListUnpack", "TupleConstruct", "TupleUnpack",
        "TupleIndex", "TupleSlice", "DictConstruct", "DictIndex", "If", "Loop", "RaiseException", "Uninitialized",
        "unchecked_cast", "NumToTensor", "ImplicitTensorToNum", "min", "max", "abs", "device", "dtype",
        "layout", "shape", "isinstance", "is_cuda", "is_cpu", "requires_grad", "data", "Print",
        "AutogradZero", "ConstantChunk", "type", "EnumValue", "EnumName", "str", "rangelist", "TypeCheck")}
)
"""Operator kinds a foreign TorchScript model may use (beside :data:`ALLOWED_PREFIXES`)."""
ALLOWED_PREFIXES: tuple[str, ...] = (
    "aten::conv",  # conv1d/2d/3d, conv_transpose…, convolution
    "aten::max_pool", "aten::avg_pool", "aten::adaptive_avg_pool", "aten::adaptive_max_pool",
    "aten::upsample_", "aten::_upsample_",  # interpolate in every mode
    "aten::reflection_pad", "aten::replication_pad",
)
"""Families of operator kinds taken whole (every member is arithmetic on tensors)."""


def allowed(kind: str) -> bool:
    return kind in ALLOWED_OPS or kind.startswith(ALLOWED_PREFIXES)


def op_kinds(module: Any) -> list[str]:
    """Every operator kind a loaded ScriptModule can run, in the order first met: each method of each
    submodule and each forward hook, inlined (what ``forward`` calls is in its graph), nested blocks too."""
    import torch

    seen: dict[str, None] = {}

    def walk(block: Any) -> None:
        for node in block.nodes():
            seen.setdefault(node.kind(), None)
            for inner in node.blocks():
                walk(inner)

    for _, sub in module.named_modules():
        c = sub._c
        names = sorted(c._method_names(), key=lambda n: (n != "forward", n))
        for name in names:
            walk(c._get_method(name).inlined_graph)
        for hook in [*c._get_forward_pre_hooks(), *c._get_forward_hooks()]:
            graph = hook.graph.copy()
            torch._C._jit_pass_inline(graph)
            walk(graph)
    return list(seen)


def forbidden_ops(module: Any) -> list[str]:
    """The operator kinds of ``module`` (:func:`op_kinds`) outside the allowlist, in the order met."""
    return [k for k in op_kinds(module) if not allowed(k)]


_STORAGE = re.compile(r"(data|constants)/\d+")  # tensor storages: raw numbers, never read as code
_LOCAL, _CENTRAL_END, _ZIP64_END, _ZIP64_LOCATOR = b"PK\x03\x04", b"PK\x05\x06", b"PK\x06\x06", b"PK\x06\x07"


def check_layout(path: str | os.PathLike) -> None:
    """The zip's frame read by hand, so that no two zip readers can see two archives in it:
    :class:`TorchScriptRefused` unless the file starts with its first member's local header (no data before
    it, and not the magic of PyTorch's flatbuffer format, which ``torch.jit.load`` would take instead), ends
    with one end record and no comment, and its central directory lies exactly where that record (and its
    ZIP64 locator) say. Python's ``zipfile`` shifts every member by the difference when the stated offset
    is not the real one; PyTorch's reader does not: a file built on that difference shows Python one set of
    members and ``torch.jit.load`` another."""
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        head = fh.read(8)
        span = min(size, 22 + 20 + 56)
        fh.seek(size - span)
        tail = fh.read(span)
    if size < 30 + 22 or head[:4] != _LOCAL:
        raise TorchScriptRefused("its TorchScript file does not start with a zip member (data before its first "
                                 "member, or not a zip): Neuroseg reads only plain TorchScript archives")
    if head[4:8] == b"PTMF":
        raise TorchScriptRefused("its TorchScript file is also a PyTorch flatbuffer file: Neuroseg reads only "
                                 "plain TorchScript archives")
    end = tail[-22:]
    _, disk, cd_disk, on_disk, count, cd_size, cd_offset, comment = struct.unpack("<IHHHHIIH", end)
    if end[:4] != _CENTRAL_END or comment or disk or cd_disk or on_disk != count:
        raise TorchScriptRefused("its TorchScript file does not end with a plain zip end record (a comment, "
                                 "data after it, or several disks): Neuroseg reads only plain TorchScript "
                                 "archives")
    directory_end = size - 22
    if tail[-42:-38] == _ZIP64_LOCATOR:
        _, locator_disk, zip64_at, disks = struct.unpack("<IIQI", tail[-42:-22])
        record = tail[-98:-42]
        if len(record) != 56 or zip64_at != size - 98 or record[:4] != _ZIP64_END or locator_disk or disks != 1:
            raise TorchScriptRefused("its TorchScript file's ZIP64 end record is not where its locator says")
        (_, record_size, _, _, disk64, cd_disk64, on_disk64, count64, cd_size64,
         cd_offset64) = struct.unpack("<IQHHIIQQQQ", record)
        if (record_size != 44 or disk64 or cd_disk64 or on_disk64 != count64
                or any(short not in (long, full) for short, long, full in (
                    (count, count64, 0xFFFF), (cd_size, cd_size64, 0xFFFFFFFF), (cd_offset, cd_offset64, 0xFFFFFFFF)))):
            raise TorchScriptRefused("its TorchScript file's ZIP64 end record is not a plain one (or says other "
                                     "than its end record)")
        cd_size, cd_offset = cd_size64, cd_offset64
        directory_end = size - 98
    elif count == 0xFFFF or cd_size == 0xFFFFFFFF or cd_offset == 0xFFFFFFFF:
        raise TorchScriptRefused("its TorchScript file's end record points to a ZIP64 record it does not have")
    if cd_offset + cd_size != directory_end:
        raise TorchScriptRefused(f"its TorchScript file's central directory is not where its end record says "
                                 f"(at {cd_offset:,} + {cd_size:,} bytes, but it ends at {directory_end:,}): zip "
                                 "readers disagree on such a file, and Neuroseg reads none of it")


def check_archive(path: str | os.PathLike, *, max_members: int = 20_000, max_code: int = 64 << 20) -> None:
    """What can be told of a TorchScript file before ``torch.jit.load`` runs anything in it:
    :func:`check_layout` (a plain zip frame), then :func:`check_members` (PyTorch's reader and Python's see
    the same members; no ``__setstate__``); :class:`TorchScriptRefused` otherwise."""
    check_layout(path)
    check_members(path, max_members=max_members, max_code=max_code)


def check_members(path: str | os.PathLike, *, max_members: int = 20_000, max_code: int = 64 << 20) -> None:
    """:class:`TorchScriptRefused` unless PyTorch's own zip reader (``torch._C.PyTorchFileReader``, the one
    ``torch.jit.load`` parses the file with) and Python's ``zipfile`` see the same members at the same
    offsets, of the same sizes, and the same bytes in every member but the tensor storages (``data/<n>``,
    ``constants/<n>``), and no ``__setstate__`` (which the loader would call) is in any of those members as
    PyTorch reads them. Imports torch (the server calls this only in the child)."""
    import torch

    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise TorchScriptRefused(f"its TorchScript file is not a TorchScript archive ({exc})") from None
    with archive:
        members = archive.infolist()
        if len(members) > max_members:
            raise TorchScriptRefused(f"its TorchScript file has {len(members):,} members")
        try:
            reader = torch._C.PyTorchFileReader(str(path))
            records = list(reader.get_all_records())
        except Exception as exc:  # (whatever PyTorch's reader says is the reason)
            raise TorchScriptRefused(f"its TorchScript file is not a TorchScript archive ({type(exc).__name__}: "
                                     f"{str(exc).splitlines()[0][:200] if str(exc) else ''})") from None
        names = [info.filename for info in members]
        prefix = names[0].split("/", 1)[0] + "/" if names else ""
        by_name = {info.filename: info for info in members}
        if (len(by_name) != len(names) or len(set(records)) != len(records) or len(records) != len(names)
                or {prefix + r for r in records} != set(names)):
            raise TorchScriptRefused("its TorchScript file shows PyTorch's zip reader other members than Python's "
                                     "(or one twice): Neuroseg does not load a file that two readers see apart")
        read = 0
        for record in records:
            info = by_name[prefix + record]
            if (reader.get_record_header_offset(record) != info.header_offset
                    or reader.get_record_size(record) != info.file_size):
                raise TorchScriptRefused(f"its TorchScript file's member {record} is not the same member to "
                                         "PyTorch's zip reader as to Python's: Neuroseg does not load it")
            if _STORAGE.fullmatch(record):
                continue
            read += info.file_size
            if read > max_code:
                raise TorchScriptRefused("its TorchScript file holds more code than Neuroseg reads")
            try:
                data, twin = reader.get_record(record), archive.read(info)
            except Exception as exc:  # (a damaged member: a bad CRC, a bad deflate stream)
                raise TorchScriptRefused(f"its TorchScript file's member {record} cannot be read ({exc})") from None
            if data != twin:
                raise TorchScriptRefused(f"its TorchScript file's member {record} reads differently to PyTorch "
                                         "and to Python: Neuroseg does not load it")
            if b"__setstate__" in data:
                raise TorchScriptRefused(f"its TorchScript defines __setstate__ ({record}): code that runs "
                                         "when the model is loaded; Neuroseg does not load it")


def preprocess(x: Any, pre: list[dict]) -> Any:
    """A package's pre-processing on a ``(B, C, H, W)`` tensor: ``zero_mean_unit_variance`` and
    ``scale_range`` (percentiles) per image and channel, in the spec's formulas (``ensure_dtype`` needs
    nothing: the engine feeds float32). The same for the check and for
    :class:`unet.exchange.bioimageio.ForeignModel`."""
    import torch

    for step in pre:
        flat = x.flatten(2)
        if step["id"] == "zero_mean_unit_variance":
            mean = flat.mean(-1)[..., None, None]
            std = flat.std(-1, unbiased=False)[..., None, None]
            x = (x - mean) / (std + float(step.get("eps", 1e-6)))
        elif step["id"] == "scale_range":
            lo = torch.quantile(flat, float(step.get("min_percentile", 0.0)) / 100, dim=-1)[..., None, None]
            hi = torch.quantile(flat, float(step.get("max_percentile", 100.0)) / 100, dim=-1)[..., None, None]
            x = (x - lo) / (hi - lo + float(step.get("eps", 1e-6)))
    return x


def read_tensor(path: str | os.PathLike, *, max_elements: int | None = None, what: str = "test tensor") -> Any:
    """A package's ``.npy`` test tensor as float32, read with ``allow_pickle=False`` after its header said it
    is numbers (and at most ``max_elements`` of them); :class:`TorchScriptRefused` otherwise."""
    import numpy as np

    try:
        header = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise TorchScriptRefused(f"its {what} is not a NumPy array file ({exc})") from None
    if not isinstance(header, np.ndarray) or header.dtype.kind not in "biuf":
        raise TorchScriptRefused(f"its {what} is not an array of numbers")
    if max_elements is not None and header.size > max_elements:
        raise TorchScriptRefused(f"its {what} has {header.size:,} values (at most {max_elements:,} are read)")
    return np.array(header, dtype=np.float32)


def compare(actual: Any, expected: Any, *, rtol: float = RTOL, atol: float = ATOL) -> float:
    """The largest difference of an output from a package's test output; :class:`TorchScriptRefused` when
    the shapes differ or a value is off by more than ``atol + rtol·|expected|`` (``numpy.allclose``)."""
    import numpy as np

    actual, expected = np.asarray(actual, dtype=np.float32), np.asarray(expected, dtype=np.float32)
    if actual.shape != expected.shape:
        raise TorchScriptRefused(f"it fails its own model test: its output has the shape {list(actual.shape)}, "
                                 f"its test output {list(expected.shape)}")
    error = float(np.max(np.abs(actual - expected))) if actual.size else 0.0
    if not np.allclose(actual, expected, rtol=rtol, atol=atol):
        raise TorchScriptRefused(f"it fails its own model test: its output differs from its test output by up "
                                 f"to {error:.3g} (tolerance {atol:g} + {rtol:g}·|value|)")
    return error


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
    :class:`unet.exchange.bioimageio.ForeignModel` (``pre``, ``sigmoid``). Returns the :class:`Verdict` of an accepted
    model; :class:`TorchScriptRefused` says why another is not run. The server never loads the file itself
    before this returned.

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
            raise TorchScriptRefused(f"its check ran past {seconds + STARTUP_S} s and was stopped") from None
        errors.seek(0, os.SEEK_END)
        errors.seek(max(0, errors.tell() - 2000))
        tail = errors.read().decode(errors="replace").strip().splitlines()[-3:]
    if done.returncode < 0:
        raise TorchScriptRefused(_stopped(-done.returncode, memory_mb, seconds))
    try:
        verdict = json.loads(done.stdout.decode().strip().splitlines()[-1])
    except (ValueError, IndexError, UnicodeDecodeError):
        raise TorchScriptRefused(f"its check gave no verdict (exit code {done.returncode}: "
                                 f"{' / '.join(tail) or 'no message'})") from None
    if not verdict.get("ok"):
        raise TorchScriptRefused(str(verdict.get("reason") or "its check refused it"))
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
    import socket

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
    import resource

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
    import pwd

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
    import resource  # noqa: F401 (imported before root is dropped: the interpreter's own files may be root's)

    import numpy as np  # noqa: F401 (imported before the limits, as torch)
    import torch

    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    weights, test_input, test_output = _open_before_dropping([weights, test_input, test_output])
    uid = _drop_privileges()
    _limit(memory_mb, seconds)
    digest = _sha256(weights)
    check_archive(weights)
    tested = test_input is not None and test_output is not None
    if tested:
        x = read_tensor(test_input, what="test input")
        expected = read_tensor(test_output, what="test output")
    try:
        module = torch.jit.load(weights, map_location="cpu")
    except Exception as exc:  # (whatever the loader says is the reason)
        raise TorchScriptRefused(f"its TorchScript could not be loaded ({type(exc).__name__}: "
                                 f"{str(exc).splitlines()[0][:300] if str(exc) else ''})") from None
    kinds = op_kinds(module)
    bad = [k for k in kinds if not allowed(k)]
    if bad:
        more = f" (and {len(bad) - 1} more: {', '.join(bad[1:4])}{'…' if len(bad) > 4 else ''})" if bad[1:] else ""
        raise TorchScriptRefused(f"its TorchScript uses the operator {bad[0]}{more}, which Neuroseg does not run: "
                                 "an imported model may compute on tensors (convolution, pooling, resampling, "
                                 "activations, normalisation, shapes) but not reach files, the network, "
                                 "processes or custom operators")
    error = 0.0
    if tested:
        module.eval()
        with torch.no_grad():
            y = module(preprocess(torch.from_numpy(x), list(plan.get("pre") or [])))
            if not isinstance(y, torch.Tensor):
                raise TorchScriptRefused(f"its model returns a {type(y).__name__}, not one tensor")
            if plan.get("sigmoid"):
                y = torch.sigmoid(y)
        error = compare(y.float().numpy(), expected)
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
    import argparse

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
    except TorchScriptRefused as exc:
        verdict = {"ok": False, "reason": str(exc)}
    except Exception as exc:  # (a model's failure is a refusal, said in words)
        verdict = {"ok": False, "reason": _reason(exc, args.memory_mb)}
    verdict_out.write(json.dumps(verdict) + "\n")
    verdict_out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
