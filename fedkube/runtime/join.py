"""``fedkube join BUNDLE -- COMMAND...``: one remote site on one machine, without Kubernetes.

Enrolls with the job's join bundle (:mod:`fedkube.security.enroll_wire`): the site's key is made here and never
leaves the state directory (0700; key and token files 0600). A restart reuses the certificate, renews it over
mutual TLS when a third of its lifetime is left, and enrolls again only when it has none for the bundle's CA; while
the site runs, :class:`~fedkube.runtime.renewal.RenewalLoop` renews it the same way and the sidecar picks the new
files up for its next connection.
Then it runs what a client pod runs: the job-cell sidecar (``fedkube sidecar``) and the trainer, the trainer with
the same environment the SDK reads in a pod (FEDKUBE_JOB, _NAMESPACE, _SITE, _SIDECAR_ADDRESS, _WORKDIR) and no
access to the key (it talks to the sidecar on 127.0.0.1 only). The exit code is the trainer's.

The site's policy over the job's terms (``--max-rounds``, ``--allow-strategy``) goes to the sidecar, which refuses a
job outside it when it registers, before the trainer gets any task (exit code 3). Interrupted (SIGINT, SIGTERM),
``fedkube join`` stops the sidecar first: a site-controlled sidecar tells the server the site leaves (Withdrawn),
then the trainer is stopped.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from fedkube import envvars, portfile
from fedkube.errors import FedkubeError
from fedkube.logs import configure_logging
from fedkube.runtime.mapping import fedkube_command
from fedkube.runtime.process import ManagedProcess, ProcessSpec, StreamSink
from fedkube.runtime.renewal import RenewalLoop
from fedkube.security import enroll, pki
from fedkube.security.enroll_wire import EnrollmentError, enroll_site, renew_site
from fedkube.security.material import files_in
from fedkube.terms import TermsPolicy

log = logging.getLogger(__name__)

EXIT_CONFIG = 2
EXIT_REFUSED = 3  # the sidecar's: the site's policy refused the job's terms
EXIT_INTERRUPTED = 130
TOKEN_FILE = "token"
PORTS_FILE = "ports.json"
SIDECAR_READY_S = 30.0
SIDECAR_LINGER_S = 30.0  # after the trainer: the sidecar forwards its final state and exits on the job's Stop


@dataclass(frozen=True)
class Endpoints:
    host: str
    grpc_port: int
    bulk_port: int
    enroll_port: int


def default_state_dir(bundle: enroll.JoinBundle) -> Path:
    base = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    return base / "fedkube" / f"{bundle.namespace}.{bundle.job}.{bundle.site}"


def _current(state: Path, bundle: enroll.JoinBundle, now: dt.datetime) -> x509.Certificate | None:
    """The stored certificate when it belongs to the bundle's CA and is valid now, else None."""
    files = files_in(state)
    try:
        ca = x509.load_pem_x509_certificate(files.ca.read_bytes())
        cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
        pki.load_issued(files.cert.read_bytes(), files.key.read_bytes())  # the key matches the certificate
        (state / TOKEN_FILE).read_bytes()
    except (OSError, ValueError, FedkubeError):
        return None
    if enroll.fingerprint(ca) != bundle.ca_sha256 or not cert.not_valid_before_utc <= now < cert.not_valid_after_utc:
        return None
    return cert


def ensure_identity(bundle: enroll.JoinBundle, state: Path, ends: Endpoints, *, timeout_s: float = 10.0,
                    now: dt.datetime | None = None) -> str:  # fmt: skip
    """Enroll, renew or reuse; returns what was done ("enrolled", "renewed", "reused")."""
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(state, 0o700)
    moment = now or dt.datetime.now(dt.timezone.utc)
    cert = _current(state, bundle, moment)
    if cert is not None and not enroll.needs_renewal(cert, moment):
        return "reused"
    return refresh_identity(bundle, state, ends, renew=cert is not None, timeout_s=timeout_s)


def refresh_identity(bundle: enroll.JoinBundle, state: Path, ends: Endpoints, *, renew: bool,
                     timeout_s: float = 10.0) -> str:  # fmt: skip
    """Renew over the stored certificate (``renew``) or enroll with the bundle's token, with a new key; writes the
    state atomically, file by file (a running sidecar skips a certificate whose key is not there yet)."""
    files = files_in(state)
    address = (ends.host, ends.enroll_port)
    key = enroll.new_site_key()
    if renew:
        issued = renew_site(bundle, key, files.cert, files.key, address, timeout_s=timeout_s)
        done = "renewed"
    else:
        issued = enroll_site(bundle, key, address, timeout_s=timeout_s)
        done = "enrolled"
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    # Key first: a crash in between leaves a key without its certificate (the next start enrolls or renews).
    pki.write_file(files.key, key_pem, 0o600)
    pki.write_file(files.cert, issued.certificate, 0o644)
    pki.write_file(files.ca, issued.ca, 0o644)
    pki.write_file(state / TOKEN_FILE, issued.site_token.encode(), 0o600)
    return done


