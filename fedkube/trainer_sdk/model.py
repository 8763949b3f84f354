"""``FLModel`` and the numpy <-> torch conversions the SDK needs.

torch is optional: it is imported only inside the functions that need it,
and its absence is reported with the package to install (LESSONS.md 23).
Conversions share memory wherever the dtype allows; bfloat16, which numpy
lacks, travels as ``ml_dtypes.bfloat16`` on the numpy side and is converted
through an int16 view of the same bytes, so it round-trips bit-exactly.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import ml_dtypes
import numpy as np

from fedkube import protocol
from fedkube.errors import MissingDependencyError
from fedkube.trainer_sdk.errors import InvalidParamsError

if TYPE_CHECKING:
    import torch

_BF16 = np.dtype(ml_dtypes.bfloat16)
#: ``ResultAnnouncement.num_examples`` is a uint64.
MAX_NUM_EXAMPLES = (1 << 64) - 1


@dataclass
class FLModel:
    """A model update travelling between the server and a trainer.

    Attributes:
        params: tensor name -> ``np.ndarray`` (or ``torch.Tensor`` when sending). ``None`` in a
            task that asks for initial weights (``config["fedkube.task"] == "init"``), and in a
            metrics-only result.
        num_examples: how many examples produced this update (FedAvg weighs results by it): a
            whole number from 0 to 2**64-1, and above 0 in the result of a training task (the
            server refuses a training result of weight 0); 0 (the default) fits an init task.
        metrics: scalar metrics of this update (e.g. ``{"loss": 0.12}``).
        round: the round this model belongs to (0 for the init task).
        total_rounds: the job's number of rounds, so a script can tell the last one.
        config: the task's settings from the server (strings); ``config["fedkube.task"]`` is the
            task's kind, also as :attr:`kind`.
    """

    params: dict[str, Any] | None = None
    num_examples: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    round: int = 0
    total_rounds: int = 0
    config: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_num_examples(self.num_examples)

    @property
    def kind(self) -> str:
        """The kind of task this model came with: ``"train"``, ``"evaluate"`` or ``"init"`` ("" when built by hand).

        An ``"evaluate"`` task (``spec.evaluation``) asks the script to measure
        ``params``, the current global model, on its held-out data and send
        ``FLModel(num_examples=n, metrics={...})``: metrics only.
        """
        return self.config.get(protocol.TASK_KIND_KEY, "")

    def params_torch(self) -> dict[str, torch.Tensor] | None:
        """``params`` as CPU torch tensors sharing the same memory (no copy); None if there are none.

        Raises ``MissingDependencyError`` when torch is not installed.
        """
        if self.params is None:
            return None
        return {name: to_torch(value) for name, value in self.params.items()}


def check_num_examples(value: Any, *, training: bool = False) -> int:
    """``value`` as a result's example count; InvalidParamsError naming the value and the fix.

    ``training``: the result answers a training or evaluate task, whose weight must be
    positive (the server refuses 0 as an invalid result, which would cost the
    site the round; the SDK says so before anything is sent).
    """
    if isinstance(value, bool):
        n = None
    else:
        try:
            n = operator.index(value)  # int, numpy and torch integers; never a float that would be truncated
        except TypeError:
            n = None
    if n is None:
        raise InvalidParamsError(
            f"FLModel.num_examples is {value!r} ({type(value).__name__}), not a whole number of examples; "
            "fix: pass an int, e.g. num_examples=len(train_dataset)"
        )
    if not 0 <= n <= MAX_NUM_EXAMPLES:
        raise InvalidParamsError(
            f"FLModel.num_examples is {n}, outside 0..2**64-1; fix: pass how many examples this update was "
            "trained on, e.g. num_examples=len(train_dataset)"
        )
    if training and n == 0:
        raise InvalidParamsError(
            "FLModel.num_examples is 0 in the result of a training task (or an evaluate task); the server weighs "
            "each result by it (FedAvg, and an evaluation's metrics) and refuses a weight of 0; fix: pass how many "
            "examples this update was trained on, e.g. num_examples=len(train_dataset) (for an evaluate task: "
            "the held-out examples measured)"
        )
    return n


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


# --- receiving into the caller's buffers (``fk.receive(into=...)``) -------------------------------


class ReceiveTarget:
    """Where one received tensor lands, and what the caller gets back under its name.

    ``buffer()`` is the array the transfer layer writes; ``done()`` runs once
    the tensor arrived; ``result`` is handed to the caller (the object passed
    in ``into``). A CPU array or tensor is its own buffer. A tensor on another
    device (a GPU) gets a host buffer of that one tensor when its turn comes,
    copied over in ``done()``, so the host never holds the whole model.
    """

    def __init__(self, result: Any, array: np.ndarray | None) -> None:
        self.result = result
        self.array = array  # None: staged through host memory in buffer()
        self._host: Any = None

    def buffer(self) -> np.ndarray:
        if self.array is not None:
            return self.array
        torch = _torch()
        self._host = torch.empty(tuple(self.result.shape), dtype=self.result.dtype)
        staged, _ = _writable_view(self._host)
        assert staged is not None  # its dtype was checked when the target was chosen
        return staged

    def done(self) -> None:
        if self._host is not None:
            torch = _torch()
            with torch.no_grad():
                self.result.copy_(self._host)
            self._host = None


def into_params(into: Any) -> Mapping[str, Any] | None:
    """The name -> buffer mapping of ``receive(into=...)``: an FLModel's params, a mapping, or None."""
    if into is None:
        return None
    if isinstance(into, FLModel):
        return into.params
    if isinstance(into, Mapping):
        return into
    raise InvalidParamsError(
        f"receive(into=...) takes an FLModel or a dict of name -> array, got {type(into).__name__}; "
        "fix: pass the params you sent last round (e.g. into=model) or net.state_dict()"
    )


