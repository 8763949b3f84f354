"""The metric facades: what each call exports, bounded labels, fresh registries, and the live /metrics endpoint."""

from __future__ import annotations

import subprocess
import sys
import threading
import urllib.request
from collections.abc import Callable

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from fedkube import envvars, protocol
from fedkube.errors import ConfigError
from fedkube.metrics import (
    ALLOWED_LABELS,
    OVERFLOW,
    CappedValues,
    OperatorMetrics,
    ServerMetrics,
    SidecarMetrics,
    metrics_port_from_env,
    new_registry,
    serve_metrics,
)
from fedkube.metrics import server as server_metrics
from fedkube.metrics import sidecar as sidecar_metrics
from fedkube.metrics.operator import PHASES
from fedkube.server.registry import ClientState
from fedkube.status import Reason
from fedkube.wire.v1 import control_pb2
from tests.unit.metrics.observations import exercised

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(registry: CollectorRegistry) -> Samples:
    """Every sample of the registry's exposition text, parsed back with the library's own parser."""
    text = generate_latest(registry).decode()
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(registry: CollectorRegistry, metric: str, /, **labels: str) -> float:
    return samples(registry)[(metric, frozenset(labels.items()))]


def test_every_label_of_every_metric_is_on_the_allow_list() -> None:
    for component, registry in exercised().items():
        seen = set()
        for family in registry.collect():
            for s in family.samples:
                seen.add(s.name)
                extra = set(s.labels) - ALLOWED_LABELS - {"le"}
                # python_info's labels come from the library's platform collector and are constant.
                if family.name != "python_info":
                    assert not extra, f"{component}: {s.name} has labels {extra} outside the allow-list"
        assert any(n.startswith(f"fedkube_{component}_") for n in seen), component


def test_allow_list_has_no_per_round_or_per_tensor_label() -> None:
    assert not {"round", "tensor", "transfer", "ref", "task", "job"} & ALLOWED_LABELS


def test_a_label_outside_the_allow_list_is_refused() -> None:
    from fedkube.metrics.core import check_labels

    with pytest.raises(ValueError, match="round"):
        check_labels(["fljob", "round"])


def test_server_calls_land_in_the_exposition() -> None:
    reg = exercised()["server"]
    j = {"fljob": "mnist"}
    assert value(reg, "fedkube_server_rounds_completed_total", **j) == 1
    assert value(reg, "fedkube_server_round_seconds_sum", **j) == 12.0
    assert value(reg, "fedkube_server_round_seconds_bucket", le="15.0", **j) == 1
    assert value(reg, "fedkube_server_round_seconds_bucket", le="5.0", **j) == 0
    assert value(reg, "fedkube_server_current_round", **j) == 1
    assert value(reg, "fedkube_server_rounds_planned", **j) == 3
    assert value(reg, "fedkube_server_last_completed_round", **j) == 1
    assert value(reg, "fedkube_server_clients", state="Registered", **j) == 2
    assert value(reg, "fedkube_server_clients", state="Lost", **j) == 0  # every state is exported
    assert value(reg, "fedkube_server_transfer_bytes_total", direction="from_clients", **j) == 400
    assert value(reg, "fedkube_server_transfer_seconds_total", direction="to_clients", **j) == 0.5
    assert value(reg, "fedkube_server_client_failures_total", reason="ExitedBeforeDownload", **j) == 1
    assert value(reg, "fedkube_server_download_retries_total", reason="ChunkTimeoutError", **j) == 1
    assert value(reg, "fedkube_server_stalls_total", direction="from_clients", **j) == 1
    assert value(reg, "fedkube_server_aggregation_seconds_count", **j) == 2
    assert value(reg, "fedkube_server_checkpoint_seconds_sum", **j) == pytest.approx(0.1)
    assert value(reg, "fedkube_server_model_bytes", **j) == 4096
    assert value(reg, "fedkube_server_rejected_connections_total", plane="grpc", reason="Unauthenticated", **j) == 1
    assert value(reg, "fedkube_component_info", component="server", fljob="mnist", site="") == 1


