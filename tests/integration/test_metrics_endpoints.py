"""`fedkube run` serves /metrics for the server and every sidecar: scraped over real HTTP mid-job and parsed.

The job is quickstart-sized (two sites, three rounds of a small numpy model).
To scrape a live job without guessing at timing, every trainer holds its last
round's result until the test creates a gate file: the test waits (bounded) on
the server's own ``rounds_completed`` counter reaching 2, scrapes, and only
then opens the gate and lets the job finish.
"""

from __future__ import annotations

import json
import queue
import subprocess
import textwrap
import threading
import time
import urllib.request
from pathlib import Path
from typing import IO

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from fedkube.runtime.pod import fedkube_command
from tests.support.waiting import until

pytestmark = pytest.mark.timeout(150)

ROUNDS = 3
SITES = ("site-a", "site-b")
FEATURES = 64

JOB = """
apiVersion: fedkube.dev/v1alpha1
kind: FLJob
metadata:
  name: metrics-live
spec:
  rounds: {rounds}
  minClients: 2
  clients:
{clients}
  trainer:
    image: example/trainer:1
    command: ["python", "train.py"]
    env:
      - name: TEST_GATE
        value: "{gate}"
  timeouts:
    roundSeconds: 120
"""

TRAIN = textwrap.dedent(f"""
    import os
    import time

    import numpy as np
    import fedkube.trainer_sdk as fk

    fk.init()
    while fk.is_running():
        model = fk.receive()
        if model.params is None:
            params = {{"w": np.zeros({FEATURES}, dtype=np.float32), "b": np.zeros(1, dtype=np.float32)}}
        else:
            params = {{k: v + 0.5 for k, v in model.params.items()}}
        fk.log_metric("train_loss", 1.0 / (1 + model.round), round=model.round)
        if model.round == model.total_rounds:
            # Hold the last result until the test has scraped (bounded: the job still ends if the test died).
            deadline = time.monotonic() + 90
            while not os.path.exists(os.environ["TEST_GATE"]) and time.monotonic() < deadline:
                time.sleep(0.05)
        fk.send(fk.FLModel(params=params, num_examples=10))
""")

MODEL_BYTES = FEATURES * 4 + 4


def _lines(stream: IO[str], out: queue.Queue[str | None]) -> None:
    for line in stream:
        out.put(line)
    out.put(None)


def _wait_line(lines: queue.Queue[str | None], prefix: str, seen: list[str], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no line starting {prefix!r} within {timeout} s; stderr so far:\n"
                                 + "".join(seen[-40:]))
        try:
            line = lines.get(timeout=left)
        except queue.Empty:
            continue
        if line is None:
            raise AssertionError(f"fedkube run ended before printing {prefix!r}; stderr:\n" + "".join(seen[-40:]))
        seen.append(line)
        if line.startswith(prefix):
            return line


SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "summary": ("_count", "_sum")}


def scrape(url: str, declared: dict[str, str] | None = None) -> dict[str, list[Sample]]:
    """GET ``url`` and parse the Prometheus text format: sample name -> samples.

    ``declared`` (when given) gets every sample name the endpoint declares with
    ``# TYPE``, mapped to the type, including those of labelled metrics with no
    series yet (a failure counter before the first failure).
    """
    with urllib.request.urlopen(url, timeout=5) as resp:
        assert resp.status == 200
        assert resp.headers.get("Content-Type", "").startswith("text/plain")
        text = resp.read().decode()
    out: dict[str, list[Sample]] = {}
    for family in text_string_to_metric_families(text):
        if declared is not None:
            for suffix in SUFFIXES.get(family.type, ("",)):
                declared[family.name + suffix] = family.type
        for s in family.samples:
            out.setdefault(s.name, []).append(s)
    return out


def value(samples: dict[str, list[Sample]], metric: str, **labels: str) -> float:
    got = [s.value for s in samples.get(metric, []) if labels.items() <= s.labels.items()]
    assert len(got) == 1, f"expected one {metric}{labels}, got {got}"
    return got[0]


