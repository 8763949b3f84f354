"""The safetensors format (Hugging Face), read and written without the ``safetensors`` package.

Layout: an 8-byte little-endian header length N, N bytes of JSON (``{"name":
{"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, ...,
"__metadata__": {str: str}}``), then the tensors' raw little-endian bytes,
offsets relative to the end of the header. No pickle, nothing executed.

Why not the package: its numpy API has no bfloat16 (numpy has none), and
fedkube's bfloat16 is ml_dtypes' numpy dtype, so bfloat16 models, the common
case for transformers, would need torch. The format is small enough to own, and
owning it lets every error name the file, the tensor and the fix. Files written
here load with ``safetensors.numpy``/``safetensors.torch`` and vice versa
(tests/unit/formats).

A directory of shards is described by ``model.safetensors.index.json``
(``{"weight_map": {tensor: shard file}}``), as ``save_pretrained`` writes it.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fedkube.formats.errors import FormatError
from fedkube.transfer.refs import as_bytes, dtype_name, numpy_dtype

INDEX_FILE = "model.safetensors.index.json"
METADATA_KEY = "__metadata__"
# The reference implementation refuses headers above 100 MB; a header that big is a corrupt or hostile file.
MAX_HEADER_BYTES = 100_000_000
_ALIGN = 8  # the header is padded with spaces so the data starts 8-byte aligned, as the reference writer does

_TO_WIRE = {
    "F32": "float32", "F64": "float64", "F16": "float16", "BF16": "bfloat16", "I8": "int8", "I16": "int16",
    "I32": "int32", "I64": "int64", "U8": "uint8", "BOOL": "bool",
}
_FROM_WIRE = {wire: st for st, wire in _TO_WIRE.items()}


def _fix(path: Path) -> str:
    return f"fix: re-save {path} with safetensors' save_file (or save_pretrained) and upload it completely"


def read_header(path: Path, f: Any, size: int) -> tuple[dict[str, Any], int]:
    """The parsed JSON header and the offset where the data starts; FormatError when the header is malformed."""
    head = f.read(8)
    if len(head) < 8:
        raise FormatError(f"{path} is truncated: {len(head)} bytes, less than the 8-byte safetensors header length; "
                          + _fix(path))
    (n,) = struct.unpack("<Q", head)
    if n > MAX_HEADER_BYTES:
        raise FormatError(f"{path} claims a {n}-byte safetensors header, more than the {MAX_HEADER_BYTES} allowed; "
                          "the file is corrupt or not safetensors; " + _fix(path))
    if 8 + n > size:
        raise FormatError(f"{path} claims a {n}-byte safetensors header but the file has only {size} bytes; "
                          "it is truncated; " + _fix(path))
    raw = f.read(n)
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise FormatError(f"{path}: the safetensors header is not valid JSON ({exc}); " + _fix(path)) from None
    if not isinstance(doc, dict):
        raise FormatError(f"{path}: the safetensors header is not a JSON object; " + _fix(path))
    return doc, 8 + n


def _entries(path: Path, doc: Mapping[str, Any], data_bytes: int) -> list[tuple[str, str, tuple[int, ...], int, int]]:
    """(name, wire dtype, shape, begin, end) per tensor, in data order, after checking the offsets."""
    out = []
    for name, info in doc.items():
        if name == METADATA_KEY:
            continue
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
            raise FormatError(f"{path}: tensor {name!r} lacks dtype, shape or data_offsets in the header; "
                              + _fix(path))
        st_dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        wire = _TO_WIRE.get(st_dtype) if isinstance(st_dtype, str) else None
        if wire is None:
            raise FormatError(f"{path}: tensor {name!r} has dtype {st_dtype!r}, which fedkube does not carry "
                              f"(supported: {', '.join(_TO_WIRE)}); fix: convert it, e.g. to F32 or BF16")
        if (not isinstance(shape, list) or any(not isinstance(d, int) or isinstance(d, bool) or d < 0 for d in shape)
                or not isinstance(offsets, list) or len(offsets) != 2
                or any(not isinstance(o, int) or isinstance(o, bool) for o in offsets)):
            raise FormatError(f"{path}: tensor {name!r} has a malformed shape or data_offsets; " + _fix(path))
        begin, end = offsets
        nbytes = math.prod(shape) * numpy_dtype(wire).itemsize
        if not 0 <= begin <= end or end - begin != nbytes:
            raise FormatError(f"{path}: tensor {name!r} has data_offsets [{begin}, {end}] but shape {shape} of "
                              f"{st_dtype} needs {nbytes} bytes; " + _fix(path))
        if end > data_bytes:
            raise FormatError(f"{path}: tensor {name!r} ends at byte {end} of the data but the file holds only "
                              f"{data_bytes} data bytes; it is truncated; " + _fix(path))
        out.append((name, wire, tuple(shape), begin, end))
    out.sort(key=lambda e: e[3])
    at = 0
    for name, _, _, begin, end in out:
        if begin != at:  # overlapping tensors would alias; holes would hide bytes nobody checks
            raise FormatError(f"{path}: tensor {name!r} starts at data byte {begin}, expected {at} "
                              "(tensors must be contiguous and not overlap); " + _fix(path))
        at = end
    return out


def load_file(path: str | os.PathLike[str]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The tensors (in data order) and the ``__metadata__`` of one safetensors file.

    Each tensor is read into its own array (one copy, no mmap left open, so the
    file may be replaced while the job runs).
    """
    p = Path(path)
    size = p.stat().st_size
    with open(p, "rb") as f:
        doc, data_start = read_header(p, f, size)
        entries = _entries(p, doc, size - data_start)
        model: dict[str, np.ndarray] = {}
        for name, wire, shape, begin, end in entries:
            array = np.empty(shape, dtype=numpy_dtype(wire))
            f.seek(data_start + begin)
            got = f.readinto(array.reshape(-1).view(np.uint8).data) if array.size else 0
            if got != end - begin:
                raise FormatError(f"{p}: tensor {name!r} is truncated ({got} of {end - begin} bytes); " + _fix(p))
            model[name] = array
    meta = doc.get(METADATA_KEY) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise FormatError(f"{p}: __metadata__ must map strings to strings; " + _fix(p))
    return model, dict(meta)


