"""Real processes: trainer scripts using the SDK, the sidecar process, against the scripted server."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from fedkube import envvars
from fedkube.sidecar.app import Sidecar
from fedkube.sidecar.config import SIDECAR_EXIT_ON_STOP
from fedkube.wire.v1 import control_pb2
from tests.integration.sidecar.conftest import JOB, SITE, TOKEN, make_sidecar
from tests.integration.sidecar.fake_server import FakeServer
from tests.support.tls import session_pki
from tests.support.waiting import free_port

pytestmark = pytest.mark.timeout(90)
ROOT = Path(__file__).resolve().parents[3]


def _trainer(tmp_path: Path, body: str, sidecar_port: int) -> subprocess.Popen[str]:
    script = tmp_path / "train.py"
    script.write_text("import numpy as np\nimport fedkube.trainer_sdk as fk\n" + textwrap.dedent(body))
    env = {
        **os.environ,
        envvars.SIDECAR_ADDRESS: f"127.0.0.1:{sidecar_port}",
        envvars.SITE: SITE,
        envvars.JOB: JOB,
        envvars.WORKDIR: str(tmp_path),
        "PYTHONPATH": str(ROOT),
    }
    return subprocess.Popen(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def _state(server: FakeServer, phase: int, kind: int | None = None, timeout: float = 20) -> control_pb2.TrainerState:
    return server.wait_message(  # type: ignore[no-any-return]
        "trainer_state", lambda s: s.phase == phase and (kind is None or s.kind == kind), timeout
    )


@pytest.mark.parametrize(
    ("raise_stmt", "kind", "text"),
    [
        ("raise ValueError('boom in user code')", control_pb2.FAILURE_KIND_EXCEPTION, "ValueError: boom in user code"),
        (
            "from fedkube.errors import ConfigError\n    raise ConfigError('lr must be > 0')",
            control_pb2.FAILURE_KIND_CONFIG_ERROR,
            "ConfigError: lr must be > 0",
        ),
    ],
    ids=["exception", "config-error"],
)
def test_unhandled_exception_reported_with_kind(
    server: FakeServer, sidecar: Sidecar, tmp_path: Path, raise_stmt: str, kind: int, text: str
) -> None:
    proc = _trainer(
        tmp_path,
        f"""
fk.init()
while fk.is_running():
    model = fk.receive()
    {raise_stmt}
""",
        sidecar.port,
    )
    server.publish_task(SITE, {"w": np.zeros(4, np.float32)}, task_id="t1")
    state = _state(server, control_pb2.TRAINER_PHASE_FAILED, kind)
    assert text in state.message
    out, _ = proc.communicate(timeout=20)
    assert proc.returncode != 0
    assert "Traceback" in out  # the user still sees their traceback (the SDK chains sys.excepthook)



def _blocked_in_send(server: FakeServer, sidecar: Sidecar, tmp_path: Path) -> subprocess.Popen[str]:
    """A trainer that announced its result of task t1 and is blocked in send(): the server has not pulled it."""
    proc = _trainer(
        tmp_path,
        """
fk.init()
while fk.is_running():
    model = fk.receive()
    fk.send(fk.FLModel(params={"w": model.params["w"] + 1}, num_examples=3))
