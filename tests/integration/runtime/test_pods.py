"""run_pod and LocalJobRun with real processes: output, order, restarts, exit codes, no orphans."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import psutil
import pytest

from fedkube import envvars
from fedkube.runtime.cli import format_outcome, outcome_json
from fedkube.runtime.local import LocalJobRun, RunOptions
from fedkube.runtime.pod import ManifestObjects, PodOptions, run_pod
from fedkube.runtime.resolver import LocalResolver
from fedkube.status import Phase

pytestmark = pytest.mark.timeout(60)


class CollectSink:
    """Keeps every emitted line (thread-safe)."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []
        self._lock = threading.Lock()

    def emit(self, prefix: str, line: str) -> None:
        with self._lock:
            self.lines.append((prefix, line))


def _py(code: str) -> list[str]:
    return ["python", "-c", textwrap.dedent(code)]


def _container(name: str, code: str, env: dict[str, str] | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "command": _py(code),
        "env": [{"name": k, "value": v} for k, v in (env or {}).items()],
        **extra,
    }


def _greeted_trainer() -> dict[str, Any]:
    """A main container that reads the sidecar's greeting at FEDKUBE_SIDECAR_ADDRESS and prints it."""
    return _container(
        "trainer",
        """
        import os, socket
        host, port = os.environ["FEDKUBE_SIDECAR_ADDRESS"].split(":")
        with socket.create_connection((host, int(port)), timeout=5) as c:
            print("got", c.recv(5).decode())
        """,
        {envvars.SIDECAR_ADDRESS: "127.0.0.1:7071"},
    )


def _pod(name: str, containers: list[dict[str, Any]], init: list[dict[str, Any]] | None = None, **labels: str) -> dict:
    return {
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "labels": labels},
        "spec": {"containers": containers, "initContainers": init or []},
    }


def _options(tmp_path: Path, sink: CollectSink, **kw: Any) -> PodOptions:
    return PodOptions(run_dir=tmp_path, resolver=LocalResolver(), objects=ManifestObjects([]), sink=sink, **kw)


def test_output_is_captured_once_with_prefix_and_log_file(tmp_path: Path) -> None:
    sink = CollectSink()
    code = """
        import sys
        print("to stdout")
        print("to stderr", file=sys.stderr)
        sys.stdout.write("no newline at the end")
    """
    run = run_pod(_pod("p", [_container("trainer", code)]), _options(tmp_path, sink))
    result = run.wait(30)
    assert result is not None and result.phase == "Succeeded"
    lines = sorted(line for prefix, line in sink.lines if prefix == "p trainer")
    assert lines == ["no newline at the end", "to stderr", "to stdout"]
    log = (tmp_path / "logs" / "p.trainer.log").read_text().splitlines()
    assert sorted(log) == lines  # once in the file too, unprefixed


def test_sidecar_is_listening_before_main_starts_and_is_stopped_after(tmp_path: Path) -> None:
    sidecar = _container(
        "sidecar",
        """
        import os, socket, time
        s = socket.socket(); s.bind(("127.0.0.1", int(os.environ["FEDKUBE_TRAINER_PORT"]))); s.listen()
        time.sleep(1.0)  # slow after binding is fine; before binding, the main container would fail
        while True:
            conn, _ = s.accept(); conn.sendall(b"hello"); conn.close()
        """,
        {envvars.TRAINER_PORT: "7071"},
        restartPolicy="Always",
    )
    main = _greeted_trainer()
    sink = CollectSink()
    run = run_pod(_pod("p", [main], init=[sidecar]), _options(tmp_path, sink, sidecar_grace_s=0.2))
    result = run.wait(30)
    assert result is not None, "pod did not finish"
    assert result.phase == "Succeeded", (result, sink.lines)
    assert ("p trainer", "got hello") in sink.lines
    side = result.container("sidecar")
    assert side is not None and side.stopped_by_runtime  # it never exits by itself: SIGTERM after the grace
    assert side.exit_code == 143  # reported as Kubernetes does: 128 + SIGTERM


def test_crashing_sidecar_is_restarted_while_main_runs(tmp_path: Path) -> None:
    marker = tmp_path / "attempts"
    sidecar = _container(
        "sidecar",
        f"""
        import pathlib, sys, time
        m = pathlib.Path({str(marker)!r}); n = int(m.read_text()) if m.exists() else 0
        m.write_text(str(n + 1))
        if n == 0:
            sys.exit(3)
        time.sleep(60)
        """,
        restartPolicy="Always",
    )
    main = _container(
        "trainer",
        f"""
        import pathlib, time
        m = pathlib.Path({str(marker)!r})
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not (m.exists() and m.read_text() == "2"):
            time.sleep(0.05)
        print("sidecar attempts", m.read_text())
        """,
    )
    sink = CollectSink()
    result = run_pod(_pod("p", [main], init=[sidecar]), _options(tmp_path, sink, sidecar_grace_s=0.1)).wait(40)
    assert result is not None and result.phase == "Succeeded"
    assert ("p trainer", "sidecar attempts 2") in sink.lines
    side = result.container("sidecar")
    assert side is not None and side.restarts == 1


