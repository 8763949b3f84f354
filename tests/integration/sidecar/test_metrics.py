"""The sidecar's metrics, driven by a real trainer session and a scripted server over real gRPC."""

from __future__ import annotations

import threading
import urllib.request

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fedkube.sidecar.app import Sidecar
from fedkube.trainer_sdk import FLModel
from fedkube.trainer_sdk._session import Session
from fedkube.wire.v1 import control_pb2
from tests.integration.sidecar.conftest import JOB, SITE, TOKEN, make_sidecar
from tests.integration.sidecar.fake_server import FakeServer
from tests.support.waiting import free_port, until

pytestmark = pytest.mark.timeout(60)

LABELS = {"fljob": JOB, "site": SITE}


def _value(sidecar: Sidecar, metric: str, **labels: str) -> float:
    got = sidecar.registry.get_sample_value(metric, {**LABELS, **labels})
    assert got is not None, f"{metric}{labels} is not exported"
    return got


def test_relayed_bytes_both_ways_and_the_window_empties(server: FakeServer, sidecar: Sidecar,
                                                        trainer: Session) -> None:
    g: dict[str, np.ndarray] = {"w": np.arange(300 * 257, dtype=np.float32).reshape(300, 257),
                                "b": np.ones(10, np.float64)}
    g_bytes = sum(a.nbytes for a in g.values())
    server.publish_task(SITE, g, task_id="t1", round=1, total_rounds=1)
    model = trainer.receive()
    assert model.params is not None
    forward = _value(sidecar, "fedkube_sidecar_relayed_bytes_total", direction="to_trainer")
    # Whole chunk messages are counted: the payload plus a little framing per chunk, never less.
    assert g_bytes <= forward < g_bytes + 4096, forward

    result = {k: v * 2 for k, v in model.params.items()}
    errors: list[BaseException] = []

    def send() -> None:
        try:
            trainer.send(FLModel(params=result, num_examples=3))
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=send, daemon=True)
    t.start()
    ann = server.wait_message("result", lambda r: r.task_id == "t1")
    pulled = server.pull(SITE, ann)
    assert pulled["w"].tobytes() == result["w"].tobytes()
    server.result_received(SITE, "t1")
    t.join(10)
    assert not t.is_alive() and not errors, errors
    assert _value(sidecar, "fedkube_sidecar_relayed_bytes_total", direction="to_server") == g_bytes
    # Every stream ended: nothing is held any more.
    until(lambda: _value(sidecar, "fedkube_sidecar_relay_buffer_bytes") == 0, "the relay window to empty")
    assert sidecar.meter.held == 0


def test_sdk_timings_feed_histograms_and_only_user_metrics_go_upstream(server: FakeServer, sidecar: Sidecar,
                                                                      trainer: Session) -> None:
    # The reserved names arrive as the SDK sends its own timings: raw reports on the link
    # (the public log_metric refuses them).
    for name, value in (("fedkube.send_seconds", 2.5), ("fedkube.receive_seconds", 0.75),
                        ("fedkube.future_timing", 1.0)):
        trainer.link.LogMetric(control_pb2.MetricReport(round=1, values={name: value}), timeout=10)
    trainer.log_metric("train_loss", 0.25, round=1)
    m = server.wait_message("metrics", lambda m: "train_loss" in m.values)
    assert m.round == 1
    assert not [k for _, msg in server.messages if msg.HasField("metrics") for k in msg.metrics.values
                if k.startswith("fedkube.")], "an SDK timing was forwarded as a user metric"
    assert _value(sidecar, "fedkube_trainer_send_seconds_count") == 1
    assert _value(sidecar, "fedkube_trainer_send_seconds_sum") == 2.5
    assert _value(sidecar, "fedkube_trainer_receive_seconds_sum") == 0.75
    assert _value(sidecar, "fedkube_trainer_metric", name="train_loss") == 0.25
    assert _value(sidecar, "fedkube_trainer_metric_reports_total", name="train_loss") == 1


def test_trainer_state_follows_the_trainer(server: FakeServer, sidecar: Sidecar, trainer: Session) -> None:
    until(lambda: _value(sidecar, "fedkube_sidecar_trainer_state", state="Running") == 1, "state Running")
    trainer.report(control_pb2.TRAINER_PHASE_FINISHED, message="done")
    until(lambda: _value(sidecar, "fedkube_sidecar_trainer_state", state="Finished") == 1, "state Finished")
    assert _value(sidecar, "fedkube_sidecar_trainer_state", state="Running") == 0


def test_upstream_state_reconnects_heartbeat_and_metrics_endpoint() -> None:
    server = FakeServer(JOB, {SITE: TOKEN}).start()
    port = server.port
    sc = make_sidecar(server.address, metrics_port=free_port())
    try:
        sc.start()
        server.wait_registered(SITE)
        until(lambda: _value(sc, "fedkube_sidecar_upstream_connected") == 1, "connected")
        assert _value(sc, "fedkube_sidecar_upstream_state", state="connected") == 1
        server.wait_message("heartbeat")
        until(lambda: 0 < _value(sc, "fedkube_sidecar_heartbeat_age_seconds") < 5, "a recent heartbeat")
        assert _value(sc, "fedkube_sidecar_reconnects_total") == 0

        server.stop()
        until(lambda: _value(sc, "fedkube_sidecar_upstream_connected") == 0, "disconnected")
        server = FakeServer(JOB, {SITE: TOKEN}, port=port).start()
        server.wait_registered(SITE)
        until(lambda: _value(sc, "fedkube_sidecar_reconnects_total") == 1, "one reconnect")
        until(lambda: _value(sc, "fedkube_sidecar_upstream_connected") == 1, "connected again")

        assert sc.metrics_server is not None
        url = f"http://127.0.0.1:{sc.metrics_server.port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as resp:
            text = resp.read().decode()
        samples = {s.name: s for f in text_string_to_metric_families(text) for s in f.samples}
        assert samples["fedkube_sidecar_reconnects_total"].value == 1
        assert samples["process_resident_memory_bytes"].value > 10 << 20
    finally:
        sc.stop(grace=0.5)
        server.stop()
    assert _value(sc, "fedkube_sidecar_upstream_state", state="stopped") == 1