def load_sharded(directory: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """A model saved as shards next to ``model.safetensors.index.json``, in the index's order."""
    d = Path(directory)
    index = d / INDEX_FILE
    try:
        doc = json.loads(index.read_text(encoding="utf-8"))
        weight_map = doc["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError("weight_map must map tensor names to shard file names")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise FormatError(f"{index} cannot be read as a safetensors index ({exc!r}); fix: write it with "
                          "save_pretrained, or give the path of a single .safetensors file") from None
    shards: dict[str, dict[str, np.ndarray]] = {}
    for shard in dict.fromkeys(weight_map.values()):
        shard_path = d / shard
        if Path(shard).name != shard or not shard_path.is_file():
            listed = sum(1 for v in weight_map.values() if v == shard)
            raise FormatError(f"{index} lists shard {shard!r} ({listed} tensors) but {shard_path} does not exist; "
                              "fix: copy every shard the index names into the directory")
        shards[shard] = load_file(shard_path)[0]
    model: dict[str, np.ndarray] = {}
    for name, shard in weight_map.items():
        if name not in shards[shard]:
            raise FormatError(f"{index} places tensor {name!r} in {shard}, which does not hold it; "
                              "fix: re-save the model with save_pretrained")
        model[name] = shards[shard].pop(name)
    extra = [f"{n!r} in {s}" for s, rest in shards.items() for n in rest]
    if extra:
        raise FormatError(f"{index} does not list {', '.join(extra[:5])}; fix: re-save the model with save_pretrained")
    return model


def header_for(model: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None) -> bytes:
    """The length-prefixed, space-padded header of ``model`` with its tensors in model order."""
    doc: dict[str, Any] = {}
    if metadata:
        doc[METADATA_KEY] = {str(k): str(v) for k, v in metadata.items()}
    at = 0
    for name, array in model.items():
        wire = dtype_name(array.dtype)
        doc[name] = {"dtype": _FROM_WIRE[wire], "shape": list(array.shape), "data_offsets": [at, at + array.nbytes]}
        at += array.nbytes
    raw = json.dumps(doc, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-(8 + len(raw)) % _ALIGN)
    return struct.pack("<Q", len(raw)) + raw


def write(f: Any, model: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> None:
    """Write ``model`` as safetensors to the binary file object ``f``."""
    f.write(header_for(model, metadata))
    for array in model.values():
        f.write(as_bytes(array))
