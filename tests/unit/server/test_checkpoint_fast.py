"""Checkpoint writes that cost little CPU: checksums reused from publishing, O_DIRECT from the array's memory."""

from __future__ import annotations

import errno
import json
import logging
import mmap
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from fedkube.server import checkpoint
from fedkube.server.checkpoint import DIRECT_ALIGN, CheckpointError, load, load_latest, save
from fedkube.server.strategy_api import StrategyState
from fedkube.transfer.refs import as_bytes, checksum_of

pytestmark = pytest.mark.timeout(30)

F32 = np.dtype(np.float32)


def _aligned(n: int, seed: int) -> np.ndarray:
    """A float32 array of ``n`` elements whose data starts on a page (anonymous mmap)."""
    buf = mmap.mmap(-1, max(n * 4, 1))
    arr = np.frombuffer(buf, F32, count=n)
    arr[...] = np.random.default_rng(seed).standard_normal(n, dtype=np.float32)
    assert arr.ctypes.data % DIRECT_ALIGN == 0
    return arr


def _model() -> dict[str, np.ndarray]:
    return {
        "a": _aligned(4 * DIRECT_ALIGN, 1).reshape(64, -1),  # whole blocks only
        "b": _aligned(3 * DIRECT_ALIGN // 4 + 25, 2),  # three blocks and a 100-byte tail
        "c": _aligned(7, 3),  # smaller than one block
        "d": np.random.default_rng(4).standard_normal(5000).astype(np.float32),  # np.empty: not page-aligned
    }


def _published(model: dict[str, np.ndarray]) -> dict[str, str]:
    return {name: checksum_of(as_bytes(a)) for name, a in model.items()}


def _equal(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert list(a) == list(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert a[name].tobytes() == b[name].tobytes(), name


class Disk:
    """Records the flags of every tensor file the checkpoint opens; os.open and os.write run for real.

    ``refuse`` makes O_DIRECT fail with EINVAL the way a filesystem without it does ("open": at
    open, like tmpfs before Linux 6.6 or ramfs; "write": at the first write, like a device whose
    logical block is larger than 4096). No filesystem here refuses it, so this is the one way to
    reach that path in a test.
    """

    def __init__(self) -> None:
        self.opens: list[tuple[str, int]] = []
        self.refuse = ""


@pytest.fixture
def disk(monkeypatch: pytest.MonkeyPatch) -> Iterator[Disk]:
    import fcntl

    d = Disk()
    real_open, real_write = os.open, os.write

    def spy_open(path: str | os.PathLike[str], flags: int, *args: int, **kwargs: int) -> int:
        if str(path).endswith(".bin"):
            d.opens.append((Path(path).name, flags))
            if d.refuse == "open" and flags & os.O_DIRECT:
                raise OSError(errno.EINVAL, "Invalid argument", str(path))
        return real_open(path, flags, *args, **kwargs)

    def spy_write(fd: int, data: bytes | memoryview) -> int:
        if d.refuse == "write" and fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(checkpoint.os, "open", spy_open)
    monkeypatch.setattr(checkpoint.os, "write", spy_write)
    checkpoint._no_direct_devices.clear()
    yield d
    checkpoint._no_direct_devices.clear()


def _direct_supported(directory: Path) -> bool:
    probe = directory / "probe"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | getattr(os, "O_DIRECT", 0), 0o644)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return False
        raise
    os.close(fd)
    probe.unlink()
    return hasattr(os, "O_DIRECT")


# --- checksums given by the caller ------------------------------------------------------------


def test_given_checksums_are_written_and_the_checkpoint_loads(tmp_path: Path) -> None:
    model = _model()
    state = StrategyState("fedadam", {"step": 1}, {"a": np.full(8, 0.5, F32)})  # same name as a model tensor
    path = save(tmp_path, "job-c", 1, model, state, checksums=_published(model))
    ck = load(path)
    _equal(model, ck.model)
    assert np.array_equal(ck.strategy_state.tensors["a"], state.tensors["a"])
    manifest = json.loads((path / "manifest.json").read_text())
    # The strategy tensor named "a" is hashed here, not given the model tensor's checksum.
    strategy_entry = next(e for e in manifest["tensors"] if e["group"] == "strategy")
    assert strategy_entry["checksum"] == checksum_of(as_bytes(state.tensors["a"]))


def test_a_wrong_given_checksum_is_used_and_load_rejects_the_checkpoint(tmp_path: Path) -> None:
    model = _model()
    checksums = _published(model)
    checksums["b"] = checksum_of(b"not the tensor")
    path = save(tmp_path, "job-c", 1, model, StrategyState("fedavg"), checksums=checksums)
    entry = next(e for e in json.loads((path / "manifest.json").read_text())["tensors"] if e["name"] == "b")
    assert entry["checksum"] == checksums["b"]
    with pytest.raises(CheckpointError, match="'b' fails its checksum"):
        load(path)
    assert load_latest(tmp_path, "job-c") is None  # the only checkpoint is unusable


def test_missing_or_malformed_given_checksums_are_computed(tmp_path: Path) -> None:
    model = _model()
    checksums = {"a": _published(model)["a"], "c": "xxh3:nothex", "unknown": "xxh3:0000000000000000"}
    path = save(tmp_path, "job-c", 1, model, StrategyState("fedavg"), checksums=checksums)
    _equal(model, load(path).model)


def test_checksums_are_read_only_after_every_tensor_file_is_written(tmp_path: Path) -> None:
    model = _model()
    published = _published(model)
    sizes_seen: list[list[int]] = []

    class FilledDuringTheWrite(dict[str, str]):
        """What the server passes: filled in by the next round's publish while the write runs."""

        def get(self, key: str, default: str | None = None) -> str | None:  # type: ignore[override]
            tmp = next((tmp_path / "job-c").glob(".tmp-*"))
            sizes_seen.append(sorted(p.stat().st_size for p in (tmp / "tensors").iterdir()))
            return published.get(key, default)

    save(tmp_path, "job-c", 1, model, StrategyState("fedavg"), checksums=FilledDuringTheWrite())
    every_file = sorted(a.nbytes for a in model.values())
    assert sizes_seen and all(seen == every_file for seen in sizes_seen)


# --- O_DIRECT -------------------------------------------------------------------------------


def test_aligned_tensors_are_written_with_o_direct_and_round_trip(tmp_path: Path, disk: Disk) -> None:
    if not _direct_supported(tmp_path):
        pytest.skip(f"{tmp_path} does not support O_DIRECT")
    model = _model()
    path = save(tmp_path, "job-d", 1, model, StrategyState("fedavg"), checksums=_published(model))
    _equal(model, load(path).model)
    direct = {name: bool(flags & os.O_DIRECT) for name, flags in disk.opens}
    # a, b: page-aligned, at least a block (b's 100-byte tail is written through the page cache);
    # c: smaller than a block; d: np.empty memory, 16 bytes past a page.
    assert direct == {"00000.bin": True, "00001.bin": True, "00002.bin": False, "00003.bin": False}
    for name, a in zip(sorted(direct), model.values(), strict=True):
        assert (path / "tensors" / name).stat().st_size == a.nbytes


@pytest.mark.parametrize("refuse", ["open", "write"])
def test_a_filesystem_refusing_o_direct_gets_buffered_writes_and_one_debug_line(
    tmp_path: Path, disk: Disk, caplog: pytest.LogCaptureFixture, refuse: str
) -> None:
    if not hasattr(os, "O_DIRECT"):
        pytest.skip("no O_DIRECT on this platform")
    disk.refuse = refuse
    model = _model()
    with caplog.at_level(logging.DEBUG, logger="fedkube.server.checkpoint"):
        for r in (1, 2):
            path = save(tmp_path, "job-s", r, model, StrategyState("fedavg"))
            _equal(model, load(path).model)
    refusals = [rec for rec in caplog.records if "refuses O_DIRECT" in rec.getMessage()]
    assert len(refusals) == 1 and refusals[0].levelno == logging.DEBUG
    # Tried for the first aligned tensor of round 1, then never again on that filesystem.
    assert [name for name, flags in disk.opens if flags & os.O_DIRECT] == ["00000.bin"]
    assert len(disk.opens) == (9 if refuse == "open" else 8)  # a refused open is retried without O_DIRECT
