"""The round in progress answers, per variant, what the workflow used to decide by branching on the task kind."""

from __future__ import annotations

import numpy as np

from fedkube.metrics.core import new_registry
from fedkube.metrics.server import ServerMetrics
from fedkube.server.control import ResultAnnounced
from fedkube.server.downloads import Download
from fedkube.server.init_collector import InitCollector
from fedkube.server.live_round import InitRound, TrainRound
from fedkube.server.model import MAX_INIT_TENSORS, ModelSpec
from fedkube.server.registry import ClientState, Registry
from fedkube.server.rounds import RoundPolicy, RoundState
from fedkube.server.strategies import FedAvg
from fedkube.server.strategy_api import StreamingAggregator
from fedkube.transfer.refs import TensorRef

MODEL = {"w": np.zeros(4, np.float32), "b": np.zeros(2, np.float32)}


def _refs(source: str, model: dict[str, np.ndarray] = MODEL) -> tuple[TensorRef, ...]:
    return tuple(TensorRef.for_array(a, source=source, transaction_id="t", ref_id=f"{source}-{n}", name=n,
                                     checksum="xxh3_64:" + "0" * 16) for n, a in model.items())  # fmt: skip


def _result(site: str, num_examples: int = 10, refs: tuple[TensorRef, ...] | None = None) -> ResultAnnounced:
    return ResultAnnounced("task", 1, num_examples, {}, _refs(site) if refs is None else refs)


def _train_round() -> TrainRound:
    policy = RoundPolicy(rounds=2, min_clients=1, round_timeout_s=60, registration_timeout_s=60)
    return TrainRound(
        number=1, job="job", tasks={"a": "t-a", "b": "t-b"}, deadline=60.0, spec=ModelSpec.of(MODEL),
        aggregator=FedAvg().begin_round(MODEL), state=RoundState(1, ("a", "b"), 0.0, policy),
        telemetry=ServerMetrics(new_registry(), "job"), clock=lambda: 1.0,
    )  # fmt: skip


def test_init_round_keeps_its_clients_failures_and_collects_into_a_non_streaming_sink() -> None:
    rnd = InitRound(number=0, job="job", tasks={"a": "t-a"}, deadline=60.0)
    assert isinstance(rnd.sink, InitCollector) and not isinstance(rnd.sink, StreamingAggregator)
    assert rnd.keep_failure("a", "Lost", "no heartbeat")
    assert rnd.failed == {"a": ("Lost", "no heartbeat")}
    assert not rnd.keep_failure("z", "Lost", "not in this round")  # not its client: nothing kept
    assert rnd.check_result("a", _result("a", num_examples=0)) == ""  # the init model needs no examples
    assert rnd.check_result("a", _result("a", refs=())) == "the initial model has no tensors"
    assert "another source" in rnd.check_result("a", _result("b"))
    assert rnd.resend_on_reconnect("a", resume_task_id="") and not rnd.resend_on_reconnect("a", "t-a")
    dl = Download(site="a", task_id="t-a", key="a#1", num_examples=0, metrics={})
    assert rnd.accept(Registry(["a"], heartbeat_timeout_s=30), dl)
    rnd.closed = True
    assert not rnd.accept(Registry(["a"], heartbeat_timeout_s=30), dl)  # landed after the round closed: not taken


def _announced(site: str, name: str, shape: tuple[int, ...]) -> TensorRef:
    """A float32 tensor announced without any array behind it: what a client may claim."""
    ref = TensorRef(source=site, transaction_id="t", ref_id=f"{site}-{name}", name=name, dtype="float32",
                    shape=shape, nbytes=4 * int(np.prod(shape)), checksum="xxh3_64:" + "0" * 16)  # fmt: skip
    return ref.validate()


def test_init_round_refuses_a_model_over_max_bytes_before_allocating_anything() -> None:
    rnd = InitRound(number=0, job="job", tasks={"a": "t-a"}, deadline=60.0, max_bytes=1 << 20)
    gib = _result("a", refs=(_announced("a", "w", (1 << 28,)),))  # 1 GiB claimed, nothing sent
    problem = rnd.check_result("a", gib)
    assert str(1 << 30) in problem and "spec.model.maxBytes=1048576" in problem, problem
    assert not rnd.collector._targets  # no receive buffer was handed out for it
    split = _result("a", refs=(_announced("a", "w", (1 << 17,)), _announced("a", "v", ((1 << 17) + 1,))))
    assert "spec.model.maxBytes" in rnd.check_result("a", split)  # the sum counts, not the largest tensor
    at_bound = _result("a", refs=(_announced("a", "w", (1 << 18,)),))  # exactly 1 MiB
    assert rnd.check_result("a", at_bound) == ""


def test_init_round_refuses_more_tensors_than_any_model_has() -> None:
    rnd = InitRound(number=0, job="job", tasks={"a": "t-a"}, deadline=60.0)
    flood = _result("a", refs=tuple(_announced("a", f"t{i}", (0,)) for i in range(MAX_INIT_TENSORS + 1)))
    assert f"more than the {MAX_INIT_TENSORS}" in rnd.check_result("a", flood)
    enough = _result("a", refs=flood.refs[:MAX_INIT_TENSORS])
    assert rnd.check_result("a", enough) == ""


def test_train_round_leaves_failures_to_the_registry_and_checks_results_against_the_model() -> None:
    rnd = _train_round()
    assert isinstance(rnd.sink, StreamingAggregator)
    assert not rnd.keep_failure("a", "Lost", "no heartbeat")
    assert not rnd.resend_on_reconnect("a", resume_task_id="")  # the round loop re-sends from needs_task
    assert "num_examples is 0" in rnd.check_result("a", _result("a", num_examples=0))
    assert rnd.check_result("a", _result("a", refs=_refs("a", {"w": MODEL["w"]})))  # a tensor is missing
    assert rnd.check_result("a", _result("a")) == ""
    assert rnd.tensor_order == {"w": 0, "b": 1}
    registry = Registry(["a", "b"], heartbeat_timeout_s=30)
    assert not rnd.expects_result(registry.get("a"))
    assert registry.get("a").state is not ClientState.TRAINING
    dl = Download(site="a", task_id="t-a", key="a#1", num_examples=10, metrics={})
    assert not rnd.accept(registry, dl)  # the registry never expected this result: nothing is committed
    assert rnd.aggregation_s == 0.0