def test_process_collector_exports_rss_on_each_registry() -> None:
    for registry in exercised().values():
        rss = value(registry, "process_resident_memory_bytes")
        assert rss > 1 << 20  # a Python process is never under 1 MiB


def test_server_rejects_unknown_state_and_direction() -> None:
    m = ServerMetrics(new_registry(), "j")
    with pytest.raises(ValueError, match="client state"):
        m.clients({"Sleeping": 1})
    with pytest.raises(ValueError, match="direction"):
        m.transferred("sideways", 1, 0.1)
    with pytest.raises(ValueError, match="nbytes"):
        m.transferred("to_clients", -1, 0.1)
    with pytest.raises(ValueError, match="FEDKUBE_JOB"):
        ServerMetrics(new_registry(), "")


def test_client_states_match_the_server_registry() -> None:
    assert tuple(s.value for s in ClientState) == server_metrics.CLIENT_STATES


def test_trainer_states_match_the_wire_phases() -> None:
    wire = {name.removeprefix("TRAINER_PHASE_").capitalize() for name, _ in control_pb2.TrainerPhase.items()}
    assert set(sidecar_metrics.TRAINER_STATES) == (wire - {"Unspecified"}) | {"Unknown"}


def test_failure_reasons_are_capped_but_documented_ones_always_count() -> None:
    reg = new_registry()
    m = ServerMetrics(reg, "j")
    for i in range(server_metrics.EXTRA_REASONS + 10):
        m.client_failed(f"Weird{i}")
    m.client_failed(Reason.LOST.value)
    reasons = {dict(labels)["reason"] for (name, labels) in samples(reg)
               if name == "fedkube_server_client_failures_total"}
    # the admitted extras, _other, and every documented reason (created at 0 up front)
    extras = {f"Weird{i}" for i in range(server_metrics.EXTRA_REASONS)}
    assert reasons == extras | {OVERFLOW} | {r.value for r in Reason}
    assert value(reg, "fedkube_server_client_failures_total", fljob="j", reason=OVERFLOW) == 10
    assert value(reg, "fedkube_server_client_failures_total", fljob="j", reason="Lost") == 1


def test_documented_failure_reasons_read_zero_before_any_failure() -> None:
    """A dashboard panel shows 0, not 'No data', for a job nothing has failed in yet."""
    reg = new_registry()
    ServerMetrics(reg, "j")
    for reason in Reason:
        assert value(reg, "fedkube_server_client_failures_total", fljob="j", reason=reason.value) == 0


def test_sidecar_calls_land_in_the_exposition() -> None:
    reg = exercised()["sidecar"]
    js = {"fljob": "mnist", "site": "site-a"}
    assert value(reg, "fedkube_sidecar_upstream_connected", **js) == 1
    assert value(reg, "fedkube_sidecar_upstream_state", state="connected", **js) == 1
    assert value(reg, "fedkube_sidecar_upstream_state", state="backoff", **js) == 0
    assert value(reg, "fedkube_sidecar_reconnects_total", **js) == 1
    assert value(reg, "fedkube_sidecar_relayed_bytes_total", direction="to_server", **js) == 400
    assert value(reg, "fedkube_sidecar_relay_buffer_bytes", **js) == 65536
    assert value(reg, "fedkube_sidecar_trainer_state", state="Running", **js) == 1
    assert value(reg, "fedkube_sidecar_trainer_state", state="Unknown", **js) == 0
    assert value(reg, "fedkube_trainer_receive_seconds_count", **js) == 1
    assert value(reg, "fedkube_trainer_send_seconds_sum", **js) == pytest.approx(0.6)
    assert value(reg, "fedkube_trainer_download_wait_seconds_sum", **js) == pytest.approx(0.4)
    assert value(reg, "fedkube_trainer_metric", name="loss", **js) == 0.25
    assert value(reg, "fedkube_trainer_metric_reports_total", name="loss", **js) == 1