""",
        sidecar.port,
    )
    server.publish_task(SITE, {"w": np.zeros(1000, np.float32)}, task_id="t1")
    server.wait_message("result", lambda r: r.task_id == "t1")
    return proc


def test_trainer_killed_before_download_is_exited_before_download(
    server: FakeServer, sidecar: Sidecar, tmp_path: Path
) -> None:
    proc = _blocked_in_send(server, sidecar, tmp_path)
    # The server has not downloaded the result: the trainer is still blocked in send(). Kill it there.
    assert proc.poll() is None
    proc.kill()
    proc.wait(10)
    state = _state(server, control_pb2.TRAINER_PHASE_FAILED, control_pb2.FAILURE_KIND_EXITED_BEFORE_DOWNLOAD)
    assert "downloading its result" in state.message
    assert sidecar.trainer.state.kind == control_pb2.FAILURE_KIND_EXITED_BEFORE_DOWNLOAD
    # A pull after that is answered in-band with an error that says why, instead of hanging.
    ann = server.wait_message("result", lambda r: r.task_id == "t1")
    with pytest.raises(RuntimeError, match="the trainer is not connected to its sidecar"):
        server.pull(SITE, ann)


@pytest.mark.parametrize("server_end", ["stop", "gone"])
def test_trainer_stopped_after_the_server_ended_is_not_blamed_for_a_download(
    server: FakeServer, sidecar: Sidecar, tmp_path: Path, server_end: str
) -> None:
    # What fedkube run does once the server exited: it stops the trainers still blocked in send().
    proc = _blocked_in_send(server, sidecar, tmp_path)
    if server_end == "stop":
        server.send(SITE, control_pb2.ServerMessage(stop=control_pb2.Stop(success=True, reason="Completed")))
        server.wait_for(lambda: sidecar.tasks.stopped is not None)
    else:
        server.stop()
        server.wait_for(lambda: not sidecar.upstream.connected.is_set())
    proc.kill()
    proc.wait(10)
    state = server.wait_for(lambda: sidecar.trainer.state if sidecar.trainer.state.final else None)
    assert "still downloading" not in state.message
    if server_end == "stop":
        assert state.phase == control_pb2.TRAINER_PHASE_EXITED
        assert "after the server had stopped the job" in state.message
    else:
        assert "not connected to the server" in state.message


def test_script_leaving_before_the_job_ends_is_exited_not_finished(
    server: FakeServer, sidecar: Sidecar, tmp_path: Path
) -> None:
    """sys.exit() hides its code from exit hooks; only a trainer that saw the job's end says 'finished'."""
    proc = _trainer(
        tmp_path,
        """
import sys
fk.init()
model = fk.receive()
assert fk.send(fk.FLModel(params={"w": model.params["w"] + 1}, num_examples=3))
sys.exit(3)
""",
        sidecar.port,
    )
    server.publish_task(SITE, {"w": np.zeros(4, np.float32)}, task_id="t1")
    ann = server.wait_message("result", lambda r: r.task_id == "t1")
    server.pull(SITE, ann)
    server.result_received(SITE, "t1")
    assert proc.wait(20) == 3, proc.communicate()[0]
    state = _state(server, control_pb2.TRAINER_PHASE_EXITED)
    assert state.kind == control_pb2.FAILURE_KIND_UNSPECIFIED  # its result was delivered: teardown noise
    assert sidecar.trainer.state.phase == control_pb2.TRAINER_PHASE_EXITED


