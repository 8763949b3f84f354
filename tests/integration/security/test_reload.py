"""A running site picks up a renewed certificate: real TLS on 127.0.0.1, the server side reads the serial.

The files are laid out as the kubelet mounts a Secret (``tls.crt -> ..data/tls.crt``, ``..data`` a symlink
swapped to a new directory on update), so the swap is the one a renewed ``<flsite>-tls`` Secret makes.
"""

from __future__ import annotations

import itertools
import os
import queue
import socket
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from fedkube.errors import ConfigError
from fedkube.security import contexts, pki
from fedkube.security.material import files_in
from fedkube.transfer import endpoints
from fedkube.transfer.endpoints import ClientTls
from fedkube.transfer.reload import ReloadingCredentials
from tests.integration.security.conftest import JOB, NS, SERVER_NAME, JobPki

METHOD = "/fedkube.test.Serial/Stream"
_version = itertools.count()


def _pem_serial(pem: bytes) -> bytes:
    from cryptography import x509

    return format(x509.load_pem_x509_certificate(pem).serial_number, "x").encode()


def _stream(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
    for _ in requests:  # one answer per request, on the connection the call started on
        yield _pem_serial(context.auth_context()[contexts.GRPC_PEER_CERT_KEY][0])


@pytest.fixture(scope="module")
def grpc_port(job_pki: JobPki) -> Iterator[int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "fedkube.test.Serial", {"Stream": grpc.stream_stream_rpc_method_handler(_stream)}),))
    port = server.add_secure_port("127.0.0.1:0", contexts.grpc_server_credentials(job_pki.server))
    server.start()
    yield port
    server.stop(None)


@pytest.fixture(scope="module")
def bulk_port(job_pki: JobPki) -> Iterator[int]:
    """A TLS listener that answers each connection with the serial of its client certificate."""
    ctx = contexts.server_ssl_context(job_pki.server)
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            try:
                with ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(format(_der_serial(tls.getpeercert(binary_form=True) or b""), "x").encode())
            except OSError:
                pass

    threading.Thread(target=serve, daemon=True).start()
    yield listener.getsockname()[1]
    listener.close()


def _der_serial(der: bytes) -> int:
    from cryptography import x509

    return x509.load_der_x509_certificate(der).serial_number


def _mount(directory: Path, ca: pki.Issued, issued: pki.Issued, key_of: pki.Issued | None = None) -> str:
    """Write a new ``..<version>`` directory and swap ``..data`` to it, as the kubelet updates a Secret."""
    version = directory / f"..v{next(_version)}"
    version.mkdir(parents=True)
    (version / "ca.crt").write_bytes(ca.cert_pem())
    (version / "tls.crt").write_bytes(issued.cert_pem())
    (version / "tls.key").write_bytes((key_of or issued).key_pem())
    tmp = directory / "..data_tmp"
    tmp.symlink_to(version.name)
    os.replace(tmp, directory / "..data")
    for name in ("ca.crt", "tls.crt", "tls.key"):
        if not (directory / name).is_symlink():
            (directory / name).symlink_to(f"..data/{name}")
    return format(issued.cert.serial_number, "x")


def _site_cert(job_pki: JobPki) -> pki.Issued:
    valid = pki.Validity(job_pki.ca.cert.not_valid_before_utc, job_pki.ca.cert.not_valid_after_utc)
    return pki.issue_site_cert(job_pki.ca, NS, JOB, "site-a", valid)


def _bulk_serial(port: int, tls: ClientTls) -> str:
    with endpoints.dial(f"127.0.0.1:{port}", 5.0, tls) as sock:
        return sock.recv(64).decode()


def test_new_connections_present_the_renewed_certificate_and_open_ones_stay(
    job_pki: JobPki, grpc_port: int, bulk_port: int, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    first, second, third = _site_cert(job_pki), _site_cert(job_pki), _site_cert(job_pki)
    old = _mount(tmp_path, job_pki.ca, first)
    tls = ClientTls.from_files(files_in(tmp_path), SERVER_NAME)
    channel = endpoints.channel(f"127.0.0.1:{grpc_port}", [], tls)
    call = channel.stream_stream(METHOD)
    sent: queue.Queue[bytes | None] = queue.Queue()
    running = call(iter(sent.get, None), timeout=10)
    sent.put(b"")
    assert next(running).decode() == old
    assert _bulk_serial(bulk_port, tls) == old

    new = _mount(tmp_path, job_pki.ca, second)
    # The next connection on either plane presents the new certificate...
    fresh = call(iter([b""]), timeout=5)
    assert next(fresh).decode() == new
    assert _bulk_serial(bulk_port, tls) == new
    # ...while the stream opened before the renewal goes on, on its own connection.
    sent.put(b"")
    assert next(running).decode() == old
    sent.put(None)

    # Mid-renewal: the new certificate already there, its key not yet. The old pair stays in use, logged once.
    _mount(tmp_path, job_pki.ca, third, key_of=second)
    assert _bulk_serial(bulk_port, tls) == new
    assert next(call(iter([b""]), timeout=5)).decode() == new
    assert sum("not usable yet" in r.getMessage() for r in caplog.records) == 1
    newest = _mount(tmp_path, job_pki.ca, third)
    assert _bulk_serial(bulk_port, tls) == newest
    assert next(call(iter([b""]), timeout=5)).decode() == newest
    channel.close()


def test_credentials_that_never_match_fail_the_start(job_pki: JobPki, tmp_path: Path) -> None:
    _mount(tmp_path, job_pki.ca, _site_cert(job_pki), key_of=_site_cert(job_pki))
    with pytest.raises(ConfigError, match="does not belong to the certificate"):
        ReloadingCredentials(files_in(tmp_path))
    with pytest.raises(ConfigError, match="fix: provision the job's certificates"):
        ReloadingCredentials(files_in(tmp_path / "nothing-here"))
