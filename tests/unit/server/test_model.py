"""ModelSpec / check_result: the server's check of a result announcement against the global model."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from fedkube.server.model import (
    SUPPORTED_DTYPES,
    ModelError,
    ModelSpec,
    TensorSpec,
    check_result,
    dtype_name,
    numpy_dtype,
)

SPEC = ModelSpec(
    (
        TensorSpec("conv.weight", "float32", (8, 3, 3, 3)),
        TensorSpec("fc.weight", "float32", (10, 32)),
        TensorSpec("fc.bias", "float32", (10,)),
        TensorSpec("bn.num_batches_tracked", "int64", ()),
    )
)


def test_matching_result_passes_in_any_order() -> None:
    assert check_result(SPEC, list(reversed(SPEC.tensors))) is None


def test_shape_mismatch_names_tensor_and_both_shapes() -> None:
    announced = [t if t.name != "fc.weight" else TensorSpec("fc.weight", "float32", (10, 64)) for t in SPEC]
    msg = check_result(SPEC, announced)
    assert msg is not None
    assert "tensor 'fc.weight' has shape (10, 64), the global model has (10, 32)" in msg


def test_dtype_mismatch_is_a_difference() -> None:
    announced = [t if t.name != "fc.bias" else TensorSpec("fc.bias", "bfloat16", (10,)) for t in SPEC]
    msg = check_result(SPEC, announced)
    assert msg is not None and "tensor 'fc.bias' has dtype bfloat16, the global model has float32" in msg


def test_missing_unexpected_and_duplicate_tensors_are_all_reported() -> None:
    announced = [SPEC["conv.weight"], SPEC["conv.weight"], SPEC["fc.bias"], TensorSpec("extra", "float32", (1,))]
    msg = check_result(SPEC, announced)
    assert msg is not None
    assert "2 tensor(s) of the global model missing: 'fc.weight', 'bn.num_batches_tracked'" in msg
    assert "1 tensor(s) not in the global model: 'extra'" in msg
    assert "sent more than once: 'conv.weight'" in msg


def test_long_lists_are_capped() -> None:
    big = ModelSpec(tuple(TensorSpec(f"t{i}", "float32", (1,)) for i in range(50)))
    msg = check_result(big, [])
    assert msg is not None and "and 45 more" in msg and len(msg) < 400


def test_spec_of_arrays_round_trips_dtypes() -> None:
    model = {name: np.zeros((2, 3), dtype=numpy_dtype(name)) for name in SUPPORTED_DTYPES}
    spec = ModelSpec.of(model)
    assert [t.dtype for t in spec] == list(SUPPORTED_DTYPES)
    assert spec["bfloat16"].np_dtype == np.dtype(ml_dtypes.bfloat16)
    assert spec.nbytes == sum(a.nbytes for a in model.values())


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: TensorSpec("x", "complex64", (1,)), "unsupported dtype 'complex64'"),
        (lambda: TensorSpec("x", "float32", (-1,)), "non-negative"),
        (lambda: TensorSpec("", "float32", (1,)), "non-empty"),
        (lambda: ModelSpec((TensorSpec("a", "float32", ()), TensorSpec("a", "int8", ()))), "appears twice"),
        (lambda: dtype_name(np.dtype(np.complex64)), "cannot be transferred"),
    ],
)
def test_bad_descriptions_raise_clear_errors(make: object, match: str) -> None:
    with pytest.raises(ModelError, match=match):
        make()  # type: ignore[operator]
