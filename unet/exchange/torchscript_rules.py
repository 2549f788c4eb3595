"""What a foreign TorchScript model is held against (:mod:`unet.exchange.torchscript_guard` runs these checks
in its sandboxed child): the operator allowlist (:data:`ALLOWED_OPS`, :data:`ALLOWED_PREFIXES`,
:func:`op_kinds`), the archive's zip frame and members (:func:`check_archive`), a package's test tensors
(:func:`read_tensor`, :func:`compare`) and its pre-processing (:func:`preprocess`, the same for the check and
for :class:`unet.exchange.foreign_model.ForeignModel`).

The guard's child loads this file by its path, before it refuses the network: at module level it imports
the standard library only, and nothing of the project (torch and numpy are imported inside the functions).
"""

from __future__ import annotations

import os
import re
import struct
import zipfile
from typing import Any

RTOL = 1e-3  # bioimageio.core's defaults for a model test
ATOL = 1e-3


class TorchScriptRefused(ValueError):
    """A TorchScript model that is not run here, with the reason."""


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
    import torch  # not at module level: the guard's child loads this file before it refuses the network

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
    import torch  # not at module level: the guard's child loads this file before it refuses the network

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
    import torch  # not at module level: the guard's child loads this file before it refuses the network

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
    import numpy as np  # not at module level: the guard's child loads this file before it refuses the network

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
    import numpy as np  # not at module level: the guard's child loads this file before it refuses the network

    actual, expected = np.asarray(actual, dtype=np.float32), np.asarray(expected, dtype=np.float32)
    if actual.shape != expected.shape:
        raise TorchScriptRefused(f"it fails its own model test: its output has the shape {list(actual.shape)}, "
                                 f"its test output {list(expected.shape)}")
    error = float(np.max(np.abs(actual - expected))) if actual.size else 0.0
    if not np.allclose(actual, expected, rtol=rtol, atol=atol):
        raise TorchScriptRefused(f"it fails its own model test: its output differs from its test output by up "
                                 f"to {error:.3g} (tolerance {atol:g} + {rtol:g}·|value|)")
    return error
