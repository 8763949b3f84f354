"""Model files in and out: every format round-trips every dtype bit-exactly, and bad files are refused by name."""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from fedkube import formats
from fedkube.formats import safetensors as st

BF16 = np.dtype(ml_dtypes.bfloat16)


def _model() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "layer.0.weight": rng.standard_normal((3, 4)).astype(np.float32),
        # every bfloat16 bit pattern, NaN payloads and -0 included: only a bit-exact path keeps them all
        "layer.0.lora_A": np.arange(1 << 16, dtype=np.uint16).view(BF16).reshape(256, 256),
        "half": rng.standard_normal(5).astype(np.float16),
        "double": rng.standard_normal(2).astype(np.float64),
        "steps": np.array([7, -1], np.int64),
        "i32": np.array([1, 2, 3], np.int32),
        "i16": np.array([-5], np.int16),
        "i8": np.array([-8], np.int8),
        "u8": np.array([255], np.uint8),
        "mask": np.array([True, False]),
        "empty": np.zeros((0, 3), np.float32),
        "scalar": np.array(2.5, np.float32),
    }


def _assert_same(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert list(got) == list(want)
    for name, array in want.items():
        assert got[name].dtype == array.dtype and got[name].shape == array.shape, name
        assert got[name].tobytes() == array.tobytes(), name


@pytest.mark.parametrize("fmt", formats.FORMATS)
def test_every_format_round_trips_every_dtype_bit_exactly(fmt: formats.Format, tmp_path: Path) -> None:
    if fmt == "torch":
        pytest.importorskip("torch")
    # the name says nothing: the format is read from the bytes
    path = tmp_path / "weights.bin"
    formats.save(_model(), path, fmt, metadata={"job": "j", "round": "3"})
    assert formats.detect(path) == fmt
    _assert_same(formats.load(path), _model())
    assert not list(tmp_path.glob(".tmp-*"))


def test_safetensors_metadata_header_is_written(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    formats.save({"w": np.ones(3, np.float32)}, path, "safetensors", metadata={"job": "mnist", "round": "4"})
    model, meta = st.load_file(path)
    assert meta == {"job": "mnist", "round": "4"} and list(model) == ["w"]
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    assert (8 + n) % 8 == 0  # data aligned as the reference writer aligns it


def test_files_of_the_safetensors_package_load_and_ours_load_in_it(tmp_path: Path) -> None:
    stnp = pytest.importorskip("safetensors.numpy")
    plain = {k: v for k, v in _model().items() if v.dtype != BF16}
    stnp.save_file(plain, str(tmp_path / "theirs.safetensors"), metadata={"a": "b"})
    got = formats.load(tmp_path / "theirs.safetensors")
    assert set(got) == set(plain)
    _assert_same({k: got[k] for k in plain}, plain)
    formats.save(plain, tmp_path / "ours.safetensors", "safetensors")
    back = stnp.load_file(str(tmp_path / "ours.safetensors"))
    _assert_same({k: back[k] for k in plain}, plain)


def test_bfloat16_interoperates_with_safetensors_torch(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    stt = pytest.importorskip("safetensors.torch")
    bits = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16)
    stt.save_file({"w": bits.view(torch.bfloat16)}, str(tmp_path / "t.safetensors"))
    got = formats.load(tmp_path / "t.safetensors")["w"]
    assert got.dtype == BF16 and got.view(np.int16).tobytes() == bits.numpy().tobytes()
    formats.save({"w": got}, tmp_path / "o.safetensors", "safetensors")
    assert torch.equal(stt.load_file(str(tmp_path / "o.safetensors"))["w"].view(torch.int16), bits)


def _shards(tmp_path: Path) -> Path:
    d = tmp_path / "sharded"
    d.mkdir()
    model = _model()
    names = list(model)
    weight_map = {}
    for i, part in enumerate((names[:5], names[5:])):
        shard = f"model-0000{i + 1}-of-00002.safetensors"
        formats.save({n: model[n] for n in part}, d / shard, "safetensors")
        weight_map.update(dict.fromkeys(part, shard))
    (d / st.INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": 1}, "weight_map": weight_map}))
    return d


def test_a_directory_of_shards_loads_in_the_index_order(tmp_path: Path) -> None:
    d = _shards(tmp_path)
    assert formats.detect(d) == "safetensors"
    _assert_same(formats.load(d), _model())


def test_a_shard_set_with_a_missing_shard_names_it(tmp_path: Path) -> None:
    d = _shards(tmp_path)
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(formats.FormatError, match=r"lists shard 'model-00002-of-00002.safetensors' \(7 tensors\)"):
        formats.load(d)


def test_a_truncated_safetensors_file_is_refused_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "cut.safetensors"
    formats.save(_model(), path, "safetensors")
    data = path.read_bytes()
    path.write_bytes(data[:-2])
    with pytest.raises(formats.FormatError, match=rf"{path}: tensor 'scalar' ends at byte .* truncated; fix: re-save"):
        formats.load(path)
    path.write_bytes(data[:5])
    with pytest.raises(formats.FormatError, match="not a model file fedkube knows"):
        formats.load(path)


def test_a_header_claiming_more_bytes_than_the_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "liar.safetensors"
    header = b'{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}'
    path.write_bytes(struct.pack("<Q", 1 << 20) + header + b"\0" * 8)
    with pytest.raises(formats.FormatError, match=r"claims a 1048576-byte safetensors header but the file has only"):
        formats.load(path)
    path.write_bytes(struct.pack("<Q", 1 << 40) + header)
    with pytest.raises(formats.FormatError, match="more than the 100000000 allowed"):
        formats.load(path)


@pytest.mark.parametrize(
    ("info", "message"),
    [
        ({"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}, r"needs 12 bytes"),
        ({"dtype": "U32", "shape": [2], "data_offsets": [0, 8]}, r"dtype 'U32', which fedkube does not carry"),
        ({"dtype": "F32", "shape": [2]}, r"lacks dtype, shape or data_offsets"),
    ],
)
def test_malformed_safetensors_headers_are_refused(tmp_path: Path, info: dict, message: str) -> None:
    raw = json.dumps({"w": info}).encode()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 8)
    with pytest.raises(formats.FormatError, match=message):
        formats.load(path)


class _Bomb:
    """Unpickling this creates the marker file: proof that the object was built."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def test_a_bare_pickle_disguised_as_pt_is_refused_without_unpickling(tmp_path: Path) -> None:
    import pickle

    marker = tmp_path / "pwned"
    path = tmp_path / "model.pt"
    path.write_bytes(pickle.dumps({"w": _Bomb(marker)}))
    with pytest.raises(formats.FormatError, match=r"bare pickle stream .* never unpickles"):
        formats.load(path)
    assert not marker.exists()


def test_a_torch_file_holding_an_object_is_refused_by_weights_only(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    marker = tmp_path / "pwned"
    path = tmp_path / "model.pt"
    torch.save({"w": torch.ones(2), "evil": _Bomb(marker)}, path)
    assert formats.detect(path) == "torch"
    with pytest.raises(formats.FormatError, match=r"refused by torch.load\(weights_only=True\).*fix: torch.save"):
        formats.load(path)
    assert not marker.exists()
    torch.save({"w": torch.ones(2), "lr": 0.1}, path)  # loads under weights_only, but is not a state dict
    with pytest.raises(formats.FormatError, match=r"entries 'lr' are not named tensors"):
        formats.load(path)


def test_a_zip_that_is_neither_npz_nor_torch_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.npz"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("readme.txt", "hi")
    with pytest.raises(formats.FormatError, match=r"neither a numpy \.npz nor a torch\.save file"):
        formats.load(path)


def test_an_npz_with_untagged_bfloat16_names_the_tensor(tmp_path: Path) -> None:
    path = tmp_path / "raw.npz"
    np.savez(path, w=np.ones(2, np.float32).astype(BF16))  # numpy writes it as untyped |V2
    with pytest.raises(formats.FormatError, match=r"tensor 'w' has the untyped dtype \|V2"):
        formats.load(path)