def test_failing_init_container_fails_the_pod_without_starting_main(tmp_path: Path) -> None:
    init = _container("setup", "import sys; sys.exit(4)")
    main = _container("trainer", "print('must not run')")
    sink = CollectSink()
    result = run_pod(_pod("p", [main], init=[init]), _options(tmp_path, sink)).wait(30)
    assert result is not None and result.phase == "Failed"
    assert "exited with code 4" in result.message
    trainer = result.container("trainer")
    assert trainer is not None and trainer.exit_code is None
    assert not any(line == "must not run" for _, line in sink.lines)


def test_reported_ports_reach_the_main_container_even_after_the_sidecar_crashed_before_listening(
    tmp_path: Path,
) -> None:
    marker = tmp_path / "attempts"
    sidecar = _container(
        "sidecar",
        f"""
        import json, os, pathlib, socket, sys
        from fedkube import portfile
        m = pathlib.Path({str(marker)!r}); n = int(m.read_text()) if m.exists() else 0
        m.write_text(str(n + 1))
        if n == 0:
            sys.exit(3)  # before it listens: the port it will get is not known yet
        ports_file = portfile.path_from_env()
        assert ports_file is not None and os.environ["FEDKUBE_TRAINER_PORT"] == "7071"
        s = socket.socket(); s.bind(("127.0.0.1", portfile.chosen(ports_file, "FEDKUBE_TRAINER_PORT", 7071)))
        s.listen()
        portfile.report(ports_file, {{"FEDKUBE_TRAINER_PORT": s.getsockname()[1]}})
        while True:
            conn, _ = s.accept(); conn.sendall(b"hello"); conn.close()
        """,
        {envvars.TRAINER_PORT: "7071"},
        restartPolicy="Always",
    )
    main = _greeted_trainer()
    sink = CollectSink()
    options = _options(tmp_path, sink, sidecar_grace_s=0.2, ports_reported=True)
    result = run_pod(_pod("p", [main], init=[sidecar]), options).wait(40)
    assert result is not None and result.phase == "Succeeded", (result, sink.lines)
    assert ("p trainer", "got hello") in sink.lines
    side = result.container("sidecar")
    assert side is not None and side.restarts == 1
    reported = json.loads((tmp_path / "pods" / "p" / "sidecar.ports").read_text())["FEDKUBE_TRAINER_PORT"]
    assert options.resolver.reported("default/p", 7071) == reported != 7071


def _job_manifests(server_code: str, trainer_code: str, sites: tuple[str, ...] = ("site-a",)) -> list[dict]:
    server = _pod(
        "job-server",
        [
            _container(
                "server",
                server_code,
                {envvars.GRPC_PORT: "7070", envvars.TERMINATION_LOG: "/dev/termination-log"},
                terminationMessagePath="/dev/termination-log",
            )
        ],
        **{"fedkube.dev/role": "server"},
    )
    service = {
        "kind": "Service",
        "metadata": {"name": "job-server", "namespace": "default"},
        "spec": {"selector": {"fedkube.dev/role": "server"}, "ports": [{"port": 7070}]},
    }
    clients = [
        _pod(
            f"job-client-{site}",
            [_container("trainer", trainer_code, {envvars.SERVER_ADDRESS: "job-server.default.svc:7070"})],
            **{"fedkube.dev/role": "client", "fedkube.dev/site": site},
        )
        for site in sites
    ]
    return [server, service, *clients]


# As fedkube's own processes do under LocalJobRun: bind a port the OS picks, report it (fedkube.portfile).
LISTEN = """
    import os, socket
    from fedkube import portfile
    ports_file = portfile.path_from_env()
    s = socket.socket()
    s.bind(("127.0.0.1", portfile.chosen(ports_file, "FEDKUBE_GRPC_PORT", int(os.environ["FEDKUBE_GRPC_PORT"]))))
    s.listen()
    portfile.report(ports_file, {"FEDKUBE_GRPC_PORT": s.getsockname()[1]})
"""

SUMMARY_OK = {"exitCode": 0, "job": "job", "phase": "Succeeded", "round": 3, "rounds": 3, "completedRounds": 3}
SERVER_OK = LISTEN + f"""
    import json, os, socket, time
    time.sleep(0.5)
    open(os.environ["FEDKUBE_TERMINATION_LOG"], "w").write(json.dumps({SUMMARY_OK!r}))
"""