def site_env(bundle: enroll.JoinBundle, state: Path, ends: Endpoints, base: Mapping[str, str],
             policy: TermsPolicy | None = None) -> dict[str, str]:  # fmt: skip
    """The sidecar's environment: what the operator's builders give a client pod's sidecar, for this machine."""
    env = dict(base)
    if policy is not None and not policy.empty:
        env[envvars.SITE_POLICY] = policy.to_json()
    env.update({
        envvars.JOB: bundle.job, envvars.NAMESPACE: bundle.namespace, envvars.SITE: bundle.site,
        envvars.SERVER_ADDRESS: f"{ends.host}:{ends.grpc_port}",
        envvars.SERVER_BULK_ADDRESS: f"{ends.host}:{ends.bulk_port}" if ends.bulk_port else "",
        envvars.TOKEN_FILE: str(state / TOKEN_FILE), envvars.TRAINER_PORT: "0", envvars.METRICS_PORT: "0",
        envvars.PORTS_FILE: str(state / PORTS_FILE), envvars.SIDECAR_EXIT_ON_STOP: "1",
        envvars.BIND_ADDRESS: "127.0.0.1", envvars.TLS: "enabled", envvars.TLS_DIR: str(state),
        envvars.TLS_SERVER_NAME: bundle.server_name, envvars.SITE_CONTROLLED: "1",
    })  # fmt: skip
    return env


def trainer_env(bundle: enroll.JoinBundle, sidecar_port: int, workdir: Path, base: Mapping[str, str]) -> dict[str, str]:
    """The trainer's environment: the same variables the SDK reads in a pod, and none of the site's secrets."""
    env = {k: v for k, v in base.items() if not k.startswith("FEDKUBE_")}
    env.update({
        envvars.JOB: bundle.job, envvars.NAMESPACE: bundle.namespace, envvars.SITE: bundle.site,
        envvars.SIDECAR_ADDRESS: f"127.0.0.1:{sidecar_port}", envvars.WORKDIR: str(workdir),
    })  # fmt: skip
    return env


def _wait_port(sidecar: ManagedProcess, ports: Path, deadline: float) -> int | None:
    while time.monotonic() < deadline:
        got = portfile.read(ports) or {}
        if envvars.TRAINER_PORT in got:
            return got[envvars.TRAINER_PORT]
        if sidecar.returncode is not None:
            return None
        time.sleep(0.05)
    return None


