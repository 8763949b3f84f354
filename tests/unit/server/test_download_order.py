"""Each participant's result is pulled from its own starting tensor, so first contributions (and folds) split evenly."""

from __future__ import annotations

import numpy as np

from fedkube.server.downloads import rotated as _rotated
from fedkube.transfer.refs import TensorRef


def _refs(n: int) -> list[TensorRef]:
    return [
        TensorRef.for_array(np.zeros(4, np.float32), source="s", transaction_id="t", ref_id=f"r{i}", name=f"w{i}",
                            checksum="xxh3_64:" + "0" * 16)
        for i in range(n)
    ]


def test_participants_start_at_evenly_spaced_tensors_and_pull_every_one() -> None:
    refs = _refs(16)
    sites = {"site-b": "t2", "site-a": "t1"}
    a, b = _rotated(refs, "site-a", sites), _rotated(refs, "site-b", sites)
    assert a == refs  # the first site in name order starts at tensor 0
    assert b[0] is refs[8] and b[-1] is refs[7]  # the second one halfway
    assert sorted(r.name for r in b) == sorted(r.name for r in refs)
    three = {"x": 1, "y": 2, "z": 3}
    assert [_rotated(refs, s, three)[0].name for s in ("x", "y", "z")] == ["w0", "w5", "w10"]


def test_a_lone_or_unknown_site_keeps_the_published_order() -> None:
    refs = _refs(5)
    assert _rotated(refs, "only", {"only": 1}) == refs
    assert _rotated(refs, "late", {"a": 1, "b": 2}) == refs  # not a participant of the round (a re-sent task)
    assert _rotated([], "a", {"a": 1, "b": 2}) == []
