"""Reverse path: serve the server's UploadRequests from the trainer's Download service.

The server cannot dial the client, so it asks for bytes down the control
stream; for each request the sidecar opens a ``Control.Push`` stream (dialed
from here) and relays the chunks it fetches from the trainer as they flow,
through a bounded window so the sidecar never holds more than a few chunks.

With a bulk path (the server has a bulk port and the trainer serves its
results on one) the sidecar answers on a plain TCP connection instead
(:func:`fedkube.transfer.bulk.push_upload`): it dials the server's bulk port
with the request's id and pumps the trainer's bulk answer up unchanged through
one fixed buffer. When the server's bulk port cannot be reached it pushes that
request over gRPC and tries bulk again after ``BULK_RETRY_S``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc

from fedkube.protocol import SERVER
from fedkube.sidecar.meter import Counted, RelayMeter, StreamMeter
from fedkube.transfer.bulk import PUMP_BUFFER_BYTES, push_upload
from fedkube.transfer.endpoints import ClientTls
from fedkube.transfer.errors import StreamBrokenError, TransferAbortedError, TransferError
from fedkube.transfer.fetch import GrpcChunkSource
from fedkube.transfer.refs import TensorRef
from fedkube.transfer.relay import relay_chunks
from fedkube.transfer.route import Path, choose_route
from fedkube.transfer.wire import encode_pushed_chunk
from fedkube.wire.v1 import control_pb2, tensor_pb2

log = logging.getLogger(__name__)

# The server is the one receiver of every result transaction the trainer publishes.
SERVER_RECEIVER = SERVER
PUSH_METHOD = "/fedkube.v1.Control/Push"
# Trainer and sidecar share a pod: a chunk that takes this long means the trainer is stuck.
TRAINER_CHUNK_TIMEOUT_S = 60.0
# After the server's bulk port could not be reached, results go over gRPC this long before bulk is tried again.
BULK_RETRY_S = 30.0


def _nbytes(item: tuple[int, Any]) -> int:
    return memoryview(item[1]).nbytes


def _identity(raw: bytes) -> bytes:
    return raw


class _Upload:
    def __init__(self) -> None:
        self.abort = threading.Event()
        self.fetch: Any = None
        self.lock = threading.Lock()

    def cancel(self) -> None:
        self.abort.set()
        with self.lock:
            fetch = self.fetch
        if fetch is not None:
            fetch.cancel()


class Pusher:
    """Answers UploadRequests with Push streams relayed from the trainer.

    ``trainer_channel`` returns the channel to the trainer's Download service,
    or None when no trainer is attached; ``relayed(ref, end)`` is told each
    byte range that went up (it drives the trainer's ``WatchResult`` progress);
    ``meter`` (optional) counts the bytes relayed and held in the window.
    ``bulk_address`` is the server's bulk port (empty: gRPC only) and
    ``trainer_bulk`` and ``trainer_handoff`` return the trainer's bulk address
    and handoff name ("" when it has none; :func:`choose_route` picks);
    ``token`` is the site's token, sent on each bulk connection; ``tls`` the
    server hop's TLS (None: plaintext), which rules out handing a connection
    to the trainer.
    """

    def __init__(
        self,
        server: grpc.Channel,
        *,
        site: str,
        trainer_channel: Callable[[], grpc.Channel | None],
        relayed: Callable[[tensor_pb2.TensorRef, int], None],
        window_chunks: int = 4,
        max_workers: int = 8,
        meter: RelayMeter | None = None,
        bulk_address: str = "",
        token: str = "",
        trainer_bulk: Callable[[], str] = lambda: "",
        trainer_handoff: Callable[[], str] = lambda: "",
        clock: Callable[[], float] = time.monotonic,
        tls: ClientTls | None = None,
    ) -> None:
        self._push_call = server.stream_unary(
            PUSH_METHOD, request_serializer=_identity, response_deserializer=control_pb2.PushAck.FromString
        )
        self._site = site
        self._trainer_channel = trainer_channel
        self._relayed = relayed
        self._window = window_chunks
        self._meter = meter
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix=f"push-{site}")
        self._lock = threading.Lock()
        self._uploads: dict[str, _Upload] = {}
        self._bulk_address = bulk_address
        self._token = token
        self._trainer_bulk = trainer_bulk
        self._trainer_handoff = trainer_handoff
        self._clock = clock
        self._tls = tls
        self._bulk_down_until = 0.0  # while the clock is below it, results go over gRPC

    def request(self, req: control_pb2.UploadRequest) -> None:
        """Start serving ``req`` (returns at once; the push runs on the pusher's own pool)."""
        up = _Upload()
        with self._lock:
            old = self._uploads.get(req.request_id)
            self._uploads[req.request_id] = up
            bulk_ok = self._clock() >= self._bulk_down_until
        if old is not None:
            old.cancel()
        route = choose_route(
            bulk=self._trainer_bulk(), handoff=self._trainer_handoff(), bulk_ok=bool(self._bulk_address) and bulk_ok,
            server_tls=self._tls is not None,
        )
        if route.path is Path.GRPC:
            self._pool.submit(self._push, req, up)
        else:
            self._pool.submit(self._push_bulk, req, up, route.address)

    def cancel(self, request_id: str) -> None:
        """The server no longer wants ``request_id`` (CancelUpload)."""
        with self._lock:
            up = self._uploads.pop(request_id, None)
        if up is not None:
            log.info("site %s: upload %s cancelled by the server", self._site, request_id)
            up.cancel()

    def shutdown(self) -> None:
        with self._lock:
            ups = list(self._uploads.values())
            self._uploads.clear()
        for up in ups:
            up.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _chunks(self, req: control_pb2.UploadRequest, up: _Upload) -> Iterator[bytes]:
        meter = self._meter.stream("to_server") if self._meter is not None else None
        try:
            yield from self._relay(req, up, meter)
        finally:
            if meter is not None:
                meter.close()

    def _relay(self, req: control_pb2.UploadRequest, up: _Upload, meter: StreamMeter | None) -> Iterator[bytes]:
        ref = req.ref
        ids = f"upload {req.request_id} (transaction {ref.transaction_id}, ref {ref.ref_id} {ref.name!r})"
        first = True

        def error(text: str) -> bytes:
            return encode_pushed_chunk(req.request_id if first else "", req.offset, error=text[:4000])

        channel = self._trainer_channel()
        if channel is None:
            log.warning("site %s: %s: no trainer attached", self._site, ids)
            yield error(f"site {self._site}: the trainer is not connected to its sidecar (it exited or never "
                        f"started), so {ids} cannot be served")
            return
        try:
            tref = TensorRef.from_proto(ref)
            stream = GrpcChunkSource(channel, SERVER_RECEIVER, chunk_timeout_s=TRAINER_CHUNK_TIMEOUT_S).stream(
                tref, int(req.offset), int(req.max_chunk_bytes)
            )
            with up.lock:
                up.fetch = stream
            if up.abort.is_set():
                return
            counted = Counted(stream, meter, _nbytes) if meter is not None else stream
            for offset, data in relay_chunks(counted, window=self._window, abort=up.abort):
                msg = encode_pushed_chunk(req.request_id if first else "", offset, data)
                first = False
                nbytes = memoryview(data).nbytes
                del data
                yield msg
                if meter is not None:
                    meter.sent(nbytes)
                self._relayed(ref, offset + nbytes)
        except Exception as exc:  # reported in-band so the server's fetcher knows at once
            if up.abort.is_set():
                return
            log.warning("site %s: %s: reading from the trainer failed: %s", self._site, ids, exc)
            yield error(f"site {self._site}: reading {ids} from the trainer failed: {exc}")
            return
        if first and not up.abort.is_set():
            # A zero-length tensor: the stream must still name its request.
            yield encode_pushed_chunk(req.request_id, req.offset)

    def _push_bulk(self, req: control_pb2.UploadRequest, up: _Upload, source: str) -> None:
        """Answer ``req`` on the server's bulk port with the trainer's bulk answer; gRPC if that port is down."""
        ref = req.ref
        fetch = tensor_pb2.FetchRequest(
            transaction_id=ref.transaction_id, ref_id=ref.ref_id, receiver=SERVER_RECEIVER, offset=req.offset,
            max_chunk_bytes=req.max_chunk_bytes,
        )  # fmt: skip
        moved = 0
        holder = f"bulk push {req.request_id}"

        def on_bytes(nbytes: int) -> None:
            nonlocal moved
            moved += nbytes
            if self._meter is not None:
                self._meter.relayed("to_server", nbytes)
            # What went up includes a few bytes of framing: progress for the trainer's idle timer, capped.
            self._relayed(ref, min(int(req.offset) + moved, int(ref.nbytes)))

        if self._meter is not None:
            self._meter.fixed(holder, PUMP_BUFFER_BYTES)
        fallback = False
        try:
            push_upload(
                self._bulk_address, site=self._site, token=self._token, upload_id=req.request_id,
                source_address=source, fetch=fetch, chunk_timeout_s=TRAINER_CHUNK_TIMEOUT_S, abort=up.abort,
                on_bytes=on_bytes, tls=self._tls,
            )  # fmt: skip
        except TransferAbortedError:
            pass
        except TransferError as exc:
            if up.abort.is_set():
                pass
            elif moved == 0 and isinstance(exc, StreamBrokenError):
                # Nothing reached the server: the same request can still be answered over gRPC.
                with self._lock:
                    self._bulk_down_until = self._clock() + BULK_RETRY_S
                log.warning("site %s: cannot push upload %s on the server's bulk port %s (%s); pushing it over "
                            "gRPC instead and trying bulk again in %.0f s", self._site, req.request_id,
                            self._bulk_address, exc, BULK_RETRY_S)
                fallback = True
            else:
                log.warning("site %s: bulk push for upload %s ended after %d bytes: %s", self._site, req.request_id,
                            moved, exc)
        except Exception:  # a bug must not vanish on the pool's thread; the server's fetcher retries
            log.exception("site %s: bulk push for upload %s failed", self._site, req.request_id)
        finally:
            if self._meter is not None:
                self._meter.fixed(holder, 0)
        if fallback:
            self._push(req, up)
            return
        up.cancel()
        with self._lock:
            if self._uploads.get(req.request_id) is up:
                del self._uploads[req.request_id]

    def _push(self, req: control_pb2.UploadRequest, up: _Upload) -> None:
        try:
            self._push_call(self._chunks(req, up))
        except grpc.RpcError as exc:
            if not up.abort.is_set():
                code = exc.code() if hasattr(exc, "code") else None
                log.warning("site %s: push for upload %s ended: %s %s", self._site, req.request_id,
                            code.name if code else "?", exc.details() if hasattr(exc, "details") else exc)
        finally:
            up.cancel()
            with self._lock:
                if self._uploads.get(req.request_id) is up:
                    del self._uploads[req.request_id]