def test_server_exit_decides_and_trainer_teardown_noise_is_only_noted(tmp_path: Path) -> None:
    trainer = """
        import os, socket, sys
        host, port = os.environ["FEDKUBE_SERVER_ADDRESS"].split(":")
        socket.create_connection((host, int(port)), timeout=5).close()
        print("reached the server through its Service name")
        sys.exit(1)
    """
    sink = CollectSink()
    run = LocalJobRun(_job_manifests(SERVER_OK, trainer), RunOptions(run_dir=tmp_path, sink=sink), job_name="job")
    run.start()
    outcome = run.wait()
    run.stop_all()
    assert outcome.exit_code == 0
    assert outcome.summary is not None
    assert (outcome.summary.phase, outcome.summary.round, outcome.summary.rounds) == (Phase.SUCCEEDED, 3, 3)
    assert outcome_json("job", outcome)["summary"] == SUMMARY_OK | {"clients": []}
    assert ("site-a trainer", "reached the server through its Service name") in sink.lines
    assert any("site-a trainer: exited with code 1" in n and "teardown noise" in n for n in outcome.notes)


@pytest.mark.parametrize("code", [1, 2])
def test_server_failure_and_config_error_codes_pass_through(tmp_path: Path, code: int) -> None:
    server = f"import sys; sys.exit({code})"
    run = LocalJobRun(
        _job_manifests(server, "print('ok')"), RunOptions(run_dir=tmp_path, sink=CollectSink()), job_name="job"
    )
    run.start()
    outcome = run.wait()
    run.stop_all()
    assert outcome.exit_code == code
    assert outcome.summary is None


# What a hostile or broken server could leave at its termination-message path.
HOSTILE_SUMMARIES = {
    "oversized": "open(path, 'wb').truncate(64 << 20)",  # 64 MiB: the runtime must not read it whole
    "nesting": "open(path, 'w').write('[' * 4000)",
    "wrong-types": "open(path, 'w').write(json.dumps({'exitCode': '0', 'job': 7, 'phase': 'Done', 'round': -1}))",
}


@pytest.mark.parametrize("kind", sorted(HOSTILE_SUMMARIES))
def test_a_hostile_summary_is_reported_clearly_and_the_exit_code_decides(tmp_path: Path, kind: str) -> None:
    server = LISTEN + f"""
    import json, os, sys
    path = os.environ["FEDKUBE_TERMINATION_LOG"]
    {HOSTILE_SUMMARIES[kind]}
    sys.exit(1)
"""
    run = LocalJobRun(
        _job_manifests(server, "print('ok')"), RunOptions(run_dir=tmp_path, sink=CollectSink()), job_name="job"
    )
    run.start()
    outcome = run.wait()
    run.stop_all()
    assert outcome.exit_code == 1 and outcome.summary is None  # the exit code decides, as with no summary
    path = tmp_path / "pods" / "job-server" / "server.termination-log"
    note = outcome.notes[0]
    assert f"termination summary was ignored: {path}: " in note and "exit code" in note, outcome.notes
    expected = {
        "oversized": f"{64 << 20} bytes, more than the 4096",
        "nesting": "not valid JSON",
        "wrong-types": "termination summary.exitCode: expected int, got '0'",
    }[kind]
    assert expected in note
    text = format_outcome("job", outcome)
    assert text.startswith("job job: Failed (exit code 1)") and note in text and "rounds:" not in text
    doc = json.loads(json.dumps(outcome_json("job", outcome)))
    assert doc["summary"] is None and doc["notes"][0] == note


def test_clients_still_running_after_the_grace_are_stopped(tmp_path: Path) -> None:
    trainer = "import time; time.sleep(120)"
    options = RunOptions(run_dir=tmp_path, sink=CollectSink(), client_grace_s=0.5, stop_grace_s=1.0)
    run = LocalJobRun(_job_manifests(SERVER_OK, trainer), options, job_name="job")
    run.start()
    started = time.monotonic()
    outcome = run.wait()
    assert time.monotonic() - started < 20
    assert outcome.exit_code == 0
    trainer_result = outcome.pods["job-client-site-a"].container("trainer")
    assert trainer_result is not None and trainer_result.stopped_by_runtime
    assert any("stopped by the runtime" in n for n in outcome.notes)


DRIVER = """
import sys
from pathlib import Path
import json
from fedkube.runtime.cli import execute
from fedkube.runtime.local import LocalJobRun, RunOptions
from fedkube.runtime.process import StreamSink

manifests = json.loads(Path(sys.argv[1]).read_text())
run = LocalJobRun(manifests, RunOptions(run_dir=Path(sys.argv[2]), sink=StreamSink()), job_name="job")
outcome = execute(run)
print("OUTCOME", outcome.exit_code, flush=True)
sys.exit(outcome.exit_code)
"""

