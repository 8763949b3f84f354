"""``fedkube export`` converts any round of a fedkube checkpoint to each format, bfloat16 bit-exactly."""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from fedkube import formats
from fedkube.cli import main
from fedkube.formats import safetensors
from fedkube.server import checkpoint
from fedkube.server.strategy_api import StrategyState


def _checkpoints(root: Path) -> dict[int, dict[str, np.ndarray]]:
    models = {}
    for r in (1, 2):
        models[r] = {"w": np.full((4, 2), r, np.float32).astype(ml_dtypes.bfloat16), "b": np.arange(3) * r}
        checkpoint.save(root, "mnist", r, models[r], StrategyState("fedavg"), metrics={"loss": 1.0 / r})
    return models


@pytest.mark.parametrize("fmt", formats.FORMATS)
def test_export_writes_the_newest_round_in_each_format(fmt: str, tmp_path: Path) -> None:
    if fmt == "torch":
        pytest.importorskip("torch")
    models = _checkpoints(tmp_path / "ckpt")
    out = tmp_path / "model.out"
    assert main(["export", str(tmp_path / "ckpt"), "--format", fmt, "-o", str(out)]) == 0
    got = formats.load(out)
    assert list(got) == ["w", "b"]
    for name, array in models[2].items():
        assert got[name].dtype == array.dtype and got[name].tobytes() == array.tobytes()


def test_export_of_a_named_round_carries_its_metadata(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    models = _checkpoints(tmp_path / "ckpt")
    out = tmp_path / "r1.safetensors"
    assert main(["export", str(tmp_path / "ckpt" / "mnist"), "--round", "1", "-o", str(out)]) == 0
    model, meta = safetensors.load_file(out)
    assert model["b"].tolist() == models[1]["b"].tolist()
    assert (meta["job"], meta["round"], meta["strategy"], meta["metric.loss"]) == ("mnist", "1", "fedavg", "1.0")
    assert main(["export", str(tmp_path / "ckpt"), "--round", "7", "-o", str(out)]) == 1
    assert "has no checkpoint of round 7" in capsys.readouterr().err
    assert main(["export", str(tmp_path), "-o", str(out)]) == 1  # the parent holds no job's rounds
    assert "holds no usable fedkube checkpoint" in capsys.readouterr().err