def _vm_hwm(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_sidecar_process_full_round_bounded_memory_and_exit_on_stop(tmp_path: Path) -> None:
    """64 MiB forward and 64 MiB back through a sidecar process whose peak RSS barely moves."""
    server = FakeServer(JOB, {SITE: TOKEN}).start()
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    port = free_port()
    env = {
        **os.environ,
        envvars.JOB: JOB,
        envvars.SITE: SITE,
        envvars.SERVER_ADDRESS: server.address,
        envvars.TOKEN_FILE: str(token),
        **session_pki().site_env(SITE),
        envvars.TRAINER_PORT: str(port),
        SIDECAR_EXIT_ON_STOP: "1",
        "PYTHONPATH": str(ROOT),
    }
    sc = subprocess.Popen(
        [sys.executable, "-c", "import sys; from fedkube.sidecar.app import main; sys.exit(main())"],
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    trainer = None
    try:
        server.wait_registered(SITE, timeout=20)
        trainer = _trainer(
            tmp_path,
            """
import logging
fk.init()
while fk.is_running():
    model = fk.receive()
    fk.send(fk.FLModel(params={"w": model.params["w"] + 1}, num_examples=3))
    fk.log_metric("done", 1.0)
""",
            port,
        )
        _state(server, control_pb2.TRAINER_PHASE_RUNNING)
        baseline = _vm_hwm(sc.pid)
        size = 64 << 20
        g = np.arange(size // 4, dtype=np.float32)
        server.publish_task(SITE, {"w": g}, task_id="t1")
        ann = server.wait_message("result", lambda r: r.task_id == "t1", timeout=60)
        del g
        got = server.pull(SITE, ann)
        assert got["w"][:3].tolist() == [1.0, 2.0, 3.0] and got["w"][-1] == size // 4
        del got
        server.result_received(SITE, "t1")
        server.wait_message("metrics", lambda m: "done" in m.values, timeout=30)
        growth = _vm_hwm(sc.pid) - baseline
        # The relay holds a few chunks per stream, never the 64 MiB tensor (LESSONS.md 4).
        assert growth < 32 << 20, f"sidecar peak RSS grew by {growth / 2**20:.1f} MiB relaying 64 MiB each way"
        server.send(SITE, control_pb2.ServerMessage(stop=control_pb2.Stop(success=True, reason="Done")))
        assert trainer.wait(30) == 0, trainer.communicate()[0]
        _state(server, control_pb2.TRAINER_PHASE_FINISHED)
        assert sc.wait(30) == 0
    finally:
        for p in (trainer, sc):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(10)
        server.stop()


def test_rejected_registration_exits_2(server: FakeServer, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("not-the-token")
    env = {
        **os.environ,
        envvars.JOB: JOB,
        envvars.SITE: SITE,
        envvars.SERVER_ADDRESS: server.address,
        envvars.TOKEN_FILE: str(token),
        **session_pki().site_env(SITE),
        envvars.TRAINER_PORT: str(free_port()),
        "PYTHONPATH": str(ROOT),
    }
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from fedkube.sidecar.app import main; sys.exit(main())"],
        env=env,
        text=True,
        capture_output=True,
        timeout=30,
    )
    assert proc.returncode == 2, proc.stderr
    assert "rejected the registration (Unauthenticated): bad token for this site" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_token_file_is_a_config_error_exit_2(tmp_path: Path) -> None:
    env = {
        **os.environ,
        envvars.JOB: JOB,
        envvars.SITE: SITE,
        envvars.SERVER_ADDRESS: "127.0.0.1:1",
        envvars.TOKEN_FILE: str(tmp_path / "missing"),
        **session_pki().site_env(SITE),
        "PYTHONPATH": str(ROOT),
    }
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from fedkube.sidecar.app import main; sys.exit(main())"],
        env=env,
        text=True,
        capture_output=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert envvars.TOKEN_FILE in proc.stderr and "cannot be read" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unreachable_server_retries_without_traceback_then_connects(caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()
    sc = make_sidecar(f"127.0.0.1:{port}")
    caplog.set_level(logging.INFO, logger="fedkube.sidecar")
    sc.start()
    server = None
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            retries = [r for r in caplog.records if "not reachable, retrying in" in r.getMessage()]
            if len(retries) >= 2:
                break
            time.sleep(0.05)
        assert len(retries) >= 2
        assert f"server 127.0.0.1:{port} not reachable, retrying in" in retries[0].getMessage()
        assert "(attempt 1)" in retries[0].getMessage() and "(attempt 2)" in retries[1].getMessage()
        assert all(r.exc_info is None for r in caplog.records), "expected conditions must not log stack traces"
        server = FakeServer(JOB, {SITE: TOKEN}, port=port).start()
        reg = server.wait_registered(SITE, timeout=10)
        assert reg.job == JOB and reg.protocol_version == 1 and reg.session_id == sc.upstream.session_id
    finally:
        sc.stop(grace=0.5)
        if server is not None:
            server.stop()


def test_reconnect_resumes_task_and_reannounces_result(tmp_path: Path) -> None:
    port = free_port()
    server = FakeServer(JOB, {SITE: TOKEN}, port=port).start()
    sc = make_sidecar(server.address)
    sc.start()
    proc = None
    try:
        server.wait_registered(SITE)
        proc = _trainer(
            tmp_path,
            """
fk.init()
while fk.is_running():
    model = fk.receive()
    fk.send(fk.FLModel(params={"w": model.params["w"] * 2}, num_examples=1))
""",
            sc.port,
        )
        server.publish_task(SITE, {"w": np.ones(10, np.float32)}, task_id="t7", round=3)
        server.wait_message("result", lambda r: r.task_id == "t7")
        server.stop()  # the server goes away mid-task
        server = FakeServer(JOB, {SITE: TOKEN}, port=port).start()
        reg = server.wait_registered(SITE, timeout=15)
        assert reg.resume_task_id == "t7" and reg.session_id == sc.upstream.session_id
        ann = server.wait_message("result", lambda r: r.task_id == "t7")  # re-announced on the new stream
        assert server.pull(SITE, ann)["w"].tolist() == [2.0] * 10
        server.result_received(SITE, "t7")
        server.send(SITE, control_pb2.ServerMessage(stop=control_pb2.Stop(success=True)))
        assert proc.wait(20) == 0
        _state(server, control_pb2.TRAINER_PHASE_FINISHED)
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        sc.stop(grace=0.5)
        server.stop()


def test_sidecar_rss_is_sampled_from_a_live_process() -> None:
    """Guard for the memory test above: VmHWM is read from /proc and moves when a process allocates."""
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; b = bytearray(96 << 20); sys.stdin.read()"],
        stdin=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 10
        while _vm_hwm(proc.pid) < 96 << 20 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _vm_hwm(proc.pid) >= 96 << 20
        assert psutil.Process(proc.pid).is_running()
    finally:
        proc.kill()
        proc.wait(10)


def test_trainer_port_in_use_is_a_config_error(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        token = tmp_path / "token"
        token.write_text(TOKEN)
        env = {**os.environ, envvars.JOB: JOB, envvars.SITE: SITE, envvars.SERVER_ADDRESS: "127.0.0.1:1",
               envvars.TOKEN_FILE: str(token), envvars.TRAINER_PORT: str(busy.getsockname()[1]),
               **session_pki().site_env(SITE),
               "PYTHONPATH": str(ROOT)}
        proc = subprocess.run(
            [sys.executable, "-c", "import sys; from fedkube.sidecar.app import main; sys.exit(main())"],
            env=env, text=True, capture_output=True, timeout=30)
    assert proc.returncode == 2, proc.stderr
    assert envvars.TRAINER_PORT in proc.stderr and "Traceback" not in proc.stderr