def test_fedkube_run_serves_server_and_sidecar_metrics_that_the_dashboard_uses(tmp_path: Path) -> None:
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    gate = tmp_path / "gate"
    clients = "\n".join(f"    - name: {s}" for s in SITES)
    (job_dir / "fljob.yaml").write_text(JOB.format(rounds=ROUNDS, clients=clients, gate=gate))
    (job_dir / "train.py").write_text(TRAIN)
    proc = subprocess.Popen(
        [*fedkube_command(), "run", str(job_dir / "fljob.yaml"), "--json", "--no-progress",
         "--run-dir", str(tmp_path / "run")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    lines: queue.Queue[str | None] = queue.Queue()
    seen: list[str] = []
    assert proc.stderr is not None
    threading.Thread(target=_lines, args=(proc.stderr, lines), daemon=True).start()
    try:
        line = _wait_line(lines, "metrics: ", seen, timeout=60)
        words = line.split()[1:]
        urls = dict(zip(words[::2], words[1::2], strict=True))
        assert set(urls) == {"server", *SITES}, line
        assert len(set(urls.values())) == len(urls), "each process needs its own metrics port"

        server_url, sidecar_url = urls["server"], urls["site-a"]
        # Rounds 1 and 2 are done once the server says so; round 3 then waits on the gate.
        until(lambda: value(scrape(server_url), "fedkube_server_rounds_completed_total", fljob="metrics-live")
               >= ROUNDS - 1, "two completed rounds", timeout=90)
        declared: dict[str, str] = {}
        server = scrape(server_url, declared)
        sidecar = scrape(sidecar_url, declared)

        job = {"fljob": "metrics-live"}
        assert value(server, "fedkube_server_rounds_completed_total", **job) == ROUNDS - 1
        assert value(server, "fedkube_server_rounds_planned", **job) == ROUNDS
        # Two finished rounds: each sent the model to both sites and pulled both results back.
        assert value(server, "fedkube_server_transfer_bytes_total", direction="to_clients", **job) >= (
            2 * len(SITES) * MODEL_BYTES)
        assert value(server, "fedkube_server_transfer_bytes_total", direction="from_clients", **job) >= (
            2 * len(SITES) * MODEL_BYTES)
        assert value(server, "fedkube_component_info", component="server", **job) == 1
        assert value(server, "process_resident_memory_bytes") > 10 << 20

        site = {"fljob": "metrics-live", "site": "site-a"}
        assert value(sidecar, "fedkube_component_info", component="sidecar", **site) == 1
        assert value(sidecar, "fedkube_sidecar_upstream_connected", **site) == 1
        # This site received rounds 2 and 3's model and sent round 1 and 2's result at least.
        assert value(sidecar, "fedkube_sidecar_relayed_bytes_total", direction="to_trainer", **site) >= (
            2 * MODEL_BYTES)
        assert value(sidecar, "fedkube_sidecar_relayed_bytes_total", direction="to_server", **site) >= (
            2 * MODEL_BYTES)
        assert value(sidecar, "fedkube_sidecar_trainer_state", state="Running", **site) == 1
        assert value(sidecar, "fedkube_trainer_metric", name="train_loss", **site) > 0
        rss = value(sidecar, "process_resident_memory_bytes")
        assert 10 << 20 < rss < 2 << 30, rss

        # Every metric the Grafana dashboard queries for the server, sidecars and trainers is live.
        from tests.unit.chart.test_dashboard import load, metric_names, parse, queries

        live = set(server) | set(sidecar)
        wanted = {n for _, expr in queries(load()) for n in metric_names(parse(expr))
                  if not n.startswith("fedkube_operator_")}
        assert wanted, "the dashboard names no metrics"
        absent = sorted(wanted - live - set(declared))
        assert not absent, f"dashboard metrics the live /metrics do not export: {absent}"
        # Declared without a series yet: only counters of things that did not happen in a clean run
        # (failures, retries, rejections by reason); everything else has a value from the start.
        not_yet = {n: declared[n] for n in wanted - live}
        assert set(not_yet.values()) <= {"counter"}, not_yet
    finally:
        gate.touch()
        try:
            out, _ = proc.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    assert proc.returncode == 0, "".join(seen[-40:])
    result = json.loads(out)
    assert result["outcome"] == "Succeeded"
    assert result["metrics"] == urls
