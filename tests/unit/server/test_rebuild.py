"""Taking a discarded client out exactly: emptied tensors are rebuilt from the other contributors.

A result rejected (NaN/Inf) or cut off after some of its tensors were folded
must leave nothing behind: ``WeightedMean.discard`` empties those tensors and
names their other contributors, whose tensors ``refold`` folds again.
"""

from __future__ import annotations

import threading

import ml_dtypes
import numpy as np
import pytest

from fedkube.server.aggregate import InvalidResultError, WeightedMean
from fedkube.server.model import ModelSpec

DTYPES = [np.dtype(np.float32), np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16), np.dtype(np.int64)]


def _values(dtype: np.dtype, n: int, size: int, seed: int) -> tuple[list[np.ndarray], list[float]]:
    rng = np.random.default_rng(seed)
    xs = [(rng.standard_normal(size) * 3 + i).astype(np.float32).astype(dtype) for i in range(n)]
    ws = [float(w) for w in rng.integers(1, 1000, size=n)]
    return xs, ws


def _fresh(order: list[tuple[str, np.ndarray, float]]) -> np.ndarray:
    """The mean of a one-tensor aggregator that only ever saw ``order`` (client, array, weight)."""
    wm = WeightedMean(ModelSpec.of({"a": order[0][1]}))
    for client, array, weight in order:
        wm.add(client, "a", array, weight)
    for client in dict.fromkeys(c for c, *_ in order):
        wm.commit(client)
    return wm.means()["a"]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rebuilt_tensor_equals_the_mean_of_exactly_the_remaining_clients(dtype: np.dtype) -> None:
    xs, ws = _values(dtype, 4, 1000, seed=1)
    model = {"a": xs[0], "b": xs[0]}
    wm = WeightedMean(ModelSpec.of(model))
    for i in (0, 1, 2):
        wm.add(f"c{i}", "a", xs[i], ws[i])
    wm.add("c3", "a", xs[3], ws[3] * 10)  # the heaviest: an integer tensor would take its value
    for i in (0, 1, 2):
        wm.add(f"c{i}", "b", xs[i], ws[i])
        wm.commit(f"c{i}")
    outcome = wm.discard("c3")  # its download of 'b' failed
    assert outcome.rebuild == {"a": ("c0", "c1", "c2")}
    assert wm.owed() == {"a": ("c0", "c1", "c2")}
    for client in ("c2", "c0", "c1"):  # the rebuild downloads end in any order
        assert wm.refold(client, "a", xs[int(client[1])])
    assert wm.owed() == {}
    means = wm.means()
    # Bit for bit what an aggregator that never saw c3 gives for the same fold order.
    np.testing.assert_array_equal(means["a"], _fresh([(f"c{i}", xs[i], ws[i]) for i in (2, 0, 1)]))
    if dtype.kind not in "iub":
        ref = sum(w * x.astype(np.float64) for w, x in zip(ws[:3], xs[:3], strict=True)) / sum(ws[:3])
        np.testing.assert_allclose(means["a"], ref, rtol=1e-6, atol=1e-6)
    else:
        heaviest = int(np.argmax(ws[:3]))
        np.testing.assert_array_equal(means["a"], xs[heaviest])
    assert wm.contributors("a") == ("c2", "c0", "c1")


