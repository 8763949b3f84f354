"""``FLModel`` and the numpy <-> torch conversions the SDK needs.

torch is optional: it is imported only inside the functions that need it,
and its absence is reported with the package to install (LESSONS.md 23).
Conversions share memory wherever the dtype allows; bfloat16, which numpy
lacks, travels as ``ml_dtypes.bfloat16`` on the numpy side and is converted
through an int16 view of the same bytes, so it round-trips bit-exactly.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import ml_dtypes
import numpy as np

from fedkube.errors import MissingDependencyError
from fedkube.trainer_sdk.errors import InvalidParamsError

if TYPE_CHECKING:
    import torch

_BF16 = np.dtype(ml_dtypes.bfloat16)


@dataclass
class FLModel:
    """A model update travelling between the server and a trainer.

    Attributes:
        params: tensor name -> ``np.ndarray`` (or ``torch.Tensor`` when sending). ``None`` in a
            task that asks for initial weights (``config["fedkube.task"] == "init"``), and in a
            metrics-only result.
        num_examples: how many examples produced this update (FedAvg weighs results by it).
        metrics: scalar metrics of this update (e.g. ``{"loss": 0.12}``).
        round: the round this model belongs to (0 for the init task).
        total_rounds: the job's number of rounds, so a script can tell the last one.
        config: the task's settings from the server (strings).
    """

    params: dict[str, Any] | None = None
    num_examples: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    round: int = 0
    total_rounds: int = 0
    config: dict[str, str] = field(default_factory=dict)

    def params_torch(self) -> dict[str, torch.Tensor] | None:
        """``params`` as CPU torch tensors sharing the same memory (no copy); None if there are none.

        Raises ``MissingDependencyError`` when torch is not installed.
        """
        if self.params is None:
            return None
        return {name: to_torch(value) for name, value in self.params.items()}


def _torch() -> Any:
    try:
        import torch
    except ImportError:
        raise MissingDependencyError("torch", "FLModel.params_torch() / sending torch tensors", "torch") from None
    return torch


def _is_torch_tensor(value: Any) -> bool:
    # Checked by module name so that numpy-only scripts never import torch.
    mod = type(value).__module__
    return mod == "torch" or mod.startswith("torch.")


def to_torch(value: Any) -> torch.Tensor:
    """A CPU torch tensor sharing ``value``'s memory (``value``: np.ndarray or torch.Tensor)."""
    torch = _torch()
    if isinstance(value, torch.Tensor):
        return value
    arr = np.asarray(value)
    if arr.dtype == _BF16:
        return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(arr)


def to_numpy(name: str, value: Any) -> np.ndarray:
    """A numpy view of ``value`` for sending, without a copy where possible.

    CPU torch tensors become views of the same memory (``.numpy()``); a GPU
    tensor must be copied to host memory once; non-contiguous data is copied
    by the transfer layer when it serializes.
    """
    if isinstance(value, np.ndarray):
        return value
    if _is_torch_tensor(value):
        torch = _torch()
        t = value.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy().view(_BF16)
        return t.numpy()
    if isinstance(value, np.generic):
        return np.asarray(value)
    raise InvalidParamsError(
        f"params[{name!r}] is a {type(value).__name__}; send numpy arrays or torch tensors "
        "(e.g. np.asarray(x) or torch.as_tensor(x))"
    )


def params_to_numpy(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Every value of ``params`` as a numpy array (views, not copies, wherever possible)."""
    if not isinstance(params, Mapping):
        raise InvalidParamsError(
            f"FLModel.params must be a dict of name -> array, got {type(params).__name__}; "
            "fix: e.g. params=dict(model.state_dict())"
        )
    out = {}
    for name, value in params.items():
        if not isinstance(name, str):
            raise InvalidParamsError(f"FLModel.params keys must be str tensor names, got {name!r}")
        out[name] = to_numpy(name, value)
    return out