def _writable_view(value: Any) -> tuple[np.ndarray | None, str]:
    """A numpy array sharing ``value``'s memory that may be written, or None and why not."""
    if isinstance(value, np.ndarray):
        arr = value
    elif _is_torch_tensor(value):
        torch = _torch()
        t = value.detach()
        if t.dtype == torch.bfloat16:
            t = t.view(torch.int16)
        try:
            arr = t.numpy()
        except (RuntimeError, TypeError) as exc:  # a dtype numpy lacks
            return None, f"its torch dtype has no numpy view ({exc})"
        if value.dtype == torch.bfloat16:
            arr = arr.view(_BF16)
    else:
        return None, f"it is a {type(value).__name__}, not an array or tensor"
    if not arr.flags.c_contiguous:
        return None, "it is not C-contiguous"
    if not arr.flags.writeable:
        return None, "it is read-only"
    return arr, ""


def receive_target(value: Any, shape: tuple[int, ...], dtype: np.dtype) -> tuple[ReceiveTarget | None, str]:
    """The target for a tensor of ``shape``/``dtype`` in ``value`` (an ``into`` entry), or None and why not."""
    if _is_torch_tensor(value) and value.device.type != "cpu":
        torch = _torch()
        probe, why = _writable_view(torch.empty((0,), dtype=value.dtype))
        if probe is None:
            return None, why
        have = tuple(value.shape)
        if have != shape or probe.dtype != dtype:
            return None, f"it is {probe.dtype}{list(have)}, the tensor is {dtype}{list(shape)}"
        return ReceiveTarget(value, None), ""
    arr, why = _writable_view(value)
    if arr is None:
        return None, why
    if arr.shape != shape or arr.dtype != dtype:
        return None, f"it is {arr.dtype}{list(arr.shape)}, the tensor is {dtype}{list(shape)}"
    return ReceiveTarget(value, arr), ""


def overlapping(targets: Mapping[str, ReceiveTarget]) -> list[str]:
    """Names whose target memory overlaps an earlier target's (tied weights): they cannot both be written."""
    spans = []
    for name, t in targets.items():
        if t.array is not None and t.array.nbytes:
            start = t.array.ctypes.data
            spans.append((start, start + t.array.nbytes, name))
    spans.sort()
    clash: list[str] = []
    end = -1
    for start, stop, name in spans:
        if start < end:
            clash.append(name)  # not written, so it does not extend the covered span
        else:
            end = stop
    return clash
