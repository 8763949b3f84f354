"""Model files in and out: safetensors, PyTorch state dicts and ``.npz``, told apart by their content.

* safetensors: one file, or a directory of shards with
  ``model.safetensors.index.json`` (read and written by
  :mod:`fedkube.formats.safetensors`, no pickle, bfloat16 included);
* torch: a ``torch.save`` zip of a state dict, loaded with
  ``weights_only=True`` and only when torch is installed;
* npz: ``numpy.savez``, loaded without pickle.

The format is decided by the bytes, never the file name: a zip holding
``data.pkl`` is torch, a zip of ``.npy`` members is npz, an 8-byte length
followed by ``{`` is safetensors; a bare pickle stream (``\\x80``) is refused
without being read. Every format round-trips bfloat16 bit-exactly.

Example::

    from fedkube import formats
    model = formats.load("weights.pt")                  # dict[str, np.ndarray]
    formats.save(model, "out.safetensors", "safetensors", metadata={"round": "3"})
"""

from __future__ import annotations

import contextlib
import os
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import BinaryIO, Literal, get_args

import numpy as np

from fedkube.formats import npz, safetensors, torchfile
from fedkube.formats.errors import FormatError

Format = Literal["safetensors", "npz", "torch"]
FORMATS: tuple[str, ...] = get_args(Format)
SUFFIXES: dict[str, str] = {"safetensors": ".safetensors", "npz": ".npz", "torch": ".pt"}

__all__ = ["FORMATS", "SUFFIXES", "Format", "FormatError", "detect", "load", "save"]

_ZIP = b"PK\x03\x04"
_FIX = (
    "fix: give a .safetensors file (or a directory with model.safetensors.index.json), a torch.save state dict "
    "or a numpy.savez .npz"
)


def detect(path: str | os.PathLike[str]) -> Format:
    """The format of the model file at ``path``, from its first bytes; FormatError for anything else."""
    p = Path(path)
    if p.is_dir():
        if (p / safetensors.INDEX_FILE).is_file() or len(list(p.glob("*.safetensors"))) == 1:
            return "safetensors"
        raise FormatError(f"{p} is a directory without {safetensors.INDEX_FILE} or exactly one .safetensors file; "
                          + _FIX)
    try:
        with open(p, "rb") as f:
            head = f.read(9)
    except FileNotFoundError:
        raise FormatError(f"{p} does not exist; " + _FIX) from None
    except OSError as exc:
        raise FormatError(f"{p} cannot be read: {exc}") from None
    if head.startswith(_ZIP):
        try:
            with zipfile.ZipFile(p) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError) as exc:
            raise FormatError(f"{p} starts like a zip (npz or torch) but is not a readable one ({exc}); it may be "
                              "truncated; " + _FIX) from None
        if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
            return "torch"
        if names and all(n.endswith(".npy") for n in names):
            return "npz"
        raise FormatError(f"{p} is a zip archive but neither a numpy .npz nor a torch.save file; " + _FIX)
    if head[:1] == b"\x80":
        raise FormatError(f"{p} is a bare pickle stream (a raw pickle or the legacy pre-1.6 torch.save format); "
                          "fedkube never unpickles; fix: re-save it with a current torch.save(model.state_dict()) "
                          "or as safetensors")
    if len(head) == 9 and head[8:9] == b"{":
        return "safetensors"
    raise FormatError(f"{p} is not a model file fedkube knows (first bytes {head[:8]!r}); " + _FIX)


def load(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """The tensors of the model file or safetensors directory at ``path``, in the file's order."""
    p = Path(path)
    fmt = detect(p)
    if fmt == "torch":
        return torchfile.load(p)
    if fmt == "npz":
        return npz.load(p)
    if p.is_dir():
        if (p / safetensors.INDEX_FILE).is_file():
            return safetensors.load_sharded(p)
        (p,) = p.glob("*.safetensors")
    return safetensors.load_file(p)[0]


def save(
    model: Mapping[str, np.ndarray],
    path: str | os.PathLike[str],
    fmt: Format,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write ``model`` to ``path`` atomically (a temporary file, fsynced, renamed into place).

    ``metadata`` goes into the safetensors header's ``__metadata__``; the npz
    and torch formats have no place for it and drop it.
    """
    with atomic_file(Path(path)) as f:
        if fmt == "safetensors":
            safetensors.write(f, model, metadata)
        elif fmt == "npz":
            npz.write(f, model)
        elif fmt == "torch":
            torchfile.write(f, model)
        else:
            raise FormatError(f"unknown model format {fmt!r}; use one of {', '.join(FORMATS)}")


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[BinaryIO]:
    """A file to write ``path``'s new content into: fsynced and renamed into place on success, removed on error."""
    tmp = path.with_name(f".tmp-{path.name}")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
