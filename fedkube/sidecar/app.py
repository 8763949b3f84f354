"""The job-cell sidecar process: ``fedkube sidecar``.

It holds the site's identity and its one control stream to the server, and
gives the trainer a local endpoint (``TrainerLink`` + a relaying ``Download``)
on 127.0.0.1. With ``FEDKUBE_SERVER_BULK_ADDRESS`` set it also runs a bulk
relay on 127.0.0.1 (named to the trainer in ``HelloResponse.bulk_address``)
and answers the server's upload requests on the server's bulk port when the
trainer serves its results on one. See docs/protocol.md for the message
sequences.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from concurrent import futures
from types import FrameType

import grpc

from fedkube import envvars, portfile
from fedkube.errors import ConfigError
from fedkube.logs import configure_logging, log_format_from_env
from fedkube.metrics import MetricsServer, SidecarMetrics, new_registry, serve_metrics
from fedkube.metrics.sidecar import TRAINER_STATES
from fedkube.sidecar.config import SidecarConfig
from fedkube.sidecar.local import TrainerLinkServicer
from fedkube.sidecar.meter import RelayMeter, metered_bulk_handoff, metered_bulk_relay, metered_relay
from fedkube.sidecar.reverse import SERVER_RECEIVER, Pusher
from fedkube.sidecar.siteplace import POLICY_REFUSED, WITHDRAWN, SitePlace, SiteStatusServer, terms_of, write_final
from fedkube.sidecar.state import TaskBook, TrainerSnapshot, TrainerTracker
from fedkube.sidecar.upstream import RegistrationRejected, Upstream, server_channel
from fedkube.terms import check_terms
from fedkube.transfer import handoff, peercred
from fedkube.transfer.allocator import tune_allocator
from fedkube.transfer.bulk import BulkHandoff, BulkRelay
from fedkube.transfer.endpoints import ClientTls
from fedkube.transfer.route import handoff_enabled
from fedkube.transfer.wire import relay_channel_options, server_options
from fedkube.wire.v1 import control_pb2, tensor_pb2, tensor_pb2_grpc, trainer_pb2, trainer_pb2_grpc

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_CONFIG = 2
#: The site's policy refused the job's terms (the site left with PolicyRefused).
EXIT_REFUSED = 3


class Sidecar:
    """One site's sidecar: upstream stream, trainer endpoint, relays both ways.

    ``start()`` binds the trainer endpoint and starts connecting; ``wait()``
    returns the process exit code (0 after Stop with ``exit_on_stop``, 2 when
    the server rejected the registration); ``stop()`` shuts everything down.
    ``metrics`` (on ``registry``) is always kept; ``start()`` serves it on
    ``/metrics`` when ``config.metrics_port`` is set.
    """

    def __init__(self, config: SidecarConfig) -> None:
        self.config = config
        self.tasks = TaskBook()
        self.trainer = TrainerTracker()
        self.place = SitePlace()
        self.status_server: SiteStatusServer | None = None
        self._left = threading.Event()  # the site left the job by its own decision (refusal or withdrawal)
        self._closing = threading.Event()
        self._exit = threading.Event()
        self._exit_code = EXIT_OK
        self.registry = new_registry()
        self.metrics = SidecarMetrics(self.registry, config.job, config.site)
        self.metrics.trainer_state(_trainer_state_name(self.trainer.state.phase))
        self.meter = RelayMeter(self.metrics.relayed, self.metrics.buffer_bytes)
        peercred.observe(self.metrics.local_connection_rejected)  # refusals of this process's pod-local endpoints
        self.metrics_server: MetricsServer | None = None
        self._lock = threading.Lock()
        self._trainer_address = ""
        self._trainer_bulk = ""  # the trainer's own bulk server ("" when it has none)
        self._trainer_handoff = ""  # where the trainer takes handed-over connections ("" when it does not)
        self._trainer_channel: grpc.Channel | None = None
        self.bulk_relay: BulkRelay | None = None  # started by start() when the server has a bulk port
        self.bulk_handoff: BulkHandoff | None = None  # and this, where sockets can be handed over
        # Calls into the trainer on behalf of upstream messages run here, never on the stream's reader thread.
        self._callouts = futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix=f"sidecar-{config.site}")
        # Built once: a bad bundle fails the start (ConfigError), not the first dial.
        self.tls = ClientTls.from_settings(config.tls)
        self._raw_channel, self._channel = server_channel(config.server_address, config.site, config.token, self.tls)
        self.upstream = Upstream(
            self._channel,
            job=config.job,
            site=config.site,
            address=config.server_address,
            on_message=self._on_server_message,
            trainer_state=lambda: self.trainer.state.to_proto(),
            resume_task_id=self.tasks.resume_task_id,
            on_connected=self._on_connected,
            backoff_base_s=config.backoff_base_s,
            backoff_max_s=config.backoff_max_s,
            on_state=self.metrics.upstream,
            on_heartbeat=self.metrics.heartbeat,
            on_reconnected=self.metrics.reconnected,
            check_registered=self._check_terms,
        )
        self.pusher = Pusher(
            self._channel,
            site=config.site,
            trainer_channel=self._get_trainer_channel,
            relayed=self.tasks.relayed,
            window_chunks=config.relay_window_chunks,
            meter=self.meter,
            bulk_address=config.server_bulk_address,
            token=config.token,
            trainer_bulk=self._get_trainer_bulk,
            trainer_handoff=self._get_trainer_handoff,
            tls=self.tls,
        )
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=32, thread_name_prefix=f"trainer-link-{config.site}"),
            options=server_options(),
            interceptors=[peercred.SameUserInterceptor(f"site {config.site} trainer port", lambda: self.port)],
        )
        self.link = TrainerLinkServicer(
            job=config.job,
            site=config.site,
            tasks=self.tasks,
            trainer=self.trainer,
            on_hello=self._on_hello,
            on_state=self._on_trainer_state,
            on_result=self._on_result,
            on_metric=self._on_metric,
            closing=self._closing,
            bulk_address=self._relay_address,
            bulk_handoff=lambda: self.bulk_handoff.address if self.bulk_handoff is not None else "",
            server_connected=self.upstream.connected.is_set,
        )
        trainer_pb2_grpc.add_TrainerLinkServicer_to_server(self.link, self._server)
        metered_relay(self._channel, window_chunks=config.relay_window_chunks, meter=self.meter,
                      direction="to_trainer").add_to_server(self._server)
        self.port = 0

    # --- lifecycle --------------------------------------------------------------
    def start(self) -> int:
        """Bind the trainer endpoint on 127.0.0.1 and start the upstream stream; returns the bound port."""
        ports_file = self.config.ports_file
        trainer_port = portfile.chosen(ports_file, envvars.TRAINER_PORT, self.config.trainer_port)
        try:
            self.port = self._server.add_insecure_port(f"127.0.0.1:{trainer_port}")
        except RuntimeError:
            self.port = 0
        if not self.port:
            raise ConfigError(f"cannot listen on 127.0.0.1:{trainer_port} for the trainer (port in use?); "
                              f"fix: choose a free {envvars.TRAINER_PORT}")
        if self.config.server_bulk_address:
            try:
                # A TLS relay copies every byte through this process (it cannot hand over or splice): over an
                # abstract Unix socket its pod-local leg costs the trainer about half the CPU of 127.0.0.1 TCP
                # (bench/README.md, "TLS"). Without TLS the handoff or splice path takes the bytes anyway.
                unix = self.tls is not None and handoff.AVAILABLE
                self.bulk_relay = metered_bulk_relay(
                    self.config.server_bulk_address, site=self.config.site, token=self.config.token,
                    meter=self.meter, direction="to_trainer", tls=self.tls,
                    host=handoff.new_name(f"relay-{self.config.site}") if unix else "127.0.0.1",
                ).start()  # fmt: skip
            except OSError as exc:
                raise ConfigError(f"cannot listen on 127.0.0.1 for the trainer's bulk fetches: {exc}") from exc
            if handoff_enabled(self.config.bulk_handoff, server_tls=self.tls is not None):
                try:
                    self.bulk_handoff = metered_bulk_handoff(
                        self.config.server_bulk_address, site=self.config.site, token=self.config.token,
                        meter=self.meter, direction="to_trainer",
                    ).start()  # fmt: skip
                except OSError as exc:  # the relay still works; only the shortcut is lost
                    log.warning("site %s: cannot listen for bulk handoffs (%s); relaying the trainer's bytes",
                                self.config.site, exc)
        bound = {envvars.TRAINER_PORT: self.port}
        if self.config.status_port is not None:
            self.status_server = SiteStatusServer(
                self.place, self.config.metrics_host,
                portfile.chosen(ports_file, envvars.STATUS_PORT, self.config.status_port),
                token=self.config.token, leave=self.leave, on_refused=self.metrics.local_connection_rejected,
            )  # fmt: skip
            bound[envvars.STATUS_PORT] = self.status_server.port
        if self.config.metrics_port:
            self.metrics_server, bound[envvars.METRICS_PORT] = serve_metrics(
                self.registry, portfile.chosen(ports_file, envvars.METRICS_PORT, self.config.metrics_port),
                addr=self.config.metrics_host, on_refused=self.metrics.local_connection_rejected)
        self._server.start()
        portfile.report(ports_file, bound)  # the local runtime starts the trainer once it reads this
        log.info("site %s: sidecar for job %s listening for its trainer on 127.0.0.1:%d (bulk relay %s, handoff %s); "
                 "server is %s (bulk %s, %s)", self.config.site, self.config.job, self.port,
                 self.bulk_relay.address if self.bulk_relay is not None else "off",
                 self.bulk_handoff.address if self.bulk_handoff is not None else "off", self.config.server_address,
                 self.config.server_bulk_address or "off",
                 f"mutual TLS, server name {self.tls.server_name}" if self.tls is not None else "plaintext")
        self.upstream.start()
        threading.Thread(target=self._watch_upstream, name="sidecar-watch", daemon=True).start()
        return self.port

    def wait(self, timeout: float | None = None) -> int | None:
        """Block until the sidecar decided to exit; the exit code, or None on timeout."""
        if not self._exit.wait(timeout):
            return None
        return self._exit_code

    def request_exit(self, code: int) -> None:
        self._exit_code = code
        self._exit.set()

    def stop(self, grace: float = 2.0) -> None:
        """Shut down: close the upstream stream (flushing it), stop the endpoint and the relays."""
        if self._closing.is_set():
            return
        self._closing.set()
        peercred.unobserve(self.metrics.local_connection_rejected)
        if self.config.site_controlled:
            self._send_leave("the site's controller stopped its sidecar before the job ended (`fedkube join` "
                             "interrupted)")
        self._report_never_attached()
        self.upstream.close(timeout=grace)
        self.pusher.shutdown()
        if self.bulk_relay is not None:
            self.bulk_relay.stop()
        if self.bulk_handoff is not None:
            self.bulk_handoff.stop()
        self._server.stop(grace).wait(grace + 1)
        self._callouts.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            ch, self._trainer_channel = self._trainer_channel, None
        if ch is not None:
            ch.close()
        self._raw_channel.close()
        if self.metrics_server is not None:
            self.metrics_server.close()
        if self.status_server is not None:
            self.status_server.close()
        write_final(self.config.termination_log, self.place.view)
        self._exit.set()

    def tell_server_it_cannot_start(self, problem: str, timeout_s: float = 10.0) -> bool:
        """This sidecar cannot run (``start()`` failed): register anyway and say so, then close.

        Without it the server would wait out ``registrationSeconds`` for a client that will never
        come; with it the client fails at once with the reason. True when the server was reached.
        """
        self.trainer.reported(control_pb2.TrainerState(
            phase=control_pb2.TRAINER_PHASE_EXITED,
            message=f"the sidecar of site {self.config.site} could not start, so its trainer cannot run: {problem}",
        ))  # fmt: skip
        self.upstream.start()
        reached = self.upstream.connected.wait(timeout_s)
        if reached:
            self._on_trainer_state(self.trainer.state)
        self._closing.set()
        self.upstream.close(timeout=2.0)
        self._raw_channel.close()
        return reached

    def _report_never_attached(self) -> None:
        # Queued before the upstream's half-close, so it reaches the server before the stream ends.
        change = self.trainer.never_attached()
        if change is not None:
            log.warning("site %s: stopping, and no trainer ever attached; telling the server", self.config.site)
            self._on_trainer_state(change)

    def _watch_upstream(self) -> None:
        self.upstream.done.wait()
        if self.upstream.rejected is not None:
            self.request_exit(EXIT_CONFIG)
        elif self.upstream.left is not None:
            self._stop_trainer(self.upstream.left, EXIT_REFUSED)

    # --- the site's own decisions ---------------------------------------------------
    def _check_terms(self, registered: control_pb2.Registered) -> control_pb2.Leave | None:
        """On the stream's reader, before any task: the job's terms against the site's policy."""
        refusal = check_terms(self.config.policy, terms_of(registered))
        if refusal is None:
            return None
        self.place.refused(refusal)
        self._left.set()
        write_final(self.config.termination_log, self.place.view)  # the final word even if this process dies
        return control_pb2.Leave(reason=POLICY_REFUSED, message=refusal.message)

    def leave(self, message: str) -> bool:
        """The site's controller ends its participation (``POST /leave``): Leave, then stop the trainer."""
        text = message or "the site's controller withdrew it (FLSite deleted)"
        if not self._send_leave(text):
            return False
        self.upstream.close(timeout=2.0)  # flushes the Leave; no reconnect after it
        self._stop_trainer(control_pb2.Leave(reason=WITHDRAWN, message=text), EXIT_OK)
        return True

    def _send_leave(self, message: str) -> bool:
        """Tell the server the site leaves (once, and only while the job runs for it); True when sent."""
        if self._left.is_set() or self.tasks.stopped is not None or self.upstream.rejected is not None:
            return False
        self._left.set()
        self.place.withdrawn(message)
        log.warning("site %s: leaving job %s: %s", self.config.site, self.config.job, message)
        return self.upstream.send(control_pb2.ClientMessage(leave=control_pb2.Leave(reason=WITHDRAWN,
                                                                                    message=message)))

    def _stop_trainer(self, leave: control_pb2.Leave, code: int) -> None:
        """The trainer gets a Stop carrying the site's reason, and (with exit_on_stop) this process exits."""
        self.tasks.stop(control_pb2.Stop(success=False, reason=leave.reason, message=leave.message))
        if self.config.exit_on_stop:
            threading.Thread(target=self._exit_after_stop, args=(code,), name="sidecar-exit", daemon=True).start()

    # --- upstream -> sidecar ------------------------------------------------------
    def _on_server_message(self, msg: control_pb2.ServerMessage) -> None:
        kind = msg.WhichOneof("msg")
        site = self.config.site
        if kind == "task":
            task = msg.task
            # Ack first, work later (LESSONS.md 9).
            self._send(control_pb2.ClientMessage(task_ack=control_pb2.TaskAck(task_id=task.task_id)), "task ack")
            self.place.task(task.round)
            if self.tasks.offer(task):
                log.info("site %s: task %s for round %d/%d queued for the trainer (%d global tensors)",
                         site, task.task_id, task.round, task.total_rounds, len(task.refs))
            else:
                log.info("site %s: task %s was already received; duplicate ignored", site, task.task_id)
        elif kind == "upload":
            self.pusher.request(msg.upload)
        elif kind == "cancel_upload":
            self.pusher.cancel(msg.cancel_upload.request_id)
        elif kind == "result_received":
            self._callouts.submit(self._result_received, msg.result_received)
        elif kind == "stop":
            stop = msg.stop
            log.info("site %s: job stopped by the server (success=%s, %s): %s", site, stop.success,
                     stop.reason or "-", stop.message or "-")
            self.tasks.stop(stop)
            self.place.stopped(stop)
            if self.config.exit_on_stop:
                threading.Thread(target=self._exit_after_stop, name="sidecar-exit", daemon=True).start()
        else:
            log.warning("site %s: unexpected server message %s ignored", site, kind)

    def _result_received(self, rr: control_pb2.ResultReceived) -> None:
        txs = self.tasks.received(rr.task_id, ok=rr.ok, reason=rr.reason, message=rr.message)
        self.place.received(rr.ok)
        if txs is None:
            log.info("site %s: ResultReceived for unknown or finished task %s ignored", self.config.site, rr.task_id)
            return
        if rr.ok:
            # Not completed on the trainer: it keeps serving the result until its next task, for the server
            # may pull tensors of it again this round (to rebuild its aggregate without an excluded result).
            log.info("site %s: server received the result of task %s", self.config.site, rr.task_id)
            return
        log.warning("site %s: server refused the result of task %s (%s): %s", self.config.site, rr.task_id,
                    rr.reason, rr.message)
        ch = self._get_trainer_channel()
        if ch is None:
            return
        stub = tensor_pb2_grpc.DownloadStub(ch)
        for tx in txs:
            try:
                stub.Complete(
                    tensor_pb2.CompleteRequest(transaction_id=tx, receiver=SERVER_RECEIVER, ok=False,
                                               error=f"{rr.reason}: {rr.message}"),
                    timeout=10.0,
                )
            except grpc.RpcError as exc:
                # The trainer's transaction still expires by its TTL; nothing else depends on this call.
                log.info("site %s: could not complete transaction %s on the trainer: %s", self.config.site, tx,
                         exc.details() if hasattr(exc, "details") else exc)

    def _on_connected(self) -> None:
        self.place.registered()
        for ann in self.tasks.pending_announcements():
            log.info("site %s: re-announcing the result of task %s after reconnect", self.config.site, ann.task_id)
            self._send(control_pb2.ClientMessage(result=ann), "result announcement")

    def _exit_after_stop(self, code: int = EXIT_OK) -> None:
        final = self.trainer.wait_final(self.config.final_state_grace_s)
        if final is None:
            log.warning("site %s: trainer reported no final state within %.0f s after Stop; exiting anyway",
                        self.config.site, self.config.final_state_grace_s)
        else:
            # The state change may still be on its way to the queue; queue it again so the
            # half-close in stop() cannot overtake it (the server ignores an unchanged state).
            self._on_trainer_state(final)
        self.request_exit(code)

    # --- trainer -> sidecar -------------------------------------------------------
    def _on_hello(self, hello: trainer_pb2.HelloRequest) -> None:
        with self._lock:
            old = self._trainer_channel
            self._trainer_address = hello.download_address
            self._trainer_bulk = hello.bulk_address
            self._trainer_handoff = hello.bulk_handoff if self.bulk_handoff is not None else ""
            self._trainer_channel = grpc.insecure_channel(hello.download_address, options=relay_channel_options())
        if old is not None:
            old.close()

    def _get_trainer_bulk(self) -> str:
        with self._lock:
            return "" if self.trainer.state.final else self._trainer_bulk

    def _get_trainer_handoff(self) -> str:
        with self._lock:
            return "" if self.trainer.state.final else self._trainer_handoff

    def _relay_address(self) -> str:
        """Where the trainer fetches through the relay: ``host:port``, or ``unix:@name`` on a Unix socket."""
        if self.bulk_relay is None:
            return ""
        address = self.bulk_relay.address
        return handoff.UNIX_PREFIX + address if handoff.is_handoff(address) else address

    def _get_trainer_channel(self) -> grpc.Channel | None:
        with self._lock:
            if self.trainer.state.final:
                return None
            return self._trainer_channel

    def _on_trainer_state(self, snap: TrainerSnapshot) -> None:
        self.metrics.trainer_state(_trainer_state_name(snap.phase))
        self._send(control_pb2.ClientMessage(trainer_state=snap.to_proto()), "trainer state")

    def _on_result(self, ann: control_pb2.ResultAnnouncement) -> None:
        self.place.uploading()
        self._send(control_pb2.ClientMessage(result=ann), "result announcement")

    def _on_metric(self, report: control_pb2.MetricReport) -> None:
        # The SDK's own timings (fedkube.*) become histograms here; only the user's values go to the server.
        user = self.metrics.record_report(dict(report.values))
        if not user:
            return
        forward = control_pb2.MetricReport(round=report.round, values=user, timestamp_ms=report.timestamp_ms)
        self._send(control_pb2.ClientMessage(metrics=forward), "metric report")

    def _send(self, msg: control_pb2.ClientMessage, what: str) -> None:
        if not self.upstream.send(msg):
            # State rides on every heartbeat and pending results are re-announced on reconnect.
            log.info("site %s: not connected to the server; %s will be resent after reconnecting",
                     self.config.site, what)


