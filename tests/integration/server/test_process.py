"""`fedkube server` as a process: configuration errors exit 2, SIGTERM stops the job gracefully."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedkube import envvars
from fedkube.logs import unconfigure_logging
from fedkube.server.app import main
from fedkube.termination import TerminationSummary
from tests.integration.server.conftest import token_of
from tests.integration.server.fakes import FakeSidecar, Reply
from tests.support.tls import session_pki
from tests.support.waiting import free_port, until

pytestmark = pytest.mark.timeout(60)

SPEC = """\
apiVersion: fedkube.dev/v1alpha1
kind: FLJob
metadata:
  name: {job}
spec:
  rounds: 2
  minClients: {min_clients}
  clients:
    - name: site-a
    - name: site-b
  trainer:
    image: example/trainer:1
    command: ["python", "train.py"]
  timeouts:
    registrationSeconds: 60
"""


def write_job(tmp_path: Path, *, job: str = "procjob", min_clients: int = 1, tokens: tuple[str, ...] = ("site-a",
              "site-b")) -> dict[str, str]:
    spec = tmp_path / "fljob.yaml"
    spec.write_text(SPEC.format(job=job, min_clients=min_clients))
    tokens_dir = tmp_path / "tokens"
    tokens_dir.mkdir()
    for site in tokens:
        (tokens_dir / site).write_text(token_of(site) + "\n")
    return {
        envvars.JOB: job,
        envvars.SPEC_FILE: str(spec),
        envvars.TOKENS_DIR: str(tokens_dir),
        envvars.GRPC_PORT: "0",
        envvars.STATUS_PORT: "0",
        envvars.TERMINATION_LOG: str(tmp_path / "termination-log"),
        **session_pki(job).server_env(),
    }


@pytest.fixture
def restored_logging() -> Iterator[None]:
    """``main()`` in this process installs its log handler on this test's captured stderr: take it off again."""
    yield
    unconfigure_logging()


@pytest.mark.usefixtures("restored_logging")
@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({envvars.JOB: ""}, "FEDKUBE_JOB is not set"),
        ({envvars.SPEC_FILE: "/nonexistent/fljob.yaml"}, "FEDKUBE_SPEC_FILE='/nonexistent/fljob.yaml' does not exist"),
        ({envvars.GRPC_PORT: "seventy"}, "FEDKUBE_GRPC_PORT='seventy' is not a port number"),
        ({"min_clients": 3}, "minClients"),
        ({"tokens": ("site-a",)}, "no token file for sites ['site-b']"),
    ],
)
def test_configuration_errors_exit_2_naming_the_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], change: dict[str, object],
    expected: str,
) -> None:
    kw = {k: v for k, v in change.items() if k in ("min_clients", "tokens")}
    env = write_job(tmp_path, **kw)  # type: ignore[arg-type]
    env.update({k: str(v) for k, v in change.items() if k.startswith("FEDKUBE_")})
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["--bind", "127.0.0.1"]) == 2
    assert expected in capsys.readouterr().err


def _ready(proc: subprocess.Popen[str], status_port: int) -> bool:
    """Wait (bounded) for the server's /readyz over real HTTP; False when it exited first, e.g. a lost port race."""

    def up() -> str | None:
        if proc.poll() is not None:
            return "exited"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{status_port}/readyz", timeout=1) as r:
                return "ready" if r.status == 200 else None
        except OSError:
            return None

    if until(up, "the server's /readyz", timeout=20) == "ready":
        return True
    out, err = proc.communicate()
    assert "bind" in out + err or "listen" in out + err, out + err  # only a lost port race is retried
    return False


def test_sigterm_stops_clients_writes_the_summary_and_exits_1(tmp_path: Path) -> None:
    env = write_job(tmp_path, min_clients=1)
    code = "import sys; from fedkube.server.app import main; sys.exit(main(['--bind', '127.0.0.1']))"
    for attempt in range(3):
        # free_port() closes the port again before the server binds it: on a busy machine another process can take
        # it in between (the server then exits 2, "cannot listen"). Start again on new ports, a bounded few times.
        grpc_port, status_port, metrics_port = free_port(), free_port(), free_port()
        env.update({envvars.GRPC_PORT: str(grpc_port), envvars.STATUS_PORT: str(status_port),
                    envvars.METRICS_PORT: str(metrics_port)})
        proc = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, **env}, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        if _ready(proc, status_port) or attempt == 2:
            break
    sidecar = None
    try:
        assert proc.poll() is None, proc.communicate()
        sidecar = FakeSidecar(f"127.0.0.1:{grpc_port}", "procjob", "site-a", token_of("site-a"),
                              lambda task, params: Reply(None), tls=session_pki("procjob").client_tls("site-a")).start()
        sidecar.wait_for(lambda: any(m.WhichOneof("msg") == "registered" for m in sidecar.messages),
                         what="registration")
        wanted = 'fedkube_server_clients{fljob="procjob",state="Registered"} 1.0'

        def registered() -> bool:
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
                return wanted in r.read().decode()

        # The status snapshot and the gauge follow the registration shortly after it.
        until(registered, f"/metrics to show {wanted}", timeout=10)
        proc.send_signal(signal.SIGTERM)
        stop = sidecar.wait_stop(timeout=15)
        assert not stop.success and stop.reason == "Terminated" and "SIGTERM" in stop.message
        _, err = proc.communicate(timeout=20)
        assert proc.returncode == 1, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        if sidecar is not None:
            sidecar.close()
    text = (tmp_path / "termination-log").read_text()
    assert len(text.encode()) <= 4096
    summary = TerminationSummary.from_json(text)
    assert summary.exit_code == 1 and summary.phase.value == "Failed" and summary.reason == "Terminated"
    assert {c.name: c.state for c in summary.clients} == {"site-a": "Registered", "site-b": "Pending"}
    assert json.loads(text)["job"] == "procjob"