# Each container starts a grandchild; both must be gone after Ctrl-C.
SPAWNER = """
import os, socket, subprocess, sys, time
if "FEDKUBE_GRPC_PORT" in os.environ:  # the server: listen, so the runtime starts the clients at once
""" + textwrap.indent(textwrap.dedent(LISTEN), "    ") + """
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
print("spawned", flush=True)
time.sleep(300)
"""


def _marked(mark: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("RUNTIME_TEST_MARK") == mark:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return [p for p in found if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def test_ctrl_c_stops_every_process_and_leaves_no_orphans(tmp_path: Path) -> None:
    mark = uuid.uuid4().hex
    manifests = _job_manifests(SPAWNER, SPAWNER, sites=("site-a", "site-b"))
    (tmp_path / "job.json").write_text(json.dumps(manifests))
    env = {**os.environ, "RUNTIME_TEST_MARK": mark}
    driver = subprocess.Popen(
        [sys.executable, "-c", DRIVER, str(tmp_path / "job.json"), str(tmp_path / "run")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert driver.stdout is not None
        spawned = 0
        deadline = time.monotonic() + 30
        while spawned < 3 and time.monotonic() < deadline:
            line = driver.stdout.readline()
            spawned += line.rstrip().endswith("spawned")
        assert spawned == 3, "server and both trainers should have started"
        # driver + 3 containers + 3 grandchildren; a process that has just started may not show
        # its environment yet, so look again for a bounded while rather than once.
        deadline = time.monotonic() + 10
        while len(_marked(mark)) < 7 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(_marked(mark)) == 7
        driver.send_signal(signal.SIGINT)
        out, _ = driver.communicate(timeout=30)
        assert driver.returncode == 130, out
        assert "OUTCOME 130" in out
        leftovers = _marked(mark)
        assert not leftovers, f"orphans after Ctrl-C: {[p.cmdline() for p in leftovers]}"
    finally:
        if driver.poll() is None:
            driver.kill()
        for proc in _marked(mark):
            proc.kill()


def test_states_report_like_a_kubelet_with_the_termination_message(tmp_path: Path) -> None:
    code = """
        import os, sys
        open(os.environ["FEDKUBE_TERMINATION_LOG"], "w").write('{"phase": "Failed"}')
        sys.exit(1)
    """
    main = _container(
        "server",
        code,
        {envvars.TERMINATION_LOG: "/dev/termination-log"},
        terminationMessagePath="/dev/termination-log",
        image="ghcr.io/fedkube/fedkube:x",
    )
    run = run_pod(_pod("p", [main]), _options(tmp_path, CollectSink()))
    result = run.wait(30)
    assert result is not None and result.phase == "Failed" and run.finished()
    (state,) = run.states()
    assert (state.name, state.kind, state.image) == ("server", "main", "ghcr.io/fedkube/fedkube:x")
    assert (state.exit_code, state.reason, state.running) == (1, "Error", False)
    assert state.message == '{"phase": "Failed"}'
    assert state.started_at is not None and state.finished_at is not None


ABANDON = """
import sys, time
from pathlib import Path
from fedkube.runtime.pod import ManifestObjects, PodOptions, run_pod
from fedkube.runtime.process import StreamSink
from fedkube.runtime.resolver import LocalResolver

command = [sys.executable, "-c", sys.argv[2]]
pod = {"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "command": command}]}}
run = run_pod(pod, PodOptions(run_dir=Path(sys.argv[1]), resolver=LocalResolver(), objects=ManifestObjects([]),
              sink=StreamSink()))
time.sleep(60)
"""


def test_runtime_exiting_without_its_shutdown_still_leaves_no_orphans(tmp_path: Path) -> None:
    """A KeyboardInterrupt nobody handles ends the interpreter; the atexit hook still kills the groups."""
    mark = uuid.uuid4().hex
    driver = subprocess.Popen(
        [sys.executable, "-c", ABANDON, str(tmp_path), SPAWNER],
        env={**os.environ, "RUNTIME_TEST_MARK": mark},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert driver.stdout is not None
        assert driver.stdout.readline().rstrip().endswith("spawned")
        # driver, container, grandchild: the grandchild may still be starting when "spawned" is printed
        deadline = time.monotonic() + 10
        while len(_marked(mark)) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(_marked(mark)) == 3
        driver.send_signal(signal.SIGINT)
        driver.communicate(timeout=20)
        assert driver.returncode != 0
        leftovers = _marked(mark)
        assert not leftovers, [p.cmdline() for p in leftovers]
    finally:
        if driver.poll() is None:
            driver.kill()
        for proc in _marked(mark):
            proc.kill()
