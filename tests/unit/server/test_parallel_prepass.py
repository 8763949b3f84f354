"""The clipping pre-pass and the rebuild pulls go wide like the fold: a remote site pays round trips per tensor.

Driven through the server's own ``Downloader`` and ``UploadBroker`` with the answering site of
test_parallel_pulls: the requests outstanding at once are exactly the tensors in flight. Going wide must not change
what is computed: the norm (each tensor's ``‖x - g‖²`` summed in the model's order), so the clip and every bit of the
aggregate are those of pulling one tensor at a time.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable

import numpy as np

from fedkube.server.downloads import Download, Downloader, FinishedFn
from fedkube.server.influence import Influence
from fedkube.server.reverse import UploadBroker
from fedkube.server.strategies import FedAvg
from fedkube.server.strategy_api import BoundsInfluence, RoundAggregator
from fedkube.transfer.parallel import FETCH_WIDTH
from tests.support.waiting import until
from tests.unit.server.test_parallel_pulls import FAST, FLOATS, TENSORS, Site

Model = dict[str, np.ndarray]


def _model() -> Model:
    return {f"layer{i}": np.zeros(FLOATS, np.float32) for i in range(TENSORS)}


def _result(seed: int, scale: float) -> Model:
    rng = np.random.default_rng(seed)
    return {n: (scale * rng.standard_normal(FLOATS)).astype(np.float32) for n in _model()}


Ended = list[tuple[bool, str, str]]


def _wait(start: Callable[[FinishedFn], None], broker: UploadBroker, site: Site, in_flight: int) -> Ended:
    """Run ``start(finished)``: ``in_flight`` requests outstanding before any but the first is answered; its end."""
    ended: Ended = []
    done = threading.Event()

    def finished(d: Download, ok: bool, reason: str, message: str) -> None:
        ended.append((ok, reason, message))
        done.set()

    start(finished)
    try:
        until(lambda: broker.pending() == in_flight, f"{in_flight} pulls of {site.name} at once", 3)
        assert broker.pending() == in_flight
        site.answering.set()
        assert done.wait(10), f"{site.name}'s pulls did not end"
        assert site.most == in_flight  # never more, over the whole pass
    finally:
        site.stop.set()
    return ended


def _clipped_round(width: int) -> tuple[RoundAggregator, dict[str, float]]:
    """Two sites' results through the pre-pass and the fold at ``width``; the aggregator and each clip factor."""
    agg = FedAvg(influence=Influence(clip_norm=1.0)).begin_round(_model())
    assert isinstance(agg, BoundsInfluence)
    scales = {}
    for name, result in (("site-a", _result(1, 0.005)), ("site-b", _result(2, 10.0))):
        broker = UploadBroker()
        site = Site(broker, name, result)
        downloader = Downloader("job1", broker, site.send, FAST, clock=time.monotonic, width=width)
        dl = Download(site=name, task_id="t", key=name, num_examples=1, metrics={})
        ended = _wait(functools.partial(downloader.start, 1, dl, site.refs(), agg, {name: 1}), broker, site, width)
        assert ended == [(True, "", "")], ended
        assert dl.bytes_pulled == 2 * TENSORS * FLOATS * 4  # every tensor is a float: measured, then folded
        bounded = agg.bound(name)
        assert bounded.rebuild == {}  # the clip was known before the first fold: nothing is refolded
        scales[name] = bounded.influence.scale
        agg.commit(name)
    return agg, scales


def test_the_prepass_pulls_width_tensors_at_a_time_and_clips_the_same_bits_as_one_at_a_time() -> None:
    wide, wide_scales = _clipped_round(FETCH_WIDTH)
    one, one_scales = _clipped_round(1)
    assert wide_scales == one_scales and wide_scales["site-a"] == 1.0 and wide_scales["site-b"] < 0.01
    got, want = wide.finish(), one.finish()
    for name in want:
        assert got[name].tobytes() == want[name].tobytes(), name


def test_a_rebuild_pulls_width_tensors_at_a_time() -> None:
    agg = FedAvg().begin_round(_model())
    kept, gone = _result(1, 1.0), _result(2, 1.0)
    for name in kept:
        agg.add("site-a", name, kept[name], 1.0)
        agg.add("site-b", name, gone[name], 1.0)
    agg.commit("site-a")
    owed = agg.discard("site-b").rebuild  # site-a's tensors were folded beside site-b's: all are pulled again
    assert set(owed) == set(kept) and all(keys == ("site-a",) for keys in owed.values())
    broker = UploadBroker()
    site = Site(broker, "site-a", kept)
    downloader = Downloader("job1", broker, site.send, FAST, clock=time.monotonic)
    again = Download(site="site-a", task_id="t", key="site-a", num_examples=1, metrics={})
    ended = _wait(functools.partial(downloader.rebuild, 1, again, site.refs(), agg), broker, site, FETCH_WIDTH)
    assert ended == [(True, "", "")], ended
    assert again.bytes_done == TENSORS * FLOATS * 4  # what on_rebuild_finished counts as moved
    got = agg.finish()
    for name in kept:
        assert got[name].tobytes() == kept[name].tobytes(), name
