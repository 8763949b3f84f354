"""`fedkube run` end to end: the real server, sidecars and trainer SDK as local processes."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import textwrap
import time
import uuid
from pathlib import Path

import psutil
import pytest

from fedkube import formats
from fedkube.runtime import resolver
from fedkube.runtime.cli import run_main
from fedkube.runtime.pod import fedkube_command

pytestmark = pytest.mark.timeout(120)

JOB = """
apiVersion: fedkube.dev/v1alpha1
kind: FLJob
metadata:
  name: {name}
spec:
  rounds: {rounds}
  minClients: {min_clients}
  clients:
{clients}
  trainer:
    image: example/trainer:1
    command: ["python", "train.py"]
  timeouts:
    roundSeconds: 300
"""


def write_job(
    tmp_path: Path, script: str, *, name: str = "cli", sites: tuple[str, ...] = ("site-a", "site-b"), rounds: int = 2
) -> Path:
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    clients = "\n".join(f"    - name: {s}" for s in sites)
    (job_dir / "fljob.yaml").write_text(JOB.format(name=name, rounds=rounds, min_clients=len(sites), clients=clients))
    (job_dir / "train.py").write_text(script)
    return job_dir / "fljob.yaml"


def fedkube_run(*args: str, env: dict[str, str] | None = None, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*fedkube_command(), "run", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


ADD_ONE = textwrap.dedent("""
    import numpy as np
    import fedkube.trainer_sdk as fk

    fk.init()
    while fk.is_running():
        model = fk.receive()
        params = {"w": np.zeros(4, dtype=np.float32)} if model.params is None else {"w": model.params["w"] + 1}
        print("round", model.round, "w0", float(params["w"][0]))
        fk.send(fk.FLModel(params=params, num_examples=10, metrics={"w0": float(params["w"][0])}))
""")


def test_run_json_reports_success_and_each_client_has_its_own_workdir(tmp_path: Path) -> None:
    job = write_job(tmp_path, ADD_ONE + "\nopen('mine.txt', 'w').write('x')\n")
    proc = fedkube_run(str(job), "--json", "--no-progress", "--run-dir", str(tmp_path / "run"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout)  # stdout holds only the JSON; process output went to stderr
    assert result["outcome"] == "Succeeded" and result["exitCode"] == 0
    assert result["summary"]["phase"] == "Succeeded"
    assert result["summary"]["completedRounds"] == 2
    # Output captured once, with the client named in front.
    assert proc.stderr.count("[site-a trainer] round 2 w0 2.0") == 1
    assert proc.stderr.count("[site-b trainer] round 2 w0 2.0") == 1
    logs = tmp_path / "run" / "logs"
    # Routine INFO lines stay out of the console (--verbose shows them) but are all in the log files.
    assert "INFO fedkube." not in proc.stderr
    assert "INFO fedkube.server.workflow" in (logs / "cli-server.server.log").read_text()
    assert (logs / "cli-client-site-a.trainer.log").read_text().count("round 2 w0 2.0") == 1
    written = sorted(tmp_path.glob("run/pods/*/volumes/*/mine.txt"))
    assert len(written) == 2 and written[0].parent != written[1].parent  # LESSONS.md 24
    assert not (job.parent / "mine.txt").exists()
    # The trained model is delivered to runs/<job>/model/ by default, named in the summary with its sha256.
    delivered = tmp_path / "run" / "model" / "cli.safetensors"
    model, meta = formats.safetensors.load_file(delivered)
    assert model["w"].tolist() == [2.0] * 4 and (meta["job"], meta["round"], meta["metric.w0"]) == ("cli", "2", "2.0")
    assert result["summary"]["modelSha256"] == hashlib.sha256(delivered.read_bytes()).hexdigest()


def test_invalid_spec_exits_2_naming_the_field_and_starts_nothing(tmp_path: Path) -> None:
    job = write_job(tmp_path, ADD_ONE)
    job.write_text(job.read_text().replace("minClients: 2", "minClients: 5"))
    proc = fedkube_run(str(job), "--no-progress", "--run-dir", str(tmp_path / "run"))
    assert proc.returncode == 2
    assert "minClients" in proc.stderr
    assert not (tmp_path / "run").exists()
    missing = fedkube_run(str(tmp_path / "nope.yaml"), "--no-progress")
    assert missing.returncode == 2 and "nope.yaml" in missing.stderr


def test_trainer_exiting_nonzero_after_success_is_reported_not_failed(tmp_path: Path) -> None:
    job = write_job(tmp_path, ADD_ONE + "\nimport os\nos._exit(3)\n")
    proc = fedkube_run(str(job), "--json", "--no-progress", "--run-dir", str(tmp_path / "run"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    notes = json.loads(proc.stdout)["notes"]
    assert any("trainer: exited with code 3" in n and "not a job failure" in n for n in notes), notes


HANG = textwrap.dedent("""
    import time
    import fedkube.trainer_sdk as fk

    fk.init()
    print("connected to the sidecar", flush=True)
    time.sleep(300)  # never sends: the job cannot finish without the Ctrl-C
