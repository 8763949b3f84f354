"""The server's boundary inputs: FLJob spec -> settings, initial model files (never unpickled)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedkube.errors import ConfigError
from fedkube.server import checkpoint
from fedkube.server.app import load_model_file
from fedkube.server.config import settings_from_spec
from fedkube.server.strategies import FedAdam, build_strategy
from fedkube.server.strategy_api import StrategyState
from fedkube.spec import load_job

SPEC = """\
apiVersion: fedkube.dev/v1alpha1
kind: FLJob
metadata: {name: cfgjob}
spec:
  rounds: 4
  clients: [{name: site-a}, {name: site-b}, {name: site-c}]
  strategy: {name: fedadam, serverLr: 0.05}
  model: {source: file, path: /models/init.npz}
  trainer: {image: example/trainer:1, command: [python, train.py]}
  transfer: {chunkBytes: 65536, chunkTimeoutSeconds: 7, idleTimeoutSeconds: 30, maxAttempts: 4}
  timeouts: {roundSeconds: 90, heartbeatSeconds: 12, registrationSeconds: 40}
"""


def test_spec_maps_onto_server_settings_and_strategy() -> None:
    s = settings_from_spec("cfgjob", load_job(SPEC).spec)
    assert s.clients == ("site-a", "site-b", "site-c")
    assert s.min_clients == 3  # default: every client
    assert (s.rounds, s.model_source, s.model_path) == (4, "file", "/models/init.npz")
    assert (s.round_timeout_s, s.heartbeat_timeout_s, s.registration_timeout_s) == (90.0, 12.0, 40.0)
    assert (s.transfer.chunk_bytes, s.transfer.chunk_timeout_s, s.transfer.idle_timeout_s) == (65536, 7.0, 30.0)
    assert s.transfer.max_attempts == 4
    strategy = build_strategy(s.strategy, s.strategy_options)
    assert isinstance(strategy, FedAdam)
    assert strategy.server_lr == pytest.approx(0.05)


def test_npz_model_loads_without_pickle_and_object_arrays_are_refused(tmp_path: Path) -> None:
    good = tmp_path / "init.npz"
    np.savez(good, w=np.arange(6, dtype=np.float32).reshape(2, 3), n=np.array([3], np.int64))
    model = load_model_file(good)
    assert list(model) == ["w", "n"] and model["w"].shape == (2, 3)
    evil = tmp_path / "evil.npz"
    np.savez(evil, w=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ConfigError, match="need pickle to load"):
        load_model_file(evil)
    with pytest.raises(ConfigError, match="does not exist"):
        load_model_file(tmp_path / "missing.npz")
    (tmp_path / "text.npz").write_text("not a zip")
    with pytest.raises(ConfigError, match="not a model file fedkube knows"):
        load_model_file(tmp_path / "text.npz")


def test_model_path_may_be_a_fedkube_checkpoint(tmp_path: Path) -> None:
    weights = {"w": np.full((5,), 1.5, np.float32)}
    checkpoint.save(tmp_path, "otherjob", 7, weights, StrategyState("fedavg"))
    loaded = load_model_file(tmp_path)
    np.testing.assert_array_equal(loaded["w"], weights["w"])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="without a usable fedkube checkpoint"):
        load_model_file(empty)


def test_model_path_may_be_safetensors_found_by_content(tmp_path: Path) -> None:
    import ml_dtypes

    from fedkube import formats

    weights = {"w": np.arange(8, dtype=np.float32).astype(ml_dtypes.bfloat16), "b": np.ones(2, np.float32)}
    hf_dir = tmp_path / "hf"  # what save_pretrained leaves: a directory with one model.safetensors
    hf_dir.mkdir()
    formats.save(weights, hf_dir / "model.safetensors", "safetensors")
    loaded = load_model_file(hf_dir)
    assert list(loaded) == ["w", "b"] and loaded["w"].tobytes() == weights["w"].tobytes()
    (tmp_path / "init.npz").write_bytes((hf_dir / "model.safetensors").read_bytes())  # misnamed, still safetensors
    assert load_model_file(tmp_path / "init.npz")["b"].tolist() == [1.0, 1.0]
