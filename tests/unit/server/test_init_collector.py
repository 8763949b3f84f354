"""InitCollector: the first client's upload becomes the initial model without a second copy of it."""

from __future__ import annotations

import weakref

import numpy as np
import pytest

from fedkube.server.aggregate import InvalidResultError
from fedkube.server.init_collector import InitCollector
from fedkube.server.pool import ALIGN, ALIGNED_MIN, ArrayPool, realigned
from fedkube.transfer.refs import array_from_buffer

SHAPE = (ALIGNED_MIN // 4 // 256, 256)  # float32: ALIGNED_MIN bytes, large enough to be realigned


def _received(collector: InitCollector, name: str, values: np.ndarray) -> np.ndarray:
    """What the workflow's download does: fetch into the collector's target, then add the byte view."""
    out = collector.target(name, "float32", values.shape)
    buf = out.reshape(-1).view(np.uint8).data.cast("B")  # as Fetcher.fetch_into writes into ``out``
    buf[:] = values.reshape(-1).view(np.uint8).data.cast("B")
    array = array_from_buffer(buf, "float32", values.shape)  # as the download hands it to the sink
    assert collector.add("site-0", name, array, 1.0)
    return array


def test_a_received_tensor_becomes_an_aligned_poolable_model_tensor_without_a_copy() -> None:
    collector = InitCollector()
    values = np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE)
    address = _received(collector, "w", values).ctypes.data
    model = collector.finish()
    assert model["w"].ctypes.data == address and model["w"].ctypes.data % ALIGN == 0
    np.testing.assert_array_equal(model["w"], values)
    assert realigned(model)["w"].ctypes.data == address  # nothing to copy before round 1
    # What round 2 recycles as accumulators: the byte view the transfer returned would not be kept.
    assert ArrayPool().retire(model.values()) == 1


def test_finish_hands_the_model_over_and_keeps_nothing() -> None:
    collector = InitCollector()
    _received(collector, "w", np.ones(SHAPE, np.float32))
    model = collector.finish()
    gone = weakref.ref(model["w"])
    del model
    # The finished init round may outlive the hand-over; it must not keep the model's S alive.
    assert gone() is None
    assert collector.finish() == {}


def test_a_tensor_sent_twice_is_refused() -> None:
    collector = InitCollector()
    _received(collector, "w", np.ones((4, 4), np.float32))
    with pytest.raises(InvalidResultError, match="'w' was sent twice"):
        _received(collector, "w", np.ones((4, 4), np.float32))


def test_a_tensor_not_received_into_its_target_is_kept_as_given() -> None:
    collector = InitCollector()
    given = np.full((4, 4), 2.0, np.float32)
    collector.target("w", "float32", (4, 4))  # e.g. a superseded download's target
    collector.add("site-0", "w", given, 1.0)
    assert collector.finish()["w"] is given


def test_discard_drops_what_was_collected() -> None:
    collector = InitCollector()
    _received(collector, "w", np.ones((4, 4), np.float32))
    assert collector.discard("site-0").exact
    assert collector.finish() == {}