""")


def _marked(mark: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("RUNTIME_TEST_MARK") == mark and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def test_ctrl_c_stops_server_sidecars_and_trainers(tmp_path: Path) -> None:
    job = write_job(tmp_path, HANG, sites=("site-a", "site-b"))
    mark = uuid.uuid4().hex
    proc = subprocess.Popen(
        [*fedkube_command(), "run", str(job), "--no-progress", "--run-dir", str(tmp_path / "run")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "RUNTIME_TEST_MARK": mark},
    )
    try:
        assert proc.stdout is not None
        holding = 0
        seen: list[str] = []
        deadline = time.monotonic() + 60
        while holding < 2 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            seen.append(line)
            holding += "connected to the sidecar" in line
        assert holding == 2, "".join(seen[-40:])
        # runtime + server + 2 sidecars + 2 trainers; look again for a bounded while (a process
        # that has just started may not show its environment yet)
        deadline = time.monotonic() + 10
        while len(_marked(mark)) < 6 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(_marked(mark)) >= 6
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 130, out[-3000:]
        assert "Interrupted" in out
        leftovers = _marked(mark)
        assert not leftovers, [p.cmdline() for p in leftovers]
    finally:
        if proc.poll() is None:
            proc.kill()
        for p in _marked(mark):
            p.kill()


def test_suspended_job_is_not_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    job = write_job(tmp_path, ADD_ONE)
    job.write_text(job.read_text().replace("  rounds: 2", "  suspend: true\n  rounds: 2"))
    assert run_main([str(job), "--no-progress", "--run-dir", str(tmp_path / "run")]) == 2
    assert "spec.suspend" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_reusing_the_run_dir_resumes_from_the_checkpoint_claim(tmp_path: Path) -> None:
    job = write_job(tmp_path, ADD_ONE, rounds=1)
    text = job.read_text().replace("  timeouts:", "  server:\n    checkpoint:\n      enabled: true\n  timeouts:")
    job.write_text(text)
    run_dir = str(tmp_path / "run")
    first = fedkube_run(str(job), "--json", "--no-progress", "--run-dir", run_dir)
    assert first.returncode == 0, first.stderr[-4000:]
    job.write_text(text.replace("rounds: 1", "rounds: 3"))
    second = fedkube_run(str(job), "--json", "--no-progress", "--run-dir", run_dir)
    assert second.returncode == 0, second.stderr[-4000:]
    assert json.loads(second.stdout)["summary"]["completedRounds"] == 3
    # The claim (a directory under the run dir) outlived the first server: rounds 0 and 1 are not run again.
    assert "[site-a trainer] round 2 w0 2.0" in second.stderr
    assert "[site-a trainer] round 0 " not in second.stderr and "round 1 w0" not in second.stderr


def test_a_second_run_on_a_run_dir_in_use_is_refused_and_leaves_the_first_alone(tmp_path: Path) -> None:
    job = write_job(tmp_path, HANG, sites=("site-a",))
    run_dir = tmp_path / "run"
    first = subprocess.Popen(
        [*fedkube_command(), "run", str(job), "--no-progress", "--run-dir", str(run_dir)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        assert first.stdout is not None
        seen: list[str] = []
        while not any("connected to the sidecar" in line for line in seen[-1:]):
            line = first.stdout.readline()
            assert line, "".join(seen[-40:])
            seen.append(line)
        before = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
        second = fedkube_run(str(job), "--no-progress", "--run-dir", str(run_dir), timeout=40)
        assert second.returncode == 2, second.stderr[-3000:]
        assert f"pid {first.pid}" in second.stderr and "--run-dir" in second.stderr, second.stderr[-3000:]
        assert first.poll() is None  # the first run goes on, its files untouched
        assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*")) == before
    finally:
        first.send_signal(signal.SIGINT)
        try:
            first.communicate(timeout=60)
        finally:
            if first.poll() is None:
                first.kill()


CRASH_ON_C = textwrap.dedent("""
    import os
    import numpy as np
    import fedkube.trainer_sdk as fk

    fk.init()
    while fk.is_running():
        model = fk.receive()
        if os.environ["FEDKUBE_SITE"] == "site-c":
            raise SystemExit("site-c crashes mid-job")
        params = {"w": np.zeros(4, dtype=np.float32)} if model.params is None else {"w": model.params["w"] + 1}
        fk.send(fk.FLModel(params=params, num_examples=10))
