"""The global model as the server sees it: an ordered list of named tensors.

A model is a ``dict[str, np.ndarray]`` whose insertion order is the model's
order; ``ModelSpec`` is its description (name, dtype, shape per tensor), which
is all the server needs to check a client's result announcement before it
downloads a single byte.

Dtype names are the wire's (``fedkube.v1.DType`` lower-cased without the
prefix): float32, float64, float16, bfloat16, int8, int16, int32, int64, uint8,
bool. bfloat16 is numpy's via ml_dtypes, so the server needs no torch; the
dtype table is the transfer layer's (fedkube.transfer.refs).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from fedkube.errors import FedkubeError
from fedkube.protocol import SCAFFOLD_PREFIX
from fedkube.transfer.refs import DTYPE_NAMES
from fedkube.transfer.refs import dtype_name as _transfer_dtype_name
from fedkube.transfer.refs import numpy_dtype as _transfer_numpy_dtype

Model = dict[str, np.ndarray]
"""Name -> array, in model order (dicts keep insertion order)."""

FLOAT_DTYPES = frozenset({"float32", "float64", "float16", "bfloat16"})
SUPPORTED_DTYPES = DTYPE_NAMES


class ModelError(FedkubeError):
    """A model or tensor description is malformed (unknown dtype, bad shape, duplicate name)."""


def numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype for a wire dtype name; raises ModelError naming the supported ones."""
    try:
        return _transfer_numpy_dtype(name)
    except ValueError as exc:
        raise ModelError(str(exc)) from None


def dtype_name(dtype: np.dtype | type) -> str:
    """The wire dtype name of a numpy dtype; raises ModelError for dtypes the wire cannot carry."""
    try:
        return _transfer_dtype_name(dtype)
    except ValueError as exc:
        raise ModelError(str(exc)) from None


class TensorMeta(Protocol):
    """Anything that describes one tensor: TensorSpec, the transfer layer's TensorRef, ..."""

    @property
    def name(self) -> str: ...

    @property
    def dtype(self) -> str: ...

    @property
    def shape(self) -> tuple[int, ...]: ...