def test_upstream_state_moves_and_connected_follows() -> None:
    reg = new_registry()
    m = SidecarMetrics(reg, "j", "a")
    js = {"fljob": "j", "site": "a"}
    assert value(reg, "fedkube_sidecar_upstream_state", state="connecting", **js) == 1
    m.upstream("connected")
    m.upstream("backoff")
    assert value(reg, "fedkube_sidecar_upstream_connected", **js) == 0
    states = {dict(lb)["state"]: v for (n, lb), v in samples(reg).items() if n == "fedkube_sidecar_upstream_state"}
    assert states == {"connecting": 0, "connected": 0, "backoff": 1, "stopped": 0}
    with pytest.raises(ValueError, match="upstream state"):
        m.upstream("asleep")
    with pytest.raises(ValueError, match="trainer state"):
        m.trainer_state("RUNNING")


def test_heartbeat_age_is_computed_at_scrape_time() -> None:
    now = [100.0]
    clock: Callable[[], float] = lambda: now[0]  # noqa: E731
    reg = new_registry()
    m = SidecarMetrics(reg, "j", "a", clock=clock)
    js = {"fljob": "j", "site": "a"}
    assert value(reg, "fedkube_sidecar_heartbeat_age_seconds", **js) == 0  # no heartbeat yet
    m.heartbeat()
    now[0] = 107.5
    assert value(reg, "fedkube_sidecar_heartbeat_age_seconds", **js) == 7.5
    m.heartbeat()
    assert value(reg, "fedkube_sidecar_heartbeat_age_seconds", **js) == 0


def test_user_metric_names_are_capped_with_an_overflow_bucket(caplog: pytest.LogCaptureFixture) -> None:
    reg = new_registry()
    m = SidecarMetrics(reg, "j", "a", user_metric_names=3)
    for i in range(1000):
        m.user_metric(f"metric_{i}", float(i))
    assert m.user_metric("metric_1", 42.0) == "metric_1"  # an admitted name keeps its series
    names = {dict(lb)["name"] for (n, lb) in samples(reg) if n == "fedkube_trainer_metric_reports_total"}
    assert names == {"metric_0", "metric_1", "metric_2", OVERFLOW}
    js = {"fljob": "j", "site": "a"}
    assert value(reg, "fedkube_trainer_metric_reports_total", name=OVERFLOW, **js) == 997
    assert value(reg, "fedkube_trainer_metric", name="metric_1", **js) == 42.0
    # No "last value" series for the mixed bag of overflowing names.
    assert ("fedkube_trainer_metric", frozenset({**js, "name": OVERFLOW}.items())) not in samples(reg)
    assert sum("metric_3" in r.getMessage() for r in caplog.records) == 1  # warned once, naming the first


def test_long_user_metric_names_are_truncated() -> None:
    m = SidecarMetrics(new_registry(), "j", "a")
    assert m.user_metric("x" * 500, 1.0) == "x" * sidecar_metrics.USER_METRIC_NAME_LEN


def test_capped_values_admits_known_values_beyond_the_cap() -> None:
    cv = CappedValues("thing", 1, known=["A"])
    assert [cv.admit(v) for v in ("b", "c", "A", "b")] == ["b", OVERFLOW, "A", "b"]
    with pytest.raises(ValueError, match="cap"):
        CappedValues("thing", 0)


def test_operator_counts_jobs_by_their_namespace_and_phase() -> None:
    reg = new_registry()
    m = OperatorMetrics(reg)
    assert not [n for (n, _), _v in samples(reg).items() if n == "fedkube_operator_fljobs"]  # no job, no series
    m.job_phase("a", "x", "Pending")
    m.job_phase("a", "y", "Running")
    m.job_phase("b", "x", "Running")  # same name, other namespace: another job
    m.job_phase("a", "x", "Running")
    counts = {(dict(lb)["fljob_namespace"], dict(lb)["phase"]): v
              for (n, lb), v in samples(reg).items() if n == "fedkube_operator_fljobs"}
    zeros = {(ns, p): 0.0 for ns in ("a", "b") for p in PHASES}
    assert counts == {**zeros, ("a", "Running"): 2, ("b", "Running"): 1}  # every phase: Failed exists before a failure
    m.job_deleted("a", "y")
    m.job_deleted("a", "never-seen")
    assert value(reg, "fedkube_operator_fljobs", fljob_namespace="a", phase="Running") == 1
    m.job_deleted("b", "x")  # b's last FLJob: its series go (bounded by the namespaces holding FLJobs now)
    left = {dict(lb)["fljob_namespace"] for (n, lb), _v in samples(reg).items() if n == "fedkube_operator_fljobs"}
    assert left == {"a"}
    m.timeout_fired("DeployTimeout")
    assert value(reg, "fedkube_operator_timeouts_total", reason="DeployTimeout") == 1
    assert value(reg, "fedkube_operator_timeouts_total", reason="PendingTimeout") == 0
    with pytest.raises(ValueError, match="timeout reason"):
        m.timeout_fired("Slow")
    with pytest.raises(ValueError, match="phase"):
        m.job_phase("a", "x", "Exploded")