def _trainer_state_name(phase: int) -> str:
    """The ``state`` label of a trainer phase: Running, Finished, ...; Unknown for an unset or unknown phase."""
    name = control_pb2.TrainerPhase.Name(phase) if phase in control_pb2.TrainerPhase.values() else ""
    label = name.removeprefix("TRAINER_PHASE_").capitalize()
    return label if label in TRAINER_STATES else "Unknown"


def main(argv: list[str] | None = None) -> int:
    """Run the sidecar until SIGTERM (or until Stop with FEDKUBE_SIDECAR_EXIT_ON_STOP=1).

    Exit codes: 0 clean stop, 2 configuration error or registration rejected.
    """
    del argv  # configured by environment only, like the pod
    # The opposite of the transfer layer's throughput tuning: the sidecar only forwards, so its
    # chunk buffers go to mmap and back to the OS at once, and few arenas keep freed chunks.
    # Without this glibc raises its mmap threshold after the first large free, and the relayed
    # 1 MiB chunks fragment the heap: RSS crept with the bytes relayed.
    tune_allocator(mmap_threshold=128 << 10, trim_threshold=None, arena_max=2)
    try:
        configure_logging("sidecar", job=os.environ.get(envvars.JOB, ""), site=os.environ.get(envvars.SITE) or None,
                          fmt=log_format_from_env(os.environ))
    except ConfigError as exc:
        print(f"fedkube sidecar: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        config = SidecarConfig.from_env()
        sidecar = Sidecar(config)
    except ConfigError as exc:
        log.error("sidecar configuration error: %s", exc)
        print(f"fedkube sidecar: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        sidecar.start()
    except ConfigError as exc:
        log.error("site %s: the sidecar cannot start: %s; telling the server", config.site, exc)
        print(f"fedkube sidecar: configuration error: {exc}", file=sys.stderr)
        if not sidecar.tell_server_it_cannot_start(str(exc)):
            log.warning("site %s: could not reach the server at %s to tell it", config.site, config.server_address)
        return EXIT_CONFIG

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("site %s: %s received, shutting down", config.site, signal.Signals(signum).name)
        sidecar.request_exit(EXIT_OK)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    code = EXIT_OK
    try:
        while True:
            got = sidecar.wait(0.5)
            if got is not None:
                code = got
                break
    finally:
        sidecar.stop()
    rejected: RegistrationRejected | None = sidecar.upstream.rejected
    if rejected is not None:
        print(f"fedkube sidecar: site {config.site}: {rejected}", file=sys.stderr)
        return EXIT_CONFIG
    left = sidecar.upstream.left
    if left is not None:
        print(f"fedkube sidecar: site {config.site} left job {config.job} ({left.reason}): {left.message}",
              file=sys.stderr)
        return EXIT_REFUSED
    return code
