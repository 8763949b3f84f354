"""A site's TLS credentials, read again when their files change: every new connection presents the newest pair.

A site's certificate is renewed while it runs (the FLSite operator rewrites its ``<flsite>-tls`` Secret, which
the kubelet swaps into the pod's mount through a ``..data`` symlink; ``fedkube join`` replaces each file by a
rename). Both change the *identity* of the resolved file (its inode, mtime and size), never its content in place,
so :class:`ReloadingCredentials` stats the three files (following symlinks) before each new connection and reads
them again only when that identity moved.

A renewal writes the key and the certificate one after the other (two renames, or a kubelet sync in between), so
a reader can catch a new certificate with the old key. A pair that does not match is never used: the previous
pair stays in use, the mismatch is logged once per file identity, and the next connection looks again.
Connections already open keep the credentials they were made with.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
from dataclasses import dataclass

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from fedkube.errors import ConfigError
from fedkube.security import contexts
from fedkube.security.pki import TlsFiles

log = logging.getLogger(__name__)

_FileId = tuple[int, int, int, int]  # st_dev, st_ino, st_mtime_ns, st_size of the resolved target


@dataclass(frozen=True)
class Loaded:
    """One consistent generation of a site's credentials (both planes made from the same files)."""

    ssl_context: ssl.SSLContext
    grpc_credentials: grpc.ChannelCredentials
    serial: str  # the certificate's serial, hex: what the server's ledger knows it by
    not_after: str
    generation: int  # counts reloads: a gRPC channel made for an older generation is replaced


def _identity(files: TlsFiles) -> tuple[_FileId, ...]:
    out = []
    for path in (files.ca, files.cert, files.key):
        st = os.stat(path)  # follows the symlinks of a mounted Secret to the file of the current ..data
        out.append((st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size))
    return tuple(out)


def _check_pair(files: TlsFiles, cert_pem: bytes, key_pem: bytes) -> x509.Certificate:
    """The certificate, when the key is its key (any algorithm a TLS library takes); ConfigError otherwise."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"cannot parse {files.cert} or {files.key}: {exc}") from exc
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if cert.public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
        raise ConfigError(f"the key {files.key} does not belong to the certificate {files.cert}")
    return cert


def _load(files: TlsFiles, generation: int) -> tuple[Loaded, tuple[_FileId, ...]]:
    """Both planes' credentials from one unchanged state of the files; ConfigError when the pair does not match."""
    for _ in range(3):
        before = _identity(files)
        cert_pem, key_pem = files.cert.read_bytes(), files.key.read_bytes()
        cert = _check_pair(files, cert_pem, key_pem)  # ConfigError: a new certificate with the old key (mid-renewal)
        ssl_ctx = contexts.client_ssl_context(files)  # reads the paths again: only valid if nothing moved since
        creds = contexts.grpc_channel_credentials(files)
        if _identity(files) == before:
            stamp = cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")
            return Loaded(ssl_ctx, creds, format(cert.serial_number, "x"), stamp, generation), before
    raise ConfigError(f"the TLS files {files.cert} and {files.key} kept changing while being read; a renewal is "
                      "being written, the next connection reads them again")


class ReloadingCredentials:
    """The newest consistent credentials in ``files``; :meth:`current` is cheap when nothing changed (3 stats)."""

    def __init__(self, files: TlsFiles) -> None:
        """Reads the files now: a bad bundle fails the start (ConfigError), not the first dial."""
        self.files = files
        self._lock = threading.Lock()
        try:
            self._loaded, self._seen = _load(files, 0)
        except OSError as exc:
            raise ConfigError(f"cannot read the TLS files (ca={files.ca}, cert={files.cert}, key={files.key}): "
                              f"{exc}; fix: provision the job's certificates") from exc
        self._refused: tuple[_FileId, ...] | None = None  # the file state last found unusable (logged once)

    def current(self) -> Loaded:
        """The credentials for a new connection: reloaded when the files changed and the new pair is usable."""
        with self._lock:
            try:
                now = _identity(self.files)
            except OSError as exc:  # mid-swap, or removed: keep what works
                self._once((), f"cannot stat the TLS files ({exc})")
                return self._loaded
            if now == self._seen or now == self._refused:
                return self._loaded
            try:
                loaded, seen = _load(self.files, self._loaded.generation + 1)
            except (ConfigError, OSError) as exc:
                self._once(now, str(exc))
                return self._loaded
            old, self._loaded, self._seen, self._refused = self._loaded, loaded, seen, None
        if loaded.serial != old.serial:
            log.info("TLS certificate %s (until %s, from %s) replaces %s for new connections", loaded.serial,
                     loaded.not_after, self.files.cert, old.serial)
        return loaded

    def _once(self, state: tuple[_FileId, ...], why: str) -> None:
        if state == self._refused:
            return
        self._refused = state
        log.warning("the changed TLS files in %s are not usable yet: %s; new connections keep certificate %s",
                    self.files.cert.parent, why, self._loaded.serial)


__all__ = ["Loaded", "ReloadingCredentials"]