def test_importing_the_metrics_package_registers_nothing_globally() -> None:
    code = ("import fedkube.metrics, fedkube.metrics.server, fedkube.metrics.sidecar, fedkube.metrics.operator\n"
            "from prometheus_client import REGISTRY\n"
            "print(sorted(n for n in REGISTRY._names_to_collectors if n.startswith('fedkube')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_fresh_registries_are_independent() -> None:
    a, b = new_registry(), new_registry()
    ServerMetrics(a, "j").round_completed(1.0, number=1)
    ServerMetrics(b, "j")
    assert value(a, "fedkube_server_rounds_completed_total", fljob="j") == 1
    assert value(b, "fedkube_server_rounds_completed_total", fljob="j") == 0


def test_facades_can_share_one_registry() -> None:
    reg = new_registry()
    ServerMetrics(reg, "j")
    SidecarMetrics(reg, "j", "a")
    OperatorMetrics(reg)
    infos = {dict(lb)["component"] for (n, lb) in samples(reg) if n == "fedkube_component_info"}
    assert infos == {"server", "sidecar", "operator"}


def test_serve_metrics_answers_a_real_scrape() -> None:
    reg = new_registry()
    m = ServerMetrics(reg, "mnist")
    m.round_completed(3.0, number=1)
    server, port = serve_metrics(reg, 0, addr="127.0.0.1")
    try:
        assert port > 0 and server.port == port
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/plain")
            text = resp.read().decode()
    finally:
        server.close()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    rounds = families["fedkube_server_rounds_completed"]
    assert rounds.type == "counter"
    assert [(s.name, s.labels, s.value) for s in rounds.samples if s.name.endswith("_total")] == [
        ("fedkube_server_rounds_completed_total", {"fljob": "mnist"}, 1.0)]
    assert families["process_resident_memory_bytes"].samples[0].value > 0
    # Closed means closed: the port is free again and nothing answers.
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)
    server.close()  # idempotent
    again, port2 = serve_metrics(reg, port, addr="127.0.0.1")
    again.close()
    assert port2 == port


def test_serve_metrics_on_a_taken_port_says_how_to_fix_it() -> None:
    reg = new_registry()
    with serve_metrics(reg, 0, addr="127.0.0.1")[0] as first, \
            pytest.raises(ConfigError, match=envvars.METRICS_PORT):
        serve_metrics(reg, first.port, addr="127.0.0.1")
    with pytest.raises(ConfigError, match=r"0\.\.65535"):
        serve_metrics(reg, 70000)


@pytest.mark.parametrize(("raw", "port"), [(None, 0), ("", 0), ("0", 0), ("9090", 9090), (" 9100 ", 9100)])
def test_metrics_port_from_env(raw: str | None, port: int) -> None:
    env = {} if raw is None else {envvars.METRICS_PORT: raw}
    assert metrics_port_from_env(env) == port


@pytest.mark.parametrize("raw", ["http", "-1", "65536", "90.5"])
def test_metrics_port_from_env_rejects_garbage(raw: str) -> None:
    with pytest.raises(ConfigError, match=envvars.METRICS_PORT):
        metrics_port_from_env({envvars.METRICS_PORT: raw})