def test_a_poisoned_contribution_folded_then_discarded_leaves_no_trace() -> None:
    xs, ws = _values(np.dtype(np.float32), 3, 4096, seed=2)
    model = {"a": xs[0], "b": xs[0]}
    huge = np.full(4096, 1e6, np.float32)
    nan = xs[2].copy()
    nan[7] = np.nan
    wm = WeightedMean(ModelSpec.of(model))
    wm.add("c0", "a", xs[0], ws[0])
    wm.add("bad", "a", huge, 1000.0)  # folded: its weight dominates the running mean
    wm.add("c1", "a", xs[1], ws[1])
    with pytest.raises(InvalidResultError, match="NaN or Inf"):
        wm.add("bad", "b", nan, 1000.0)
    outcome = wm.discard("bad")
    assert outcome.rebuild == {"a": ("c0", "c1")}
    for i in (0, 1):
        wm.add(f"c{i}", "b", xs[i], ws[i])
        wm.commit(f"c{i}")
    assert wm.refold("c0", "a", xs[0]) and wm.refold("c1", "a", xs[1])
    means = wm.means()
    ref = (ws[0] * xs[0].astype(np.float64) + ws[1] * xs[1].astype(np.float64)) / (ws[0] + ws[1])
    # Within float32 rounding of the two remaining clients (the 1e6 would cost ~0.06 of absolute precision).
    np.testing.assert_allclose(means["a"], ref, rtol=0, atol=4 * np.finfo(np.float32).eps * np.abs(ref).max())
    np.testing.assert_array_equal(means["a"], _fresh([("c0", xs[0], ws[0]), ("c1", xs[1], ws[1])]))


def test_a_tensor_emptied_while_other_downloads_are_in_flight_takes_their_contributions_normally() -> None:
    xs, ws = _values(np.dtype(np.float32), 3, 100, seed=3)
    model = {"a": xs[0]}
    wm = WeightedMean(ModelSpec.of(model))
    wm.add("c0", "a", xs[0], ws[0])
    wm.add("bad", "a", xs[2] * 100, ws[2])
    assert wm.discard("bad").rebuild == {"a": ("c0",)}
    # c1's download reaches 'a' after the reset, straight into the emptied accumulator.
    with wm.intake("c1", "a", "float32", (100,), ws[1]) as intake:
        assert intake.target is not None
        intake.target[...] = xs[1]
        assert intake.add(intake.target)
    wm.commit("c0")
    wm.commit("c1")
    assert wm.refold("c0", "a", xs[0])
    ref = (ws[0] * xs[0].astype(np.float64) + ws[1] * xs[1].astype(np.float64)) / (ws[0] + ws[1])
    np.testing.assert_allclose(wm.means()["a"], ref, rtol=1e-6, atol=1e-6)


def test_a_contributor_discarded_before_its_refold_is_not_owed_any_more() -> None:
    xs, ws = _values(np.dtype(np.float32), 3, 50, seed=4)
    model = {"a": xs[0], "b": xs[0]}
    wm = WeightedMean(ModelSpec.of(model))
    wm.add("c0", "a", xs[0], ws[0])
    wm.add("c0", "b", xs[0], ws[0])
    wm.commit("c0")
    wm.add("c1", "a", xs[1], ws[1])  # in flight
    wm.add("c2", "a", xs[2], ws[2])
    assert wm.discard("c2").rebuild == {"a": ("c0", "c1")}
    assert wm.discard("c1").rebuild == {}  # owed, never refolded: nothing of it to take out
    assert wm.owed() == {"a": ("c0",)}
    assert wm.refold("c1", "a", xs[1]) is False
    assert wm.refold("c0", "a", xs[0])
    means = wm.means()
    np.testing.assert_array_equal(means["a"], xs[0])


def test_refold_waits_for_an_open_claim_of_another_client() -> None:
    xs, ws = _values(np.dtype(np.float32), 3, 64, seed=5)
    wm = WeightedMean(ModelSpec.of({"a": xs[0]}))
    wm.add("c0", "a", xs[0], ws[0])
    wm.add("bad", "a", xs[2], ws[2])
    wm.discard("bad")
    intake = wm.intake("c1", "a", "float32", (64,), ws[1])
    assert intake.target is not None
    done = threading.Event()
    t = threading.Thread(target=lambda: (wm.refold("c0", "a", xs[0]), done.set()))
    t.start()
    assert not done.wait(0.3)  # never folds into an accumulator still being received
    intake.target[...] = xs[1]
    intake.add(intake.target)
    t.join(5)
    assert done.is_set()
    wm.commit("c0")
    wm.commit("c1")
    ref = (ws[0] * xs[0].astype(np.float64) + ws[1] * xs[1].astype(np.float64)) / (ws[0] + ws[1])
    np.testing.assert_allclose(wm.means()["a"], ref, rtol=1e-6, atol=1e-6)
