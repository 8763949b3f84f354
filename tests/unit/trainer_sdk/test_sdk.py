"""Trainer SDK: FLModel conversions (numpy, torch, bf16) and the errors users meet first."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch

import fedkube.trainer_sdk as fk
from fedkube import envvars
from fedkube.errors import ConfigError
from fedkube.trainer_sdk._hooks import failure_kind
from fedkube.trainer_sdk._session import Session, SessionSettings
from fedkube.trainer_sdk.model import (
    ReceiveTarget,
    into_params,
    overlapping,
    params_to_numpy,
    receive_target,
    to_numpy,
    to_torch,
)
from fedkube.wire.v1 import control_pb2

ROOT = Path(__file__).resolve().parents[3]


def test_params_torch_shares_memory_with_the_received_arrays() -> None:
    arrays = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "i": np.arange(3, dtype=np.int64)}
    model = fk.FLModel(params=arrays)
    tensors = model.params_torch()
    assert tensors is not None
    tensors["w"][0, 0] = 42.0
    assert arrays["w"][0, 0] == 42.0  # same memory: updating in place needs no copy
    assert tensors["i"].dtype == torch.int64
    assert fk.FLModel().params_torch() is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_torch_round_trip_is_bit_exact(dtype: torch.dtype) -> None:
    t = torch.randn(64, 17).to(dtype)
    t[0, :4] = torch.tensor([float("inf"), float("-inf"), -0.0, float("nan")]).to(dtype)
    raw = t.view(torch.uint8).numpy().tobytes()  # every bit, NaN payloads and -0.0 included
    arr = to_numpy("t", t)
    if dtype == torch.bfloat16:
        assert arr.dtype == np.dtype(ml_dtypes.bfloat16)
    assert arr.tobytes() == raw
    back = to_torch(arr)
    assert back.dtype == dtype
    assert back.view(torch.uint8).numpy().tobytes() == raw


def test_sending_cpu_tensors_makes_no_copy() -> None:
    t = torch.zeros(1000)
    arr = to_numpy("t", t.requires_grad_(False))
    arr[3] = 7.0
    assert t[3].item() == 7.0
    b = torch.zeros(10, dtype=torch.bfloat16)
    barr = to_numpy("b", b)
    barr[1] = 2.5
    assert b[1].item() == 2.5
    grad = torch.ones(3, requires_grad=True)
    assert to_numpy("g", grad).tolist() == [1.0, 1.0, 1.0]


def test_bad_params_say_what_to_send() -> None:
    with pytest.raises(fk.InvalidParamsError, match=r"params\['w'\] is a list"):
        params_to_numpy({"w": [1, 2]})
    with pytest.raises(fk.InvalidParamsError, match="must be a dict"):
        params_to_numpy([np.zeros(1)])  # type: ignore[arg-type]


def test_params_torch_without_torch_names_the_package(tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import numpy as np, fedkube.trainer_sdk as fk\n"
        "from fedkube.errors import MissingDependencyError\n"
        "try:\n"
        "    fk.FLModel(params={'w': np.zeros(2)}).params_torch()\n"
        "except MissingDependencyError as e:\n"
        "    print('MISSING', e)\n"
        "print('torch imported' if sys.modules.get('torch') else 'no torch')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert "MISSING" in out.stdout and "'torch'" in out.stdout and "pip install" in out.stdout, out.stderr
    assert "no torch" in out.stdout


def test_sdk_import_does_not_import_torch() -> None:
    code = "import sys, fedkube.trainer_sdk; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr


def test_sdk_import_does_not_import_prometheus_client_or_the_sidecar() -> None:
    """The SDK runs inside user scripts: it takes the wire vocabulary from fedkube.protocol, not from metrics."""
    code = (
        "import sys, fedkube.trainer_sdk\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'prometheus_client'\n"
        "             or m.startswith(('fedkube.metrics', 'fedkube.sidecar', 'fedkube.server'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


def test_calls_before_init_fail_with_the_fix() -> None:
    with pytest.raises(fk.NotInitializedError, match=r"fk.receive\(\) was called before fk.init\(\)"):
        fk.receive()
    with pytest.raises(fk.NotInitializedError, match=r"before fk\.init"):
        fk.send(fk.FLModel())


def test_init_without_environment_names_the_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(envvars.SIDECAR_ADDRESS, raising=False)
    monkeypatch.delenv(envvars.SITE, raising=False)
    with pytest.raises(fk.SDKError, match=f"{envvars.SIDECAR_ADDRESS} and {envvars.SITE} not set"):
        fk.init()


def test_unreachable_sidecar_names_address_and_variable() -> None:
    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket is closed
    with pytest.raises(fk.SidecarUnreachableError) as info:
        Session(f"127.0.0.1:{port}", site="a", job="j", settings=SessionSettings(connect_timeout_s=0.5)).connect()
    msg = str(info.value)
    assert f"127.0.0.1:{port}" in msg and envvars.SIDECAR_ADDRESS in msg and "fix:" in msg


def test_failure_kinds_of_unhandled_exceptions() -> None:
    assert failure_kind(ValueError("x")) == control_pb2.FAILURE_KIND_EXCEPTION
    assert failure_kind(ConfigError("bad lr")) == control_pb2.FAILURE_KIND_CONFIG_ERROR
    assert failure_kind(KeyboardInterrupt()) == control_pb2.FAILURE_KIND_ABORTED


def test_default_logging_only_when_the_script_configured_none(monkeypatch: pytest.MonkeyPatch) -> None:
    import logging

    from fedkube.trainer_sdk import _default_logging

    root = logging.getLogger()
    theirs = logging.NullHandler()
    monkeypatch.setattr(root, "handlers", [theirs])
    monkeypatch.setattr(root, "level", logging.WARNING)
    _default_logging()
    assert root.handlers == [theirs] and root.level == logging.WARNING  # the script's setup stands
    monkeypatch.setattr(root, "handlers", [])
    _default_logging()
    assert len(root.handlers) == 1 and root.level == logging.INFO
    _default_logging()
    assert len(root.handlers) == 1  # never a second handler (no doubled lines)


def test_receive_targets_write_into_the_callers_memory_or_say_why_not() -> None:
    arr = np.zeros((4, 5), np.float32)
    target, why = receive_target(arr, (4, 5), np.dtype(np.float32))
    assert target is not None and why == "" and target.buffer() is arr and target.result is arr
    t = torch.zeros(8, dtype=torch.bfloat16, requires_grad=True)  # a Parameter-like leaf: written without autograd
    target, _ = receive_target(t, (8,), np.dtype(ml_dtypes.bfloat16))
    assert target is not None
    target.buffer()[:] = np.arange(8).astype(ml_dtypes.bfloat16)
    target.done()
    assert t.detach().tolist() == list(range(8)) and target.result is t
    assert receive_target(arr, (5, 4), np.dtype(np.float32))[1] == "it is float32[4, 5], the tensor is float32[5, 4]"
    assert receive_target(arr.T, (5, 4), np.dtype(np.float32))[1] == "it is not C-contiguous"
    assert receive_target([1.0], (1,), np.dtype(np.float32))[1] == "it is a list, not an array or tensor"


def test_a_device_tensor_is_filled_through_one_host_buffer_at_a_time() -> None:
    # The staging path of a GPU tensor, driven on a CPU tensor (CI has no GPU): the host buffer exists only
    # between buffer() and done(), and done() copies it into the caller's tensor.
    t = torch.zeros(3, 4)
    target = ReceiveTarget(t, None)
    host = target.buffer()
    assert host.ctypes.data != t.data_ptr()  # a separate buffer, not the tensor itself
    host[:] = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert t.sum().item() == 0
    target.done()
    assert t.flatten().tolist() == list(range(12)) and target._host is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_tensor_is_a_receive_target() -> None:
    t = torch.zeros(16, device="cuda")
    target, why = receive_target(t, (16,), np.dtype(np.float32))
    assert target is not None and target.array is None, why
    target.buffer()[:] = np.arange(16, dtype=np.float32)
    target.done()
    assert t.cpu().tolist() == list(range(16))


def test_overlapping_receive_targets_are_found() -> None:
    base = np.zeros(100, np.uint8)
    targets = {
        "a": ReceiveTarget(None, base[:40]),
        "b": ReceiveTarget(None, base[40:80]),  # adjacent to a: fine
        "c": ReceiveTarget(None, base[70:90]),  # overlaps b
        "d": ReceiveTarget(None, np.zeros(10, np.uint8)),
        "e": ReceiveTarget(None, base[:0]),  # empty: holds no bytes
    }
    assert overlapping(targets) == ["c"]
    with pytest.raises(fk.InvalidParamsError, match="takes an FLModel or a dict"):
        into_params((np.zeros(1),))
    assert into_params(fk.FLModel(params={"x": base})) == {"x": base}
