"""``fedkube server``: the aggregator process.

Reads its configuration from the environment (``fedkube.server.config``),
serves the ``Control`` and ``Download`` gRPC services on one port, the same
global model and the answers to its upload requests over the bulk protocol on
another (when ``FEDKUBE_BULK_PORT`` is set), and the status endpoint over
HTTP, runs the job's rounds, writes the termination
summary and exits with 0 (succeeded), 1 (failed) or 2 (configuration error).
SIGTERM/SIGINT stop the job gracefully: clients are told ``Stop``, the summary
is written, the process exits.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent import futures
from pathlib import Path
from types import FrameType
from typing import Any

import grpc
import numpy as np

from fedkube import envvars, formats, portfile
from fedkube.errors import ConfigError
from fedkube.logs import configure_logging, log_format_from_env
from fedkube.metrics.core import new_registry, serve_metrics
from fedkube.metrics.server import ServerMetrics
from fedkube.protocol import DOWNLOAD_BUDGET, SERVER
from fedkube.server import checkpoint
from fedkube.server.admission import SiteAdmission, SiteCalls, server_workers
from fedkube.server.auth import Authenticator, AuthError, Identity, credentials_from_metadata
from fedkube.server.callgate import CallGate, gated
from fedkube.server.config import ServerConfig, load_config
from fedkube.server.control import ControlServicer, SessionTable
from fedkube.server.enrollment import EnrollmentServer, start_enrollment
from fedkube.server.http import StatusServer
from fedkube.server.jobs import Resumed
from fedkube.server.output import ModelOutput
from fedkube.server.reverse import ClaimRefused, UploadBroker
from fedkube.server.revocation import RevokedSites, SpecWatch
from fedkube.server.strategies import build_strategy
from fedkube.server.strategy_api import StrategyState
from fedkube.server.supersede import Supersession
from fedkube.server.workflow import CheckpointStore, Outcome, RoundWorkflow
from fedkube.status import EXIT_FAILED, EvaluationPoint, Phase, Reason
from fedkube.termination import TerminationSummary, write_termination_summary
from fedkube.terms import JobTerms
from fedkube.transfer import endpoints
from fedkube.transfer.bulk import BulkServer
from fedkube.transfer.endpoints import ServerTls
from fedkube.transfer.service import DownloadService
from fedkube.transfer.wire import MAX_CHUNK_BYTES, server_options
from fedkube.wire.v1 import control_pb2_grpc

log = logging.getLogger(__name__)

EXIT_CONFIG = 2
LINGER_S = 5.0  # how long a finished server waits for its clients to hang up
SERVER_SOURCE = SERVER  # the name clients see as the global model's source
_DOWNLOAD_PREFIX = "/fedkube.v1.Download/"


def check_model_file(path: str | Path) -> None:
    """The cheap checks of :func:`load_model_file` (exists, a known format by content), without reading weights.

    The server runs them before it listens: a job whose model cannot be read fails at once with
    exit 2, instead of after its clients were started and had to be waited for.
    """
    p = Path(path)
    if not p.exists():
        raise ConfigError(
            f"spec.model.path={str(p)!r} does not exist; fix: give the path of a safetensors, torch or .npz model file"
        )
    if p.is_dir() and checkpoint.is_checkpoint_dir(p):
        return
    try:
        formats.detect(p)
    except formats.FormatError as exc:
        raise ConfigError(f"spec.model.path: {exc}") from None


def load_model_file(path: str | Path) -> dict[str, np.ndarray]:
    """Initial weights from a model file (safetensors, torch state dict, npz; never unpickled) or a checkpoint."""
    p = Path(path)
    if p.is_dir() and checkpoint.is_checkpoint_dir(p):
        ck = checkpoint.load_latest(p, None)
        if ck is None:
            raise ConfigError(f"spec.model.path={str(p)!r} is a directory without a usable fedkube checkpoint")
        return dict(ck.model)
    check_model_file(p)
    try:
        return formats.load(p)
    except formats.FormatError as exc:
        raise ConfigError(f"spec.model.path: {exc}") from None


class _CheckpointAdapter:
    """The workflow's CheckpointStore over fedkube.server.checkpoint."""

    def __init__(self, directory: Path, job: str, *, start_fresh: bool = False) -> None:
        self._dir = directory
        self._job = job
        self._start_fresh = start_fresh

    def load(self) -> Resumed | None:
        ck = checkpoint.resume_point(self._dir, self._job, start_fresh=self._start_fresh)
        if ck is None:
            return None
        return Resumed(ck.round, dict(ck.model), ck.strategy_state, tuple(ck.evaluation), dict(ck.metrics))

    def save(
        self, round_: int, model: Mapping[str, np.ndarray], state: StrategyState, metrics: Mapping[str, float],
        checksums: Mapping[str, str] | None = None, evaluation: Sequence[EvaluationPoint] = (),
    ) -> None:
        checkpoint.save(self._dir, self._job, round_, model, state, metrics=metrics, checksums=checksums,
                        evaluation=evaluation)