class _Interrupted(Exception):
    """SIGTERM to ``fedkube join``: handled like Ctrl-C."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise _Interrupted()


def run_site(bundle: enroll.JoinBundle, state: Path, ends: Endpoints, command: Sequence[str], *,
             workdir: Path | None = None, policy: TermsPolicy | None = None) -> int:  # fmt: skip
    """Run the sidecar and the trainer until the trainer ends; the trainer's exit code (3: the site's policy refused
    the job; 130: interrupted, the site left the job)."""
    sink = StreamSink()
    work = workdir or state / "work"
    work.mkdir(parents=True, exist_ok=True)
    ports = state / PORTS_FILE
    ports.unlink(missing_ok=True)
    logs = state / "logs"
    sidecar = ManagedProcess(ProcessSpec(f"{bundle.site} sidecar", [*fedkube_command(), "sidecar"],
                                         site_env(bundle, state, ends, os.environ, policy), state,
                                         logs / "sidecar.log"), sink)  # fmt: skip
    # Only the main thread may set a handler (run_site called from a test's thread keeps the default).
    previous = (signal.signal(signal.SIGTERM, _on_sigterm) if threading.current_thread() is threading.main_thread()
                else None)
    sidecar.start()
    # The sidecar reads the state directory again for each new connection: a renewal needs no restart.
    renewal = RenewalLoop(bundle.site, state, lambda: refresh_identity(bundle, state, ends, renew=True)).start()
    trainer: ManagedProcess | None = None
    try:
        port = _wait_port(sidecar, ports, time.monotonic() + SIDECAR_READY_S)
        if port is None:
            log.error("site %s: the sidecar did not start (exit %s); see %s", bundle.site, sidecar.returncode,
                      logs / "sidecar.log")
            return 1
        trainer = ManagedProcess(ProcessSpec(f"{bundle.site} trainer", list(command),
                                             trainer_env(bundle, port, work, os.environ), Path.cwd(),
                                             logs / "trainer.log"), sink)
        trainer.start()
        code = trainer.wait()
        if sidecar.wait(SIDECAR_LINGER_S) is None:
            log.warning("site %s: the sidecar did not exit %.0f s after the trainer; stopping it", bundle.site,
                        SIDECAR_LINGER_S)
        if sidecar.returncode == EXIT_REFUSED:
            log.error("site %s: the site's policy refuses job %s/%s; see %s", bundle.site, bundle.namespace,
                      bundle.job, logs / "sidecar.log")
            return EXIT_REFUSED
        return int(code if code is not None else 1)
    except (KeyboardInterrupt, _Interrupted):
        # The sidecar first: it tells the server the site leaves while the job still runs for it (Withdrawn);
        # stopping the trainer first would read as a trainer that ended early.
        log.warning("site %s: interrupted; leaving job %s/%s", bundle.site, bundle.namespace, bundle.job)
        sidecar.stop(5.0)
        return EXIT_INTERRUPTED
    finally:
        renewal.stop()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        sidecar.stop(5.0)
        if trainer is not None and trainer.returncode is None:
            trainer.stop(5.0)


def join_main(argv: list[str]) -> int:
    """Entry point of ``fedkube join``."""
    parser = argparse.ArgumentParser(
        prog="fedkube join", description="Join an FLJob as a remote site: enroll with the join bundle, then run the "
        "sidecar and the trainer command on this machine.",
        usage="fedkube join BUNDLE [options] -- COMMAND [ARGS...]",
    )  # fmt: skip
    parser.add_argument("bundle", type=Path, help="the join bundle (bundle.json of the job's <job>-join-<site> Secret)")
    parser.add_argument("--state-dir", type=Path, help="where the site's key and certificate live (default: "
                        "$XDG_STATE_HOME/fedkube/<namespace>.<job>.<site>)")
    parser.add_argument("--server", help="host to dial instead of the bundle's first address (the certificate is "
                        "still checked for the bundle's server name)")
    parser.add_argument("--grpc-port", type=int, help="the server's gRPC port, when a NodePort or proxy moved it")
    parser.add_argument("--bulk-port", type=int, help="the server's bulk port (0: tensors over gRPC only)")
    parser.add_argument("--enroll-port", type=int, help="the server's enrollment port")
    parser.add_argument("--workdir", type=Path, help="the trainer's FEDKUBE_WORKDIR (default: <state>/work)")
    parser.add_argument("--enroll-only", action="store_true", help="enroll or renew, then exit")
    parser.add_argument("--max-rounds", type=int, help="the site's policy: refuse a job asking more rounds (checked "
                        "when the sidecar registers, before the trainer gets any task)")
    parser.add_argument("--allow-strategy", action="append", metavar="NAME", help="the site's policy: the strategies "
                        "it accepts (repeat for several; all when absent)")
    if "--" in argv:
        split = argv.index("--")
        args, command = parser.parse_args(argv[:split]), argv[split + 1:]
    else:
        args, command = parser.parse_args(argv), []
    configure_logging("join", job="")
    if not command and not args.enroll_only:
        parser.error("no trainer command; fix: fedkube join bundle.json -- python train.py")
    try:
        bundle = enroll.JoinBundle.from_text(args.bundle.read_text())
    except (OSError, FedkubeError) as exc:
        print(f"fedkube join: cannot read the join bundle {args.bundle}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    ends = Endpoints(args.server or bundle.host, args.grpc_port or bundle.grpc_port,
                     bundle.bulk_port if args.bulk_port is None else args.bulk_port,
                     args.enroll_port or bundle.enroll_port)
    state = args.state_dir or default_state_dir(bundle)
    try:
        done = ensure_identity(bundle, state, ends)
    except EnrollmentError as exc:
        print(f"fedkube join: site {bundle.site} of job {bundle.namespace}/{bundle.job}: {exc}", file=sys.stderr)
        return EXIT_CONFIG if exc.reason != "unreachable" else 1
    log.info("site %s of job %s/%s: certificate %s (state in %s)", bundle.site, bundle.namespace, bundle.job, done,
             state)
    if args.enroll_only:
        return 0
    if args.max_rounds is not None and args.max_rounds < 1:
        parser.error(f"--max-rounds must be at least 1, got {args.max_rounds}")
    policy = TermsPolicy.of(args.allow_strategy, args.max_rounds, "fedkube join --max-rounds/--allow-strategy")
    return run_site(bundle, state, ends, command, workdir=args.workdir, policy=policy)
