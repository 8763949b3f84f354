"""fedkube.server.revocation: reading spec.revokedSites from the mounted spec file, and the set that only grows."""

from __future__ import annotations

import json
import threading
from pathlib import Path

from fedkube.server.revocation import RevokedSites, SpecWatch, read_revoked


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_read_revoked_takes_json_and_yaml_and_says_none_for_a_file_it_cannot_read(tmp_path: Path) -> None:
    assert read_revoked(_write(tmp_path / "job.json", json.dumps({"spec": {"revokedSites": ["b"]}}))) == ["b"]
    assert read_revoked(_write(tmp_path / "job.yaml", "spec:\n  revokedSites: [a, c]\n")) == ["a", "c"]
    assert read_revoked(_write(tmp_path / "none.json", json.dumps({"spec": {"rounds": 2}}))) == []
    assert read_revoked(_write(tmp_path / "half.json", '{"spec": {"revokedSi')) is None  # swapped mid-write
    assert read_revoked(tmp_path / "gone.json") is None


def test_the_watch_acts_once_per_new_name_and_never_forgets_one(tmp_path: Path) -> None:
    spec = _write(tmp_path / "job.json", json.dumps({"spec": {}}))
    revoked = RevokedSites(["a"])
    seen: list[str] = []
    two = threading.Event()

    def on_revoked(site: str) -> None:
        seen.append(site)
        if len(seen) == 2:
            two.set()

    watch = SpecWatch(spec, revoked, on_revoked, job="j", interval=0.02).start()
    try:
        _write(spec, json.dumps({"spec": {"revokedSites": ["a", "b", "c"]}}))
        assert two.wait(5), seen
        _write(spec, "{not json")  # a half-written file changes nothing
        _write(spec, json.dumps({"spec": {"revokedSites": []}}))
        assert watch.poll() == []
    finally:
        watch.stop()
    assert seen == ["b", "c"] and revoked.names == {"a", "b", "c"} and "b" in revoked
