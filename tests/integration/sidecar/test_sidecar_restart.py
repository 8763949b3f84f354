"""A sidecar SIGKILLed and restarted (as a kubelet restarts a native sidecar) while its trainer keeps running."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedkube import envvars
from fedkube.sidecar.config import SIDECAR_EXIT_ON_STOP
from fedkube.wire.v1 import control_pb2
from tests.integration.sidecar.conftest import JOB, SITE, TOKEN
from tests.integration.sidecar.fake_server import FakeServer
from tests.integration.sidecar.test_processes import ROOT, _state, _trainer
from tests.support.tls import session_pki
from tests.support.waiting import free_port, until

pytestmark = pytest.mark.timeout(90)


def _sidecar(server: FakeServer, token: Path, port: int) -> subprocess.Popen[str]:
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
    return subprocess.Popen(
        [sys.executable, "-c", "import sys; from fedkube.sidecar.app import main; sys.exit(main())"],
        env=env,
        text=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def test_trainer_reattaches_to_a_restarted_sidecar_and_never_trains_a_task_twice(tmp_path: Path) -> None:
    server = FakeServer(JOB, {SITE: TOKEN}).start()
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    port = free_port()
    first = _sidecar(server, token, port)
    second = trainer = None
    marks = tmp_path / "marks"
    marks.mkdir()
    try:
        server.wait_registered(SITE, timeout=20)
        trainer = _trainer(
            tmp_path,
            f"""
import pathlib, time
fk.init()
while fk.is_running():
    model = fk.receive()
    mark = pathlib.Path({str(marks)!r}) / f"round-{{model.round}}"
    if mark.exists():
        raise SystemExit(f"round {{model.round}} handed out twice")
    mark.write_text("")
    if model.round == 2:
        time.sleep(3)  # training; meanwhile the sidecar is killed and restarted
    fk.send(fk.FLModel(params={{"w": model.params["w"] + 1}}, num_examples=1))
""",
            port,
        )
        _state(server, control_pb2.TRAINER_PHASE_RUNNING)
        server.publish_task(SITE, {"w": np.zeros(1000, np.float32)}, task_id="t1", round=1)
        ann = server.wait_message("result", lambda r: r.task_id == "t1", timeout=30)
        assert server.pull(SITE, ann)["w"][0] == 1.0
        server.result_received(SITE, "t1")

        # Task t2 reaches the trainer; the sidecar dies while the trainer works on it.
        w2 = np.ones(1000, np.float32)
        t2 = server.publish_task(SITE, {"w": w2}, task_id="t2", round=2)
        until((marks / "round-2").exists, "the trainer to receive task t2", timeout=20)
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        second = _sidecar(server, token, port)
        reg = server.wait_registered(SITE, n=2, timeout=30)
        assert reg.resume_task_id == ""  # a fresh sidecar knows no task: the server sends t2 again
        server.send(SITE, control_pb2.ServerMessage(task=t2))
        ann = server.wait_message("result", lambda r: r.task_id == "t2", timeout=30)
        # Served through the new sidecar: only possible once the trainer said hello to it again.
        assert server.pull(SITE, ann)["w"][0] == 2.0
        server.result_received(SITE, "t2")

        server.publish_task(SITE, {"w": np.full(1000, 5, np.float32)}, task_id="t3", round=3)
        ann = server.wait_message("result", lambda r: r.task_id == "t3", timeout=30)
        assert server.pull(SITE, ann)["w"][0] == 6.0
        server.result_received(SITE, "t3")
        server.send(SITE, control_pb2.ServerMessage(stop=control_pb2.Stop(success=True, reason="Done")))
        assert trainer.wait(30) == 0, trainer.communicate()[0]
        assert sorted(p.name for p in marks.iterdir()) == ["round-1", "round-2", "round-3"]
    finally:
        for p in (trainer, first, second):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(10)
        server.stop()


def test_sidecar_killed_while_the_server_downloads_a_result_gets_it_announced_again(tmp_path: Path) -> None:
    server = FakeServer(JOB, {SITE: TOKEN}).start()
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    port = free_port()
    first = _sidecar(server, token, port)
    second = trainer = None
    try:
        server.wait_registered(SITE, timeout=20)
        trainer = _trainer(
            tmp_path,
            """
fk.init()
while fk.is_running():
    model = fk.receive()
    fk.send(fk.FLModel(params={"w": model.params["w"] + 1}, num_examples=1))
""",
            port,
        )
        server.publish_task(SITE, {"w": np.zeros(1000, np.float32)}, task_id="t1", round=1)
        server.wait_message("result", lambda r: r.task_id == "t1", timeout=30)
        # The trainer now waits in send() for the download; its sidecar dies before the server pulls.
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        second = _sidecar(server, token, port)
        server.wait_registered(SITE, n=2, timeout=30)
        anns = server.wait_for(lambda: [a for a in server.of_kind("result", SITE) if a.task_id == "t1"][1:], 30)
        assert server.pull(SITE, anns[0])["w"][0] == 1.0  # same bytes, served through the new sidecar
        server.result_received(SITE, "t1")
        server.publish_task(SITE, {"w": np.full(1000, 5, np.float32)}, task_id="t2", round=2)
        ann = server.wait_message("result", lambda r: r.task_id == "t2", timeout=30)
        assert server.pull(SITE, ann)["w"][0] == 6.0
        server.result_received(SITE, "t2")
        server.send(SITE, control_pb2.ServerMessage(stop=control_pb2.Stop(success=True, reason="Done")))
        assert trainer.wait(30) == 0, trainer.communicate()[0]
    finally:
        for p in (trainer, first, second):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(10)
        server.stop()


def test_a_task_whose_model_is_gone_at_the_source_is_dropped_not_a_script_failure(tmp_path: Path) -> None:
    # What a trainer sees when the server restarted after sending a task: the transaction is unknown.
    server = FakeServer(JOB, {SITE: TOKEN}).start()
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    port = free_port()
    sidecar = _sidecar(server, token, port)
    trainer = None
    try:
        server.wait_registered(SITE, timeout=20)
        trainer = _trainer(
            tmp_path,
            """
fk.init()
while fk.is_running():
    model = fk.receive()
    fk.send(fk.FLModel(params={"w": model.params["w"] + 1}, num_examples=1))
""",
            port,
        )
        gone = server.downloads.publish({"w": np.zeros(10, np.float32)}, receivers=[SITE], ttl_s=120,
                                        transaction_id="g-gone")
        refs = [r.to_proto() for r in gone.refs]
        server.downloads.release("g-gone")
        server.send(SITE, control_pb2.ServerMessage(task=control_pb2.Task(task_id="t-gone", round=1, refs=refs)))
        server.publish_task(SITE, {"w": np.full(10, 5, np.float32)}, task_id="t2", round=2)
        ann = server.wait_message("result", lambda r: r.task_id == "t2", timeout=30)
        assert server.pull(SITE, ann)["w"][0] == 6.0
        server.result_received(SITE, "t2")
        assert not [a for a in server.of_kind("result", SITE) if a.task_id == "t-gone"]
        assert not server.of_kind("trainer_state", SITE) or all(
            s.phase != control_pb2.TRAINER_PHASE_FAILED for s in server.of_kind("trainer_state", SITE)
        )
        server.send(SITE, control_pb2.ServerMessage(stop=control_pb2.Stop(success=True, reason="Done")))
        out = trainer.communicate(timeout=30)[0]
        assert trainer.returncode == 0, out
        assert "dropping task t-gone" in out
    finally:
        for p in (trainer, sidecar):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(10)
        server.stop()
