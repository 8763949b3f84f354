"""The test kubelet's refresh of ConfigMap/Secret volume files: atomic per file, complete, never resurrecting."""

from __future__ import annotations

import os
from pathlib import Path

from fedkube.runtime.objects import write_files
from tests.support.volumesync import STAGING, pinned_volumes, refresh_dir


def _files(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): p.read_text() for p in root.rglob("*") if p.is_file()}


def test_a_changed_object_replaces_changed_files_by_rename_and_drops_removed_keys(tmp_path: Path) -> None:
    vol = tmp_path / "spec"
    vol.mkdir()
    write_files(vol, {"fljob.json": b"old", "gone": b"x", "same": b"s"}, None, None)
    kept_inode = (vol / "same").stat().st_ino
    with (vol / "fljob.json").open() as reader:  # a reader that opened the old file keeps reading the old file
        assert refresh_dir(vol, {"fljob.json": b"new", "same": b"s"}, None, 0o440)
        assert reader.read() == "old"
    assert _files(vol) == {"fljob.json": "new", "same": "s"}  # and no staging directory is left
    assert (vol / "fljob.json").stat().st_mode & 0o777 == 0o440
    assert not (vol / STAGING).exists()
    assert (vol / "same").stat().st_ino != kept_inode  # its mode changed: rewritten too


def test_an_unchanged_object_writes_nothing(tmp_path: Path) -> None:
    vol = tmp_path / "tls"
    vol.mkdir()
    write_files(vol, {"tls.crt": b"c", "tls.key": b"k"}, None, 0o400)
    before = {p.name: p.stat().st_ino for p in vol.iterdir()}
    assert not refresh_dir(vol, {"tls.crt": b"c", "tls.key": b"k"}, None, 0o400)
    assert {p.name: p.stat().st_ino for p in vol.iterdir()} == before


def test_items_place_keys_at_their_paths_with_their_modes(tmp_path: Path) -> None:
    vol = tmp_path / "conf"
    vol.mkdir()
    items = [{"key": "a", "path": "sub/dir/a.txt", "mode": 0o600}]
    assert refresh_dir(vol, {"a": b"1", "b": b"2"}, items, None)
    assert _files(vol) == {"sub/dir/a.txt": "1"}
    assert (vol / "sub" / "dir" / "a.txt").stat().st_mode & 0o777 == 0o600


def test_a_removed_volume_is_not_brought_back(tmp_path: Path) -> None:
    # The pod ended and its Secret files were removed: a late refresh must not write them again.
    vol = tmp_path / "token"
    assert not refresh_dir(vol, {"token": b"secret"}, None, None)
    assert not vol.exists()


def test_a_staging_directory_left_by_a_failed_refresh_is_replaced(tmp_path: Path) -> None:
    vol = tmp_path / "spec"
    (vol / STAGING).mkdir(parents=True)
    (vol / STAGING / "junk").write_text("half")
    assert refresh_dir(vol, {"fljob.json": b"{}"}, None, None)
    assert sorted(os.listdir(vol)) == ["fljob.json"]


def test_volumes_mounted_with_a_sub_path_are_pinned() -> None:
    pod = {"spec": {
        "initContainers": [{"name": "s", "volumeMounts": [{"name": "a", "mountPath": "/a", "subPath": "x"}]}],
        "containers": [{"name": "m", "volumeMounts": [{"name": "b", "mountPath": "/b"},
                                                       {"name": "c", "mountPath": "/c", "subPathExpr": "$(P)"}]}]}}
    assert pinned_volumes(pod) == {"a", "c"}