""")


def test_a_trainer_that_crashed_mid_job_is_not_called_teardown_noise(tmp_path: Path) -> None:
    job = write_job(tmp_path, CRASH_ON_C, sites=("site-a", "site-b", "site-c"))
    job.write_text(job.read_text().replace("minClients: 3", "minClients: 2"))
    proc = fedkube_run(str(job), "--json", "--no-progress", "--run-dir", str(tmp_path / "run"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout)
    notes = [n for n in result["notes"] if n.startswith("site-c trainer")]
    assert notes and all("teardown noise" not in n and "after the job succeeded" not in n for n in notes), notes
    assert any("exited with code 1 during the job" in n for n in notes), notes


def test_a_trainer_command_that_does_not_exist_is_one_clear_error_without_tracebacks(tmp_path: Path) -> None:
    job = write_job(tmp_path, ADD_ONE, sites=("site-a",), rounds=1)
    job.write_text(job.read_text().replace('command: ["python", "train.py"]', 'command: ["no-such-trainer-7", "x"]'))
    proc = fedkube_run(str(job), "--no-progress", "--grace", "3", "--run-dir", str(tmp_path / "run"))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-4000:]
    assert "Traceback" not in out, out[-4000:]
    errors = [line for line in out.splitlines() if "could not start" in line and "ERROR" in line]
    assert len(errors) == 1, out[-4000:]
    assert "site-a trainer" in errors[0] and "program 'no-such-trainer-7' not found" in errors[0]
    assert "fix:" in errors[0] and "command" in errors[0]


def test_a_port_taken_between_reservation_and_bind_cannot_stop_the_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The race of a busy machine made certain: the first port the runtime would reserve in advance is
    # already taken by another socket when the process gets to bind it (issue 11 §2.4).
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    real_free_port = resolver.free_port
    handed_out: list[int] = []

    def reserve() -> int:
        handed_out.append(taken.getsockname()[1] if not handed_out else real_free_port())
        return handed_out[-1]

    monkeypatch.setattr(resolver, "free_port", reserve)
    job = write_job(tmp_path, ADD_ONE, rounds=1)
    try:
        code = run_main([str(job), "--json", "--no-progress", "--grace", "5", "--run-dir", str(tmp_path / "run")])
    finally:
        taken.close()
    out = capsys.readouterr()
    assert code == 0, out.err[-4000:]
    assert json.loads(out.out)["summary"]["completedRounds"] == 1
    assert handed_out == []  # no listener of the job was given a port reserved in advance


def _modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mode & 0o777 for p in root.rglob("*") if not p.is_symlink()}


@pytest.mark.parametrize("tls", ["enabled", "disabled"])
def test_run_writes_each_partys_tls_bundle_into_the_private_run_dir(tmp_path: Path, tls: str) -> None:
    """A real run succeeds over TLS (or without it) and leaves no key behind; the bundles it wrote while it ran
    are the pods' own Secret volumes, made by the same mapping, checked here file by file."""
    from cryptography import x509

    from fedkube.runtime.local import new_tls, render_job
    from fedkube.runtime.mapping import PodMapping
    from fedkube.runtime.pod import ManifestObjects, PodOptions
    from fedkube.runtime.resolver import LocalResolver
    from fedkube.security import pki
    from fedkube.security.material import files_in
    from fedkube.spec import load_job

    job = write_job(tmp_path, ADD_ONE, name="tlsrun")
    if tls == "disabled":
        job.write_text(job.read_text() + "  security:\n    tls: disabled\n")
    run = tmp_path / "run"
    proc = fedkube_run(str(job), "--json", "--no-progress", "--run-dir", str(run))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert run.stat().st_mode & 0o777 == 0o700  # nobody else may look inside: tokens and keys lay below
    assert [p for p in run.rglob("*") if p.is_file() and b"PRIVATE KEY" in p.read_bytes()] == []  # removed at the end

    parsed = load_job(job)
    manifests = render_job(parsed, {c.name: "t" for c in parsed.spec.clients}, new_tls(parsed))
    options = PodOptions(run_dir=tmp_path / "mapped", resolver=LocalResolver(), objects=ManifestObjects(manifests))
    for pod in (m for m in manifests if m["kind"] == "Pod"):
        PodMapping(pod, options, tmp_path / "mapped" / "pods" / pod["metadata"]["name"]).materialize_volumes()
    mapped = tmp_path / "mapped"
    bundles = sorted(p.parent.relative_to(mapped) for p in mapped.rglob("tls.key"))
    if tls == "disabled":
        assert bundles == []
        return
    # The server and each sidecar get theirs; the trainer nothing; the CA key is written nowhere.
    assert [str(b) for b in bundles] == [
        "pods/tlsrun-client-site-a/volumes/fedkube-tls", "pods/tlsrun-client-site-b/volumes/fedkube-tls",
        "pods/tlsrun-server/volumes/fedkube-tls"]
    for bundle in bundles:
        modes = _modes(mapped / bundle)
        assert modes == {"ca.crt": 0o400, "tls.crt": 0o400, "tls.key": 0o400}, modes
        files = files_in(mapped / bundle)
        issued = pki.load_issued(files.cert.read_bytes(), files.key.read_bytes())  # the key is the cert's
        ca = x509.load_pem_x509_certificate(files.ca.read_bytes())
        issued.cert.verify_directly_issued_by(ca)
        san = issued.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        site = str(bundle).split("/")[1].removeprefix("tlsrun-client-")
        if site == "tlsrun-server":
            assert "tlsrun-server.default.svc" in san.get_values_for_type(x509.DNSName)
        else:
            assert san.get_values_for_type(x509.UniformResourceIdentifier) == [pki.site_uri("default", "tlsrun", site)]
    keys = [p for p in mapped.rglob("*") if p.is_file() and b"PRIVATE KEY" in p.read_bytes()]
    assert sorted(p.parent.relative_to(mapped) for p in keys) == bundles
