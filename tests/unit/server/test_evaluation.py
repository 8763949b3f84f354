"""Federated evaluation's pure parts: when it is due, the spec's site checks, what an evaluate result may carry,
its weight (capped like a training result's), the weighted average, and the status document's curve."""

from __future__ import annotations

import pytest

from fedkube.server.control import ResultAnnounced
from fedkube.server.evaluation import EvalRound, owed_on_resume
from fedkube.server.influence import Influence
from fedkube.spec import SpecError, parse_job, validate_job
from fedkube.spec.evaluation import Evaluation
from fedkube.status import EvaluationPoint, JobStatus, Phase
from fedkube.trainer_sdk import FLModel
from fedkube.transfer.refs import TensorRef
from tests.unit.spec.manifests import example_manifest


@pytest.mark.parametrize(("every", "rounds", "due"), [
    (1, 3, [1, 2, 3]), (2, 5, [2, 4, 5]), (3, 3, [3]), (10, 4, [4]),
])  # fmt: skip
def test_an_evaluation_follows_every_nth_round_and_the_last(every: int, rounds: int, due: list[int]) -> None:
    assert [r for r in range(1, rounds + 1) if Evaluation(every=every).due(r, rounds)] == due


def test_a_resumed_server_owes_only_a_due_evaluation_its_checkpoint_lacks() -> None:
    curve = [EvaluationPoint(round=1), EvaluationPoint(round=2)]
    assert owed_on_resume(Evaluation(every=1), curve[:1], 2, 5)  # round 2's point ran after its checkpoint
    assert not owed_on_resume(Evaluation(every=1), curve, 2, 5)  # already there
    assert not owed_on_resume(Evaluation(every=2), curve[:1], 3, 5)  # not due after round 3
    assert not owed_on_resume(None, [], 2, 5)
    assert not owed_on_resume(Evaluation(every=1), [], 0, 5)  # nothing trained yet


def test_evaluation_sites_must_be_listed_clients_each_once() -> None:
    doc = example_manifest()  # sites site-a and site-b
    doc["spec"]["evaluation"] = {"every": 1, "sites": ["site-b", "site-x", "site-b"]}
    with pytest.raises(SpecError) as info:
        validate_job(parse_job(doc))
    problems = {p.path: p.message for p in info.value.problems}
    assert problems == {"spec.evaluation.sites[1]": "'site-x' is not a site of spec.clients",
                        "spec.evaluation.sites[2]": "'site-b' is listed twice"}
    doc["spec"]["evaluation"] = {"every": 0}
    with pytest.raises(SpecError, match=r"spec\.evaluation\.every"):
        parse_job(doc)


def _round(influence: Influence = Influence()) -> EvalRound:  # noqa: B008 (frozen dataclass)
    return EvalRound(number=2, job="j", tasks={"site-a": "t-a", "site-b": "t-b"}, deadline=1e9, influence=influence)


def _result(n: int, refs: tuple[TensorRef, ...] = ()) -> ResultAnnounced:
    return ResultAnnounced(task_id="t-a", round=2, num_examples=n, metrics={"acc": 0.5}, refs=refs)


def test_an_evaluate_result_carrying_tensors_or_no_examples_is_refused() -> None:
    rnd = _round()
    ref = TensorRef(source="site-a", transaction_id="x", ref_id="r", name="w", dtype="float32", shape=(1,),
                    nbytes=4, checksum="xxh3_64:" + "0" * 16)  # fmt: skip
    assert "metrics only" in rnd.check_result("site-a", _result(5, (ref,)))
    assert "num_examples is 0" in rnd.check_result("site-a", _result(0))
    assert rnd.check_result("site-a", _result(5)) == ""
    # Its failure stays the evaluation's: the site is not failed for the job.
    assert rnd.keep_failure("site-a", "InvalidResult", "tensors") and rnd.failed == {"site-a": ("InvalidResult",
                                                                                              "tensors")}
    assert not rnd.keep_failure("site-z", "InvalidResult", "not of this round")


def test_evaluation_metrics_are_weighted_by_num_examples_capped_at_max_examples() -> None:
    rnd = _round(Influence(max_examples=100))
    rnd.results["site-a"] = (rnd.weight_of("site-a", 10), {"acc": 0.2, "loss": float("nan")})
    rnd.results["site-b"] = (rnd.weight_of("site-b", 10_000), {"acc": 0.8, "loss": 1.0})
    point = rnd.point()
    assert point == EvaluationPoint(round=2, metrics={"acc": pytest.approx((10 * 0.2 + 100 * 0.8) / 110),
                                                      "loss": 1.0}, sites=2, examples=110)
    assert _round(Influence(weighting="equal")).weight_of("site-a", 500) == 1


def test_the_status_document_keeps_the_newest_evaluations() -> None:
    points = [EvaluationPoint(round=r, metrics={"acc": r / 100}, sites=2, examples=50) for r in range(1, 31)]
    doc = JobStatus(job="j", phase=Phase.RUNNING, round=30, rounds=30, evaluation=points).to_json()
    back = JobStatus.from_json(doc)
    assert [p.round for p in back.evaluation] == list(range(11, 31))  # ROUND_HISTORY
    assert back.evaluation[-1] == points[-1]
    assert "evaluation" not in JobStatus(job="j", phase=Phase.RUNNING, round=1, rounds=1).to_dict()


def test_fl_model_kind_comes_from_the_task_config() -> None:
    assert FLModel(config={"fedkube.task": "evaluate"}).kind == "evaluate"
    assert FLModel().kind == ""


def test_round_metric_series_are_bounded_to_the_first_metric_names() -> None:
    from prometheus_client import generate_latest

    from fedkube.metrics.core import new_registry
    from fedkube.metrics.server import MAX_METRIC_SERIES, ServerMetrics

    registry = new_registry()
    metrics = ServerMetrics(registry, "j")
    metrics.round_metrics("train", {f"m{i}": float(i) for i in range(MAX_METRIC_SERIES + 5)})
    metrics.round_metrics("evaluate", {"m0": 1.5})
    series = [line for line in generate_latest(registry).decode().splitlines()
              if line.startswith("fedkube_server_round_metric{")]
    assert len(series) == MAX_METRIC_SERIES + 1, series
    assert 'fedkube_server_round_metric{fljob="j",name="m0",phase="evaluate"} 1.5' in series
    with pytest.raises(ValueError, match="kind"):
        metrics.round_metrics("predict", {})
