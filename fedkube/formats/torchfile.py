"""PyTorch state dicts (``torch.save`` zip files), only when torch is installed.

Loading always uses ``torch.load(weights_only=True)``: its unpickler builds
tensors and plain containers only, so a file that smuggles any other object
is refused before that object is built. The legacy pre-1.6 format (a bare
pickle stream) is refused by content detection before torch is involved.
torch is imported inside the functions: the server does not need it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fedkube.errors import MissingDependencyError
from fedkube.formats.errors import FormatError
from fedkube.transfer.refs import dtype_name, numpy_dtype


def _torch() -> Any:
    try:
        import torch
    except ImportError:
        raise MissingDependencyError("torch", "reading or writing a PyTorch state dict", extra="torch") from None
    return torch


def _to_numpy(torch: Any, path: Path, name: str, tensor: Any) -> np.ndarray:
    t = tensor.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: move the bits, typed by ml_dtypes
        return np.array(t.view(torch.int16).numpy()).view(numpy_dtype("bfloat16"))
    array = np.array(t.numpy())
    try:
        dtype_name(array.dtype)
    except ValueError:
        raise FormatError(f"{path}: tensor {name!r} has dtype {t.dtype}, which fedkube does not carry; fix: "
                          "convert it (e.g. .float() or .bfloat16()) before torch.save") from None
    return array


def load(path: Path) -> dict[str, np.ndarray]:
    """The tensors of a ``torch.save``'d state dict (str -> Tensor), in its order."""
    torch = _torch()
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, ... for refused files
        raise FormatError(
            f"{path} is refused by torch.load(weights_only=True): {str(exc).splitlines()[0]}; fedkube loads only "
            "tensors; fix: torch.save(model.state_dict(), path) or save the weights as safetensors"
        ) from None
    if not isinstance(obj, Mapping):
        raise FormatError(f"{path} holds a {type(obj).__name__}, not a state dict; fix: "
                          "torch.save(model.state_dict(), path)")
    bad = [repr(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise FormatError(f"{path}: entries {', '.join(bad[:5])} are not named tensors; fix: save a flat state dict "
                          "(torch.save(model.state_dict(), path))")
    return {name: _to_numpy(torch, path, name, t) for name, t in obj.items()}


def write(f: Any, model: Mapping[str, np.ndarray]) -> None:
    """Write ``model`` as a state dict of CPU tensors to the binary file object ``f``."""
    torch = _torch()
    state = {}
    for name, array in model.items():
        a = np.array(array, order="C", copy=True)
        if dtype_name(a.dtype) == "bfloat16":
            state[name] = torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
        else:
            state[name] = torch.from_numpy(a)
    torch.save(state, f)