class _DownloadAuth(grpc.ServerInterceptor):
    """Only the job's clients may fetch the global model (the same check as Control's), each only its own copy.

    A refusal is decided from the headers alone: the deny handler takes a request *stream*, so gRPC
    runs it at once instead of waiting for a request message that an unauthenticated caller may
    never send (with a unary deny handler, 16 such half-open calls held every worker and every
    ``maximum_concurrent_rpcs`` slot, and real sidecars got RESOURCE_EXHAUSTED). An admitted call's
    ``receiver`` must be the authenticated site (:meth:`Authenticator.check_receiver`).
    """

    def __init__(self, auth: Authenticator, budget: int) -> None:
        self._auth = auth
        self._budget = _Budget(budget)

    def intercept_service(self, continuation: Callable[[Any], Any], details: Any) -> Any:
        if not details.method.startswith(_DOWNLOAD_PREFIX):
            return continuation(details)
        site, token = credentials_from_metadata(details.invocation_metadata)
        try:
            identity = self._auth.authenticate(site, token, what="a Download call")
        except AuthError as exc:
            return _deny_at_headers(details.method, exc)
        handler = continuation(details)
        if handler is None:
            return None
        return gated(handler, _ReceiverGate(identity, self._auth, self._budget))


class _Budget:
    """At most ``limit`` Download calls run at once, so fetches cannot take the workers Control needs.

    Every call holds a worker of the server's pool until it ends; the pool and
    ``maximum_concurrent_rpcs`` are shared by both services, so without a
    budget of its own, N stalled fetches would leave no worker for a
    sidecar's Connect or Push. A refused fetch gets RESOURCE_EXHAUSTED, which
    fetchers retry with backoff.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._running = 0

    def take(self, context: grpc.ServicerContext) -> bool:
        """True after reserving a slot that is given back when the call ends; False when none is free."""
        with self._lock:
            if self._running >= self.limit:
                return False
            self._running += 1
        given_back = threading.Event()

        def give_back() -> None:
            if not given_back.is_set():
                given_back.set()
                with self._lock:
                    self._running -= 1

        if not context.add_callback(give_back):  # the call already ended
            give_back()
        return True


def _deny_at_headers(method: str, refused: AuthError) -> grpc.RpcMethodHandler:
    def deny(requests: Any, context: grpc.ServicerContext) -> Any:
        context.abort(refused.code, refused.message)

    if method.endswith("/Fetch"):
        return grpc.stream_stream_rpc_method_handler(deny)
    return grpc.stream_unary_rpc_method_handler(deny)


class _ReceiverGate(CallGate[Identity]):
    """One Download call run within ``budget``, and only for a request whose ``receiver`` is its caller's site.

    The budget's slot is taken on the headers (:func:`~fedkube.server.callgate.gated`), before the
    request message is awaited: a site that opens calls and never sends their message waits inside
    the Download budget, not in Control's workers.
    """

    def __init__(self, identity: Identity, auth: Authenticator, budget: _Budget) -> None:
        self._identity = identity
        self._auth = auth
        self._budget = budget

    def admit(self, context: grpc.ServicerContext) -> Identity:
        """The caller (its certificate's site bound to its token, with TLS); the call then holds a budget slot."""
        try:
            # The interceptor saw only the headers; the certificate is on the call's context. Checked
            # before the budget, so a caller with another site's token takes no slot while it waits.
            caller = self._auth.call_identity(context, what="a Download call") if self._auth.tls else self._identity
        except AuthError as exc:
            context.abort(exc.code, exc.message)
        if not self._budget.take(context):
            busy = AuthError(self._identity.site, grpc.StatusCode.RESOURCE_EXHAUSTED, DOWNLOAD_BUDGET, (
                f"{self._budget.limit} Download calls are running, the most the server serves at once beside "
                "its control streams; fix: retry with backoff (fetchers do)"
            ))  # fmt: skip
            self._auth.refuse(busy, "a Download call", context.peer())
            context.abort(busy.code, busy.message)
        return caller

    def check(self, admitted: Identity, request: Any, context: grpc.ServicerContext) -> None:
        try:
            self._auth.check_receiver(admitted, request.receiver, what="a Download call", peer=context.peer())
        except AuthError as exc:
            context.abort(exc.code, exc.message)


class FedkubeServer:
    """The server process's parts, startable in-process (tests) or from :func:`main`."""

    def __init__(
        self,
        config: ServerConfig,
        *,
        model_loader: Callable[[], dict[str, np.ndarray]] | None = None,
        checkpoints: CheckpointStore | None = None,
    ) -> None:
        """``checkpoints`` replaces the store under ``config.checkpoint_dir`` (tests inject slow or failing ones)."""
        self.config = config
        s = config.settings
        self.strategy = build_strategy(s.strategy, s.strategy_options, s.influence, spill_dir=config.checkpoint_dir,
                                       rounds=s.rounds, sites=len(s.clients))  # fmt: skip
        self.sessions = SessionTable()
        self.broker = UploadBroker()
        self.downloads = DownloadService(SERVER_SOURCE, chunk_bytes=min(s.transfer.chunk_bytes, MAX_CHUNK_BYTES))
        # Each server has its own registry: no global state, several servers per process in tests.
        self.metrics_registry = new_registry()
        self.metrics = ServerMetrics(self.metrics_registry, s.job, rounds_planned=s.rounds)
        if model_loader is None and s.model_source == "file" and s.model_path:
            path = s.model_path
            model_loader = lambda: load_model_file(path)  # noqa: E731
        if checkpoints is None and config.checkpoint_dir is not None:
            checkpoints = _CheckpointAdapter(config.checkpoint_dir, s.job, start_fresh=s.checkpoint_start_fresh)
        self.output: ModelOutput | None = None
        if config.output_dir is not None:
            checkpoints = self.output = ModelOutput(config.output_dir, s.job, s.rounds, s.strategy,
                                                    every_round=s.output_every_round, inner=checkpoints)
        self.workflow = RoundWorkflow(
            s, self.strategy, self.sessions, self.broker, self.downloads,
            initial_model=model_loader, checkpoints=checkpoints, metrics=self.metrics,
        )  # fmt: skip
        self.tls = ServerTls.from_files(config.tls.files, namespace=config.namespace, job=s.job) if (
            config.tls.files is not None) else None  # fmt: skip
        # Remote sites' certificates replaced by a renewal are refused on both ports (the enrollment ledger's).
        self.supersession = Supersession(config.enroll.records if config.enroll is not None else ())
        # spec.revokedSites: refused on every port, now and as the operator adds names (fedkube.server.revocation).
        self.revoked = RevokedSites(s.revoked_sites)
        self.auth = Authenticator(s.job, config.tokens, self.metrics,
                                  tls_namespace=config.namespace if self.tls is not None else None,
                                  supersession=self.supersession, revoked=self.revoked)
        for site in sorted(self.revoked.names):
            self._revoke(site)
        self.revocation = SpecWatch(config.spec_file, self.revoked, self._revoke, job=s.job) if (
            config.spec_file is not None) else None  # fmt: skip
        self._servicer = ControlServicer(
            s.job, self.auth, self.workflow, self.sessions, self.broker,
            heartbeat_interval_ms=self.workflow.heartbeat_interval_ms,
            register_timeout_s=config.register_timeout_s, terms=JobTerms(strategy=s.strategy, total_rounds=s.rounds),
        )  # fmt: skip
        limit = config.message_limit()
        # Every running call holds a worker. Each site may hold CALLS_PER_SITE of them (SiteAdmission),
        # all sites together never more than the workers; Download calls get at most half (_Budget),
        # so stalled or hostile fetches leave Control its half.
        workers = server_workers(len(s.clients))
        self.site_calls = SiteCalls()
        options = [
            (k, v) for k, v in server_options() if k not in ("grpc.max_receive_message_length",)
        ] + [("grpc.max_receive_message_length", limit)]
        self._executor = futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fedkube-server-grpc")
        self._grpc = grpc.server(
            self._executor,
            options=options,
            interceptors=[SiteAdmission(self.auth, self.site_calls), _DownloadAuth(self.auth, budget=workers // 2)],
            maximum_concurrent_rpcs=workers,
        )
        control_pb2_grpc.add_ControlServicer_to_server(self._servicer, self._grpc)
        self.downloads.add_to_server(self._grpc)
        self.grpc_port = 0
        self.bulk: BulkServer | None = None
        self.enrollment: EnrollmentServer | None = None  # remote sites' enrollment port (started in start())
        self._status = StatusServer(
            self.status_json, self.ready, host=config.bind_host, port=config.status_port,
            on_refused=lambda reason: self.metrics.connection_rejected(reason, "status"),
        )  # fmt: skip
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._outcome: Outcome | None = None
        self._done = threading.Event()
        self._stopped = False

    def _revoke(self, site: str) -> None:
        self.workflow.revoke(site, RevokedSites.message(site))

    def _on_bulk_upload(self, site: str, upload_id: str, sock: socket.socket) -> tuple[grpc.StatusCode | None, str]:
        """A sidecar answers an UploadRequest on the bulk port: hand the socket to that request's fetcher."""
        try:
            self.broker.claim(site, upload_id, sock)
        except ClaimRefused as exc:
            if exc.reason:
                self.auth.refuse(AuthError(site, exc.code, exc.reason, exc.message), "a bulk upload", plane="bulk")
            return exc.code, exc.message
        log.debug("job %s: upload %s from site %s arrives on the bulk port", self.config.job, upload_id, site)
        return None, ""

    @property
    def status_port(self) -> int:
        return self._status.port

    def status_json(self) -> str:
        return self.workflow.status().to_json()

    def ready(self) -> bool:
        return self._ready.is_set()

    def start(self) -> None:
        """Bind the ports and start the job's workflow thread."""
        address = f"{self.config.bind_host}:{self.config.grpc_port}"
        try:
            self.grpc_port = endpoints.add_port(self._grpc, address, self.tls)
        except RuntimeError as exc:
            raise ConfigError(f"cannot listen on {address} ({envvars.GRPC_PORT}): {exc}") from exc
        if self.grpc_port == 0:
            raise ConfigError(f"cannot listen on {address}; fix: pick a free {envvars.GRPC_PORT}")
        if self.config.bulk_port is not None:
            self.bulk = self._start_bulk(self.config.bulk_port)
        if self.config.enroll is not None:
            self.enrollment = start_enrollment(
                self.config.enroll, tls_files=self.config.tls.files, namespace=self.config.namespace,
                job=self.config.job, host=self.config.bind_host, site_tokens=self.config.tokens,
                checkpoint_dir=self.config.checkpoint_dir, count=self.metrics.enrollment,
                supersession=self.supersession, revoked=self.revoked)
        self._grpc.start()
        if self.revocation is not None:
            self.revocation.start()
        self._status.start()
        self._ready.set()
        log.info("job %s: server listening on gRPC port %s, bulk port %s, status port %s (%s)", self.config.job,
                 self.grpc_port, self.bulk.port if self.bulk is not None else "off", self.status_port,
                 "mutual TLS" if self.tls is not None else "plaintext: security.tls is disabled")
        self._thread = threading.Thread(target=self._run, name="fedkube-workflow", daemon=True)
        self._thread.start()

    def _start_bulk(self, port: int) -> BulkServer:
        # "[::]" and "" mean every interface and both IP families, as for gRPC (an IPv6-only or
        # dual-stack cluster reaches the pod over IPv6); IPv4 alone where the host has no IPv6.
        host = self.config.bind_host.strip("[]")
        if host in ("", "::"):
            host = "::" if socket.has_dualstack_ipv6() else "0.0.0.0"
        try:
            return BulkServer(
                self.downloads, host=host, port=port, authorize=self.auth.authorize_bulk,
                on_upload=self._on_bulk_upload, name=f"job {self.config.job} bulk",
                on_refused=lambda reason: self.metrics.connection_rejected(reason, "bulk"), tls=self.tls,
                check_peer=self.supersession.check,
            ).start()  # fmt: skip
        except OSError as exc:
            raise ConfigError(
                f"cannot listen on {host}:{port} for bulk transfers ({envvars.BULK_PORT}): {exc}; "
                f"fix: pick a free {envvars.BULK_PORT}, or 0 to move tensors over gRPC only"
            ) from exc

    @property
    def bulk_port(self) -> int:
        """The bound bulk port; 0 when the bulk data plane is off."""
        return self.bulk.port if self.bulk is not None else 0

    def _run(self) -> None:
        try:
            self._outcome = self.workflow.run()
        finally:
            self._done.set()

    def wait(self, timeout: float | None = None) -> Outcome | None:
        """The job's outcome once it ended, or None after ``timeout``."""
        self._done.wait(timeout)
        return self._outcome

    def request_stop(self, reason: str) -> None:
        self.workflow.request_stop(reason)

    def linger(self, timeout_s: float) -> None:
        """After the job ended, keep serving until every client hung up (bounded).

        Sidecars forward their trainer's final state after ``Stop`` and then
        close their stream; closing ours first would make them reconnect to a
        server that is going away, and lose that state (a teardown it could
        have reported).
        """
        deadline = time.monotonic() + timeout_s
        while self.sessions.live() and time.monotonic() < deadline:
            time.sleep(0.05)

    def shutdown(self, grace_s: float = 3.0) -> None:
        """Let queued messages (Stop) reach the clients, then close the endpoints."""
        if self._stopped:
            return
        self._stopped = True
        self._ready.clear()
        self.sessions.close_all()  # streams drain their queues (the Stop message) and end
        if self.revocation is not None:
            self.revocation.stop()
        if self.bulk is not None:
            self.bulk.stop()
        if self.enrollment is not None:
            self.enrollment.stop()
        self._grpc.stop(grace_s).wait(grace_s + 1)
        # grpc leaves its executor to us: without this its idle workers outlive the server (an in-process server
        # of a test keeps them for the whole session). No wait: a handler past the grace must not hang shutdown.
        self._executor.shutdown(wait=False)
        self._status.stop()
        self.downloads.close()

    def summary(self) -> TerminationSummary:
        summary = TerminationSummary.from_status(self.workflow.status())
        final = self.output.final if self.output is not None else None
        if final is not None and summary.phase == Phase.SUCCEEDED:
            summary = dataclasses.replace(summary, model_file=final.path.name, model_sha256=final.sha256)
        return summary


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``fedkube server``; returns the process exit code."""
    parser = argparse.ArgumentParser(prog="fedkube server", description="Run the fedkube aggregator for one FLJob.")
    parser.add_argument("--bind", default=os.environ.get(envvars.BIND_ADDRESS, "").strip() or "[::]",
                        help=f"host to listen on (default: {envvars.BIND_ADDRESS}, else every interface)")
    args = parser.parse_args(argv)
    try:
        configure_logging("server", job=os.environ.get(envvars.JOB, ""), fmt=log_format_from_env(os.environ))
    except ConfigError as exc:
        print(f"fedkube server: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    ports_file = portfile.path_from_env()  # under fedkube run: the OS picks every port, reported there
    try:
        config = load_config(bind_host=args.bind)
        if config.settings.model_source == "file" and config.settings.model_path:
            check_model_file(config.settings.model_path)
        if ports_file is not None:
            config = dataclasses.replace(
                config,
                grpc_port=portfile.chosen(ports_file, envvars.GRPC_PORT, config.grpc_port),
                bulk_port=None if config.bulk_port is None else portfile.chosen(ports_file, envvars.BULK_PORT, 0),
                status_port=portfile.chosen(ports_file, envvars.STATUS_PORT, config.status_port),
                enroll=None if config.enroll is None else dataclasses.replace(
                    config.enroll, port=portfile.chosen(ports_file, envvars.ENROLL_PORT, 0)),
            )
        server = FedkubeServer(config)
    except ConfigError as exc:
        log.error("configuration error: %s", exc)
        print(f"fedkube server: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    bound: dict[str, int] = {}
    if config.metrics_port:
        try:
            _, bound[envvars.METRICS_PORT] = serve_metrics(
                server.metrics_registry, portfile.chosen(ports_file, envvars.METRICS_PORT, config.metrics_port),
                addr="0.0.0.0" if args.bind in ("[::]", "") else args.bind.strip("[]"),
                on_refused=lambda reason: server.metrics.connection_rejected(reason, "metrics"))
        except ConfigError as exc:
            log.error("configuration error: %s", exc)
            return EXIT_CONFIG

    def on_signal(signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        log.warning("job %s: received %s; stopping the job", config.job, name)
        server.request_stop(f"the server received {name}")

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        try:
            server.start()
            bound.update({envvars.GRPC_PORT: server.grpc_port, envvars.STATUS_PORT: server.status_port})
            if server.bulk_port:
                bound[envvars.BULK_PORT] = server.bulk_port
            if server.enrollment is not None:
                bound[envvars.ENROLL_PORT] = server.enrollment.port
            portfile.report(ports_file, bound)
        except ConfigError as exc:
            log.error("configuration error: %s", exc)
            return EXIT_CONFIG
        outcome = None
        while outcome is None:
            # Short waits keep the main thread responsive to signals.
            outcome = server.wait(0.5)
        server.linger(LINGER_S)
        server.shutdown()
        summary = server.summary()
        if not outcome.success:
            # A configuration error found once the job ran (a checkpoint of another strategy, a model
            # that does not load, a trainer's ConfigError) exits 2 like one found at start; the
            # summary carries the same code as the process.
            code = EXIT_CONFIG if outcome.reason == Reason.CONFIG_ERROR.value else EXIT_FAILED
            summary = dataclasses.replace(summary, exit_code=code)
        if config.termination_log is not None:
            try:
                write_termination_summary(config.termination_log, summary)
            except OSError as exc:
                log.error("could not write the termination summary to %s: %s", config.termination_log, exc)
        print(summary.to_json(), file=sys.stderr)
        log.info("job %s: %s (%s) %s", config.job, summary.phase.value, outcome.reason, outcome.message)
        return summary.exit_code
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