def test_capped_values_hold_the_cap_under_concurrent_admission() -> None:
    cv = CappedValues("thing", 10)
    barrier = threading.Barrier(8)
    results: list[set[str]] = []

    def admit(worker: int) -> None:
        barrier.wait(5)
        results.append({cv.admit(f"v{worker}-{i}") for i in range(500)})

    threads = [threading.Thread(target=admit, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    admitted = set().union(*results) - {OVERFLOW}
    assert len(admitted) == 10 and admitted == cv.admitted


def test_operator_phase_counts_stay_consistent_under_concurrent_handlers() -> None:
    reg = new_registry()
    m = OperatorMetrics(reg)
    phases = ["Pending", "Deploying", "Running", "Succeeded"]

    def handler(worker: int) -> None:
        for i in range(200):
            m.job_phase("ns", f"job-{worker}", phases[i % len(phases)])

    threads = [threading.Thread(target=handler, args=(w,)) for w in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    counts = {dict(lb)["phase"]: v for (n, lb), v in samples(reg).items() if n == "fedkube_operator_fljobs"}
    assert sum(counts.values()) == 6 and counts["Succeeded"] == 6  # every job ended on its last phase


def test_trainer_report_splits_timings_from_user_metrics() -> None:
    reg = new_registry()
    m = SidecarMetrics(reg, "j", "a")
    forwarded = m.record_report({
        protocol.RECEIVE_SECONDS: 2.0,
        protocol.SEND_SECONDS: 3.0,
        protocol.DOWNLOAD_WAIT_SECONDS: 1.5,
        "fedkube.future_timing": 9.0,  # reserved: neither a timing we know nor a user metric
        "accuracy": 0.9,
    })
    assert forwarded == {"accuracy": 0.9}
    js = {"fljob": "j", "site": "a"}
    assert value(reg, "fedkube_trainer_receive_seconds_sum", **js) == 2.0
    assert value(reg, "fedkube_trainer_send_seconds_sum", **js) == 3.0
    assert value(reg, "fedkube_trainer_download_wait_seconds_sum", **js) == 1.5
    assert value(reg, "fedkube_trainer_metric", name="accuracy", **js) == 0.9
    names = {dict(lb)["name"] for (n, lb) in samples(reg) if n == "fedkube_trainer_metric_reports_total"}
    assert names == {"accuracy"}


def test_trainer_report_skips_impossible_timings_without_raising() -> None:
    reg = new_registry()
    m = SidecarMetrics(reg, "j", "a")
    assert m.record_report({protocol.SEND_SECONDS: -1.0, protocol.RECEIVE_SECONDS: float("nan")}) == {}
    js = {"fljob": "j", "site": "a"}
    assert value(reg, "fedkube_trainer_send_seconds_count", **js) == 0
    assert value(reg, "fedkube_trainer_receive_seconds_count", **js) == 0


def test_progress_survives_a_server_restart_and_never_goes_back() -> None:
    # The restarted server resumes at round 5 from its checkpoint: a fresh process, a fresh registry.
    reg = new_registry()
    m = ServerMetrics(reg, "j", rounds_planned=10)
    assert value(reg, "fedkube_server_last_completed_round", fljob="j") == 0
    m.round_started(5)
    assert value(reg, "fedkube_server_last_completed_round", fljob="j") == 4
    m.round_completed(2.0, number=5)
    m.round_completed(2.0, number=3)  # a late, stale call
    assert value(reg, "fedkube_server_last_completed_round", fljob="j") == 5
    assert value(reg, "fedkube_server_rounds_completed_total", fljob="j") == 2  # this process's own count


def test_a_registry_that_already_has_process_metrics_is_accepted() -> None:
    from prometheus_client import ProcessCollector

    reg = CollectorRegistry()
    ProcessCollector(registry=reg)
    ServerMetrics(reg, "j")  # must not fail with a duplicate process_* series
    assert value(reg, "fedkube_server_current_round", fljob="j") == 0
    assert any(name == "python_info" for name, _ in samples(reg))  # the platform collector was still added
