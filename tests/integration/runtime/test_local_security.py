"""`fedkube run` keeps to this machine and leaves no credential behind (issue 12, item 4).

Real runs (server, sidecars, trainers as processes), in-process so that the test
knows the tokens the run was given: every listener of the run is on 127.0.0.1
unless ``--bind`` says otherwise, and once the run is over, whatever its outcome,
no file under the run dir holds a token or a private key, while the logs and
the server's summary stay.
"""

from __future__ import annotations

import ipaddress
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from fedkube.runtime.cli import BIND_CHOICES, bind_address, build_parser, execute
from fedkube.runtime.local import LocalJobRun, RunOptions, new_tokens, render_job
from fedkube.spec import load_job
from tests.integration.runtime.test_run_cli import ADD_ONE, HANG, write_job

pytestmark = pytest.mark.timeout(120)

CRASH = textwrap.dedent("""
    import fedkube.trainer_sdk as fk

    fk.init()
    fk.receive()
    raise SystemExit(3)  # the only client fails in round 0: the job fails
""")


class Lines:
    """A sink that keeps every process's output and tells when a line with ``mark`` came ``count`` times."""

    def __init__(self, mark: str = "", count: int = 0) -> None:
        self.lines: list[str] = []
        self.mark, self.count = mark, count
        self.seen = threading.Event()
        self._lock = threading.Lock()

    def emit(self, prefix: str, line: str) -> None:
        with self._lock:
            self.lines.append(f"[{prefix}] {line}")
            if self.mark and sum(self.mark in x for x in self.lines) >= self.count:
                self.seen.set()


def _run(
    tmp_path: Path, script: str, sink: Lines, *, sites: tuple[str, ...] = ("site-a",), bind: str | None = None
) -> tuple[LocalJobRun, dict[str, str]]:
    job_file = write_job(tmp_path, script, sites=sites, rounds=1)
    job = load_job(job_file)
    tokens = new_tokens(list(sites))
    options = RunOptions(run_dir=tmp_path / "run", base_dir=job_file.parent, sink=sink, client_grace_s=10.0)
    if bind is not None:
        options.bind = bind
    return LocalJobRun(render_job(job, tokens), options, job_name=str(job.metadata.name)), tokens


def _files_holding(run_dir: Path, secrets: list[bytes]) -> list[str]:
    found = []
    for path in run_dir.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            found += [f"{path.relative_to(run_dir)} holds {s[:12]!r}" for s in secrets if s in data]
    return found


def _secrets(tokens: dict[str, str]) -> list[bytes]:
    # Tokens, and any private key the run writes (the TLS Secrets of fedkube run are files like the tokens).
    return [t.encode() for t in tokens.values()] + [b"PRIVATE KEY"]


def _scope(addr: str) -> str:
    """"loopback", "any" (every interface) or "other"; gRPC binds an IPv4 address as ``::ffff:<v4>``."""
    ip = ipaddress.ip_address(addr)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        return "loopback"
    return "any" if ip.is_unspecified else "other"


