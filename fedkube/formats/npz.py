"""``.npz`` model files: one array per tensor name, loaded without pickle.

numpy has no bfloat16 of its own: ``np.savez`` writes ml_dtypes' bfloat16 as a
2-byte void (``|V2``) that loads back untyped. So bfloat16 tensors are stored
as their uint16 bit patterns and :data:`DTYPES_KEY` (a JSON string array,
not an object array, so no pickle) names their real dtype; loading views the
bits back, bit-exactly.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fedkube.formats.errors import FormatError
from fedkube.transfer.refs import dtype_name, numpy_dtype

DTYPES_KEY = "__fedkube_dtypes__"
_VIEWED = {"bfloat16": np.dtype("<u2")}


def load(path: Path) -> dict[str, np.ndarray]:
    """The tensors of an ``.npz`` file, in the file's order."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except ValueError as exc:  # object arrays would need pickle: refused
        raise FormatError(f"{path} holds arrays that need pickle to load ({exc}); fedkube never unpickles; fix: "
                          "save plain numeric arrays with numpy.savez") from None
    except OSError as exc:
        raise FormatError(f"{path} is not a readable .npz file: {exc}; fix: save the weights with numpy.savez") \
            from None
    tags: dict[str, str] = {}
    if DTYPES_KEY in arrays:
        try:
            tags = json.loads(str(arrays.pop(DTYPES_KEY)))
            if not isinstance(tags, dict):
                raise ValueError("not an object")
        except ValueError as exc:
            raise FormatError(f"{path}: {DTYPES_KEY} is not a JSON object of dtype names ({exc})") from None
    model: dict[str, np.ndarray] = {}
    for name, array in arrays.items():
        tag = tags.get(name)
        if tag is not None:
            wanted = numpy_dtype(str(tag))
            if array.dtype.itemsize != wanted.itemsize:
                raise FormatError(f"{path}: tensor {name!r} is tagged {tag} but stored as {array.dtype}")
            array = array.view(wanted)
        elif array.dtype.kind == "V":
            raise FormatError(f"{path}: tensor {name!r} has the untyped dtype {array.dtype} (numpy.savez of a "
                              "bfloat16 array loses its type); fix: convert it with `fedkube export` or save it as "
                              "safetensors")
        model[name] = array
    return model


def write(f: Any, model: Mapping[str, np.ndarray]) -> None:
    """Write ``model`` as ``.npz`` to the binary file object ``f`` (uncompressed: weights do not compress)."""
    arrays: dict[str, np.ndarray] = {}
    tags: dict[str, str] = {}
    for name, array in model.items():
        if name == DTYPES_KEY:
            raise FormatError(f"tensor name {DTYPES_KEY!r} is reserved by the .npz format of fedkube")
        wire = dtype_name(array.dtype)
        if wire in _VIEWED:
            tags[name] = wire
            array = np.array(array, order="C").view(_VIEWED[wire])
        arrays[name] = array
    if tags:
        arrays[DTYPES_KEY] = np.array(json.dumps(tags))
    np.savez(f, **arrays)  # type: ignore[arg-type]