@dataclass(frozen=True)
class TensorSpec:
    """Name, wire dtype name and shape of one tensor of the model."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ModelError(f"tensor name must be a non-empty string, got {self.name!r}")
        numpy_dtype(self.dtype)
        shape = tuple(self.shape)
        if any(not isinstance(d, (int, np.integer)) or isinstance(d, bool) or d < 0 for d in shape):
            raise ModelError(f"tensor {self.name!r} has shape {shape}; dimensions must be non-negative integers")
        object.__setattr__(self, "shape", tuple(int(d) for d in shape))

    @classmethod
    def of(cls, name: str, array: np.ndarray) -> TensorSpec:
        """The spec of an array."""
        return cls(name, dtype_name(array.dtype), tuple(array.shape))

    @property
    def np_dtype(self) -> np.dtype:
        return numpy_dtype(self.dtype)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * self.np_dtype.itemsize

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES


@dataclass(frozen=True)
class ModelSpec:
    """The ordered tensors of a model; names are unique."""

    tensors: tuple[TensorSpec, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "tensors", tuple(self.tensors))
        seen: set[str] = set()
        for t in self.tensors:
            if t.name in seen:
                raise ModelError(f"tensor name {t.name!r} appears twice in the model; names must be unique")
            seen.add(t.name)
        object.__setattr__(self, "_by_name", {t.name: t for t in self.tensors})

    @classmethod
    def of(cls, model: Mapping[str, np.ndarray]) -> ModelSpec:
        """The spec of a model (name -> array, in order)."""
        return cls(tuple(TensorSpec.of(name, arr) for name, arr in model.items()))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tensors)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def get(self, name: str) -> TensorSpec | None:
        by_name: dict[str, TensorSpec] = self._by_name  # type: ignore[attr-defined]
        return by_name.get(name)

    def __getitem__(self, name: str) -> TensorSpec:
        spec = self.get(name)
        if spec is None:
            raise KeyError(name)
        return spec

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None

    def __iter__(self) -> Iterator[TensorSpec]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)


_MAX_LISTED = 5


# The init task announces a model the server has never seen, so nothing else bounds how many tensors it names; each
# costs a fetch and a receive buffer (a page, once aligned), so a flood of empty tensors is bounded here. Real models
# have hundreds to a few thousand tensors.
MAX_INIT_TENSORS = 1 << 16


class SizedMeta(TensorMeta, Protocol):
    """An announced tensor with its byte count (the refs check nbytes against dtype and shape when parsed)."""

    @property
    def nbytes(self) -> int: ...


def check_init_result(announced: Sequence[SizedMeta], max_bytes: int) -> str | None:
    """Whether the server may allocate the initial model a client announces, before anything is allocated.

    Returns None when at most :data:`MAX_INIT_TENSORS` tensors of at most
    ``max_bytes`` (``spec.model.maxBytes``) in all are announced, otherwise
    one sentence naming the announced size, the bound and the fix.
    """
    if len(announced) > MAX_INIT_TENSORS:
        return (
            f"the initial model has {len(announced)} tensors, more than the {MAX_INIT_TENSORS} the server accepts "
            "(the trainer must send its model's tensors, not more)"
        )
    total = sum(int(meta.nbytes) for meta in announced)
    if total > max_bytes:
        return (
            f"the initial model announces {total} bytes, more than spec.model.maxBytes={max_bytes}; "
            "raise spec.model.maxBytes (and the server's memory limit, about 2.5x the model) if the model is that big"
        )
    return None


def _shape_str(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def check_result(spec: ModelSpec, announced: Iterable[TensorMeta]) -> str | None:
    """Compare a result's announced tensors with the global model.

    Returns None when the names, dtypes and shapes match exactly (order does
    not matter: aggregation goes by name), otherwise one sentence naming every
    difference (the first few of each kind), e.g. "tensor 'fc.weight' has shape
    (10, 64), the global model has (10, 32)". The server excludes the client
    from the round with this as the reason's message; nothing is downloaded.
    """
    problems: list[str] = []
    seen: set[str] = set()
    duplicates: list[str] = []
    unexpected: list[str] = []
    for meta in announced:
        name, dtype, shape = meta.name, meta.dtype, tuple(int(d) for d in meta.shape)
        if name in seen:
            duplicates.append(name)
            continue
        seen.add(name)
        expected = spec.get(name)
        if expected is None:
            unexpected.append(name)
            continue
        if dtype != expected.dtype:
            problems.append(f"tensor {name!r} has dtype {dtype}, the global model has {expected.dtype}")
        if shape != expected.shape:
            problems.append(
                f"tensor {name!r} has shape {_shape_str(shape)}, the global model has {_shape_str(expected.shape)}"
            )
    missing = [n for n in spec.names if n not in seen]

    def listed(names: list[str]) -> str:
        shown = ", ".join(repr(n) for n in names[:_MAX_LISTED])
        return shown + (f" and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else "")

    if missing:
        problems.insert(0, f"{len(missing)} tensor(s) of the global model missing: {listed(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} tensor(s) not in the global model: {listed(unexpected)}")
    # The reserved prefix (fedkube.server.scaffold) gets its own reason, first, so it is never cut off.
    scaffold_job = any(n.startswith(SCAFFOLD_PREFIX) for n in spec.names)
    if not scaffold_job and any(n.startswith(SCAFFOLD_PREFIX) for n in unexpected):
        problems.insert(0, f"tensors named {SCAFFOLD_PREFIX}* are SCAFFOLD control variates, which only a job with "
                        "spec.strategy.name scaffold takes; drop fedkube.trainer_sdk.scaffold from the script or "
                        "run the job with strategy scaffold")
    elif scaffold_job and any(n.startswith(SCAFFOLD_PREFIX) for n in missing + unexpected):
        problems.insert(0, f"a scaffold job's result carries exactly one control variate delta {SCAFFOLD_PREFIX}"
                        "<tensor> per float tensor of the model (fedkube.trainer_sdk.scaffold sends them)")
    if duplicates:
        problems.append(f"tensor(s) sent more than once: {listed(duplicates)}")
    if not problems:
        return None
    extra = len(problems) - _MAX_LISTED
    text = "; ".join(problems[:_MAX_LISTED]) + (f"; and {extra} more difference(s)" if extra > 0 else "")
    return text + " (the trainer must send tensors with the global model's names, dtypes and shapes)"