def _listeners(run: LocalJobRun) -> list[tuple[str, str, int]]:
    """(process, scope of its address, port) of every listening TCP socket of the run's processes."""
    out = []
    for pid in run.pids():
        try:
            leader = psutil.Process(pid)
            procs = [leader, *leader.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for proc in procs:
            try:
                conns = proc.net_connections(kind="inet")
                name = " ".join(proc.cmdline()[:3])
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            out += [(name, _scope(c.laddr.ip), c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN]
    return out


@pytest.fixture
def hanging(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[LocalJobRun, dict[str, str], Lines]]:
    """A run whose two trainers connected and then wait forever (until the test interrupts it)."""
    sink = Lines("connected to the sidecar", 2)
    run, tokens = _run(tmp_path, HANG, sink, sites=("site-a", "site-b"), bind=getattr(request, "param", None))
    outcome: list[int] = []
    thread = threading.Thread(target=lambda: outcome.append(execute(run).exit_code), daemon=True)
    thread.start()
    try:
        assert sink.seen.wait(60), "\n".join(sink.lines[-40:])
        yield run, tokens, sink
    finally:
        run.interrupt()
        thread.join(60)
    assert outcome == [130]


def test_every_listener_of_a_run_is_on_loopback(hanging: tuple[LocalJobRun, dict[str, str], Lines]) -> None:
    run, _, _ = hanging
    listeners = _listeners(run)
    # server (gRPC, bulk, status, metrics), each sidecar (trainer port, metrics; with TLS its bulk relay is an
    # abstract Unix socket, docs/networking.md), each trainer's two
    assert len(listeners) >= 4 + 2 * 2 + 2 * 2, listeners
    assert {scope for _, scope, _ in listeners} == {"loopback"}, listeners


@pytest.mark.parametrize("hanging", ["0.0.0.0"], indirect=True)
def test_bind_opens_the_servers_ports_and_only_those(hanging: tuple[LocalJobRun, dict[str, str], Lines]) -> None:
    run, _, _ = hanging
    listeners = _listeners(run)
    wide = [(name, port) for name, scope, port in listeners if scope == "any"]
    server = [port for name, port in wide if "server" in name]
    sidecars = [port for name, port in wide if "sidecar" in name]
    assert len(server) == 4 and len(sidecars) == 2, listeners  # gRPC, bulk, status, metrics; each sidecar's metrics
    local = [(name, scope) for name, scope, _ in listeners if scope != "any"]
    assert local and {scope for _, scope in local} == {"loopback"}, listeners  # pod-local endpoints stay local


def test_ctrl_c_leaves_no_token_behind(tmp_path: Path) -> None:
    sink = Lines("connected to the sidecar", 1)
    run, tokens = _run(tmp_path, HANG, sink)
    outcome: list[int] = []
    thread = threading.Thread(target=lambda: outcome.append(execute(run).exit_code), daemon=True)
    thread.start()
    try:
        assert sink.seen.wait(60), "\n".join(sink.lines[-40:])
        assert _files_holding(run.options.run_dir, _secrets(tokens))  # the tokens are files while the run runs
    finally:
        run.interrupt()
        thread.join(60)
    assert outcome == [130]
    assert _files_holding(run.options.run_dir, _secrets(tokens)) == []
    assert list((run.options.run_dir / "logs").glob("*.log"))


@pytest.mark.parametrize(("script", "exit_code"), [(ADD_ONE, 0), (CRASH, 1)], ids=["succeeded", "failed"])
def test_a_finished_run_leaves_no_token_behind_but_keeps_logs_and_summary(
    tmp_path: Path, script: str, exit_code: int
) -> None:
    sink = Lines()
    run, tokens = _run(tmp_path, script, sink)
    outcome = execute(run)
    assert outcome.exit_code == exit_code, "\n".join(sink.lines[-40:])
    assert _files_holding(run.options.run_dir, _secrets(tokens)) == []
    assert outcome.summary is not None  # read from the server's termination log, which stays
    assert list((run.options.run_dir / "pods").glob("*/*.termination-log"))
    assert len(list((run.options.run_dir / "logs").glob("*.log"))) == 3  # server, sidecar, trainer


@pytest.mark.parametrize("text", ["127.0.0.1", "localhost", "0.0.0.0", "::", "[::]"])
def test_bind_takes_loopback_and_the_wildcards(text: str) -> None:
    assert bind_address(text) == BIND_CHOICES[text]
    assert build_parser().parse_args(["job.yaml", "--bind", text]).bind == BIND_CHOICES[text]


def test_bind_refuses_an_address_the_clients_could_not_reach(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["job.yaml", "--bind", "10.1.2.3"])
    assert "fix: 0.0.0.0" in capsys.readouterr().err
    assert build_parser().parse_args(["job.yaml"]).bind == "127.0.0.1"
