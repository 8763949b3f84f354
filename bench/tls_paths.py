"""What TLS costs on the bulk data plane: the handoff/relay options of issue 12 item 3, against the TCP floor.

    python bench/tls_paths.py --size-mib 256 --repeats 7
    python bench/tls_paths.py --ciphersuites TLS_AES_128_GCM_SHA256 --path tls_direct --path tls_relay_fill_unix

Three long-lived processes (multiprocessing spawn), each holding its buffers from the start: a *server* (sends
S bytes from a resident pattern buffer, receives uploads into a preallocated one), a *sidecar* (listens on
127.0.0.1 TCP and on an abstract Unix socket, dials the server per connection) and a *trainer* (receives into a
preallocated resident buffer, uploads from it). TLS uses the real material and contexts of fedkube
(`JobTls.generate`, `pki.write_bundle`, `material.files_in`, `contexts.server_ssl_context` /
`client_ssl_context`): TLS 1.3, the job CA only, a site certificate for the sidecar. Paths, S bytes each:

* ``plain_handoff``: server -> trainer on plain TCP, one hop (today: the sidecar dials and hands the socket over);
* ``plain_relay_splice_{tcp,unix}``: server -> sidecar -> trainer, the sidecar moving the bytes with fedkube's
  relay pump (`fedkube.transfer.bulk.relay.pump`: splice(2) through a 1 MiB pipe);
* ``tls_relay_{tcp,unix}`` (option a): server -TLS-> sidecar, which decrypts with ``recv_into`` a fixed 1 MiB
  buffer and sends each piece on in plaintext (OpenSSL hands out one TLS record, <= 16 KiB, per read);
* ``tls_relay_fill_{tcp,unix}``: the same, but the sidecar fills its 1 MiB buffer (several reads) before each send;
* ``tls_direct`` (option b, the one-transfer ticket): server -TLS-> trainer, one hop. The trainer verifies the
  server against the job CA and presents no certificate (it holds no site key; the ticket would travel inside);
* ``tls_direct_bio``, ``tls_relay_bio_unix``: the same with every TLS end driven through memory BIOs
  (`BioTls`: one socket call per MiB of ciphertext instead of per record);
* ``up_*``: the same paths in the other direction (trainer -> server, a result upload).

Each run is timed by the receiving end from its connect (handshake included) to its last byte (uploads: to the
server's 1-byte acknowledgement); every role reports its CPU seconds for the run (getrusage of its process).
The floor (`_common.tcp_floor_detail`) is measured in the same run, interleaved with the paths, best of N.

Prints one JSON line: per path the best seconds, ``over_floor`` (seconds / floor seconds), the median CPU
seconds per GiB of each role and their total, the cipher negotiated; ``derived_cpu_s_per_gib`` subtracts paths
to separate the relay hop's cost from the encryption's; AES-GCM's cost alone (no sockets); the load average
before and after, and the CPU's AES flags. bench/README.md ("TLS") has the numbers and what they decided.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import ssl
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, cast

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import cpu_s, emit, mib, tcp_floor_detail

WAIT_S = 600.0
IO_BYTES = 4 << 20  # senders write, and receivers ask for, this much per call
RELAY_BUFFER = 1 << 20  # the sidecar's one buffer per connection (fedkube.transfer.bulk.relay.PUMP_BUFFER_BYTES)
NAMESPACE, JOB, SITE = "bench", "tls-paths", "site-0"
SAMPLES = 1000  # positions zeroed before and checked after each transfer
ACK = b"k"


def _pattern(size: int) -> np.ndarray:
    """``size`` bytes of a cheap non-constant pattern (Knuth's multiplicative hash of the word index)."""
    words = np.arange(size // 4, dtype=np.uint32)
    words *= 2654435761
    return words.view(np.uint8)


def _sample_index(size: int) -> np.ndarray:
    return np.linspace(0, size // 4 - 1, SAMPLES).astype(np.int64)


def _expected(idx: np.ndarray) -> np.ndarray:
    return ((idx.astype(np.uint64) * np.uint64(2654435761)) & np.uint64(0xFFFFFFFF)).astype(np.uint32)


class BioTls:
    """A TLS session driven through memory BIOs: one socket read or write per MiB of ciphertext.

    An `ssl.SSLSocket` makes two read syscalls per TLS record (header, then body: <= 16 KiB) and one write per
    record; here the socket moves up to RELAY_BUFFER bytes per call and OpenSSL works on memory. The same
    `ssl.SSLContext`, certificates and checks as `wrap_socket`.
    """

    def __init__(
        self, sock: socket.socket, ctx: ssl.SSLContext, *, server_side: bool, server_hostname: str | None = None
    ) -> None:
        self.sock = sock
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self._in, self._out, server_side=server_side, server_hostname=server_hostname)
        self._raw = memoryview(bytearray(RELAY_BUFFER))
        while True:
            try:
                self.obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush()
                self._fill()
        self._flush()  # the last handshake flight (and a server's session tickets)

    def _flush(self) -> None:
        if self._out.pending:
            self.sock.sendall(self._out.read())

    def _fill(self) -> None:
        n = self.sock.recv_into(self._raw)
        if n == 0:
            self._in.write_eof()
        else:
            self._in.write(self._raw[:n])

    def recv_into(self, view: memoryview) -> int:
        while True:
            try:
                return cast(int, self.obj.read(len(view), view))  # given a buffer, read() returns a count
            except ssl.SSLWantReadError:
                self._fill()
            except ssl.SSLZeroReturnError:
                return 0

    def recv(self, n: int) -> bytes:
        buf = bytearray(n)
        return bytes(buf[: self.recv_into(memoryview(buf))])

    def sendall(self, view: bytes | memoryview) -> None:
        mv = memoryview(view)
        for pos in range(0, len(mv), RELAY_BUFFER):  # encrypt a MiB into the BIO, then one write
            self.obj.write(mv[pos : pos + RELAY_BUFFER])
            self._flush()

    def cipher(self) -> tuple[str, str, int] | None:
        return self.obj.cipher()

    def __enter__(self) -> BioTls:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()


#: A connection of the benchmark: plain, an SSLSocket, or a memory-BIO TLS session.
Conn = Any


def _is_tls(sock: Conn) -> bool:
    return isinstance(sock, (ssl.SSLSocket, BioTls))


def _tls_info(sock: Conn) -> str:
    if _is_tls(sock):
        name, version, bits = sock.cipher() or ("?", "?", 0)
        return f"{version} {name} ({bits} bit){' via memory BIOs' if isinstance(sock, BioTls) else ''}"
    return "plaintext"


def _send_all(sock: Conn, view: memoryview) -> None:
    for pos in range(0, len(view), IO_BYTES):
        sock.sendall(view[pos : pos + IO_BYTES])
    if not _is_tls(sock):
        # The plain relay pumps until EOF (as fedkube's does); a TLS socket keeps its session for the ack instead.
        sock.shutdown(socket.SHUT_WR)


def _recv_exact(sock: Conn, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got : got + IO_BYTES])
        if n == 0:
            raise ConnectionError(f"peer closed after {got} of {len(view)} bytes")
        got += n


def _recv_ack(sock: Conn) -> bytes:
    ack = sock.recv(1)
    if ack != ACK:
        raise ConnectionError(f"expected the receiver's acknowledgement, got {ack!r}")
    return ack


def _connect(kind: str, address: str | int) -> socket.socket:
    from fedkube.transfer import endpoints  # imported by every role before its first timed run

    if kind == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(address))
        return sock
    return endpoints.dial(f"127.0.0.1:{address}", 60)


# --- the server ----------------------------------------------------------------------------------


def server_main(conn: Connection, size: int, tls_dir: str) -> None:
    """Serves one connection per command: ("plain"|"mtls"|"ticket", "down"|"up", memory BIOs or not)."""
    from fedkube.security import contexts, material
    from fedkube.transfer import endpoints

    source = _pattern(size)
    sink = np.zeros(size, dtype=np.uint8)
    idx = _sample_index(size)
    mtls = contexts.server_ssl_context(material.files_in(Path(tls_dir) / "server"))
    # Option (b): the trainer holds no certificate; it proves itself with a one-transfer ticket inside the session.
    ticket = contexts.server_ssl_context(material.files_in(Path(tls_dir) / "server"))
    ticket.verify_mode = ssl.CERT_NONE
    listeners = {kind: endpoints.listen("127.0.0.1", 0) for kind in ("plain", "mtls", "ticket")}
    conn.send({kind: sock.getsockname()[1] for kind, sock in listeners.items()})
    while (cmd := conn.recv()) != "stop":
        kind, direction, bio = cmd
        raw, _ = listeners[kind].accept()
        cpu0 = cpu_s()
        sock: Conn = raw
        if kind != "plain":
            ctx = mtls if kind == "mtls" else ticket
            sock = BioTls(raw, ctx, server_side=True) if bio else ctx.wrap_socket(raw, server_side=True)
        with sock:
            if direction == "down":
                _send_all(sock, source.data.cast("B"))
                _recv_ack(sock)
            else:
                sink.view(np.uint32)[idx] = 0
                _recv_exact(sock, sink.data.cast("B"))
                sock.sendall(ACK)
                if not np.array_equal(sink.view(np.uint32)[idx], _expected(idx)):
                    raise AssertionError("server: the upload's bytes are wrong")
            conn.send({"cpu_s": cpu_s() - cpu0, "tls": _tls_info(sock)})


# --- the sidecar ---------------------------------------------------------------------------------


def _copy(src: Conn, dst: Conn, buf: memoryview, nbytes: int, fill: bool) -> None:
    """Move ``nbytes`` through ``buf``: one receive per send, or (``fill``) as many receives as fill it."""
    left = nbytes
    while left:
        want = min(left, len(buf))
        n = src.recv_into(buf[:want])
        if n == 0:
            raise ConnectionError(f"relay source closed with {left} bytes left")
        while fill and n < want:
            got = src.recv_into(buf[n:want])
            if got == 0:
                raise ConnectionError(f"relay source closed with {left - n} bytes left")
            n += got
        dst.sendall(buf[:n])
        left -= n


def sidecar_main(conn: Connection, size: int, tls_dir: str, server_ports: dict[str, int]) -> None:
    """Relays one connection per command: ("tcp"|"unix", "plain"|"tls"|"tls_fill"|"tls_bio", "down"|"up")."""
    from fedkube.security import contexts, material
    from fedkube.transfer import endpoints
    from fedkube.transfer.bulk.relay import pump

    client = contexts.client_ssl_context(material.files_in(Path(tls_dir) / SITE))
    server_name = f"{JOB}-server.{NAMESPACE}.svc"
    unix_name = f"\0fedkube-bench-tls-{os.getpid()}"
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.bind(unix_name)
    unix.listen(8)
    listeners = {"tcp": endpoints.listen("127.0.0.1", 0), "unix": unix}
    conn.send({"tcp": listeners["tcp"].getsockname()[1], "unix": unix_name})
    buf = memoryview(bytearray(RELAY_BUFFER))
    while (cmd := conn.recv()) != "stop":
        local_kind, upstream, direction = cmd
        local, _ = listeners[local_kind].accept()
        cpu0 = cpu_s()
        up: Conn = endpoints.dial(f"127.0.0.1:{server_ports['plain' if upstream == 'plain' else 'mtls']}", 60)
        if upstream == "tls_bio":
            up = BioTls(up, client, server_side=False, server_hostname=server_name)
        elif upstream != "plain":
            up = client.wrap_socket(up, server_hostname=server_name)
        src, dst = (up, local) if direction == "down" else (local, up)
        with local, up:
            if upstream == "plain":
                pump(src, dst, RELAY_BUFFER, None)  # splice(2): the bytes never enter this process
                dst.shutdown(socket.SHUT_WR)
            else:  # splice cannot read a TLS session: decrypt (or encrypt) through the buffer
                _copy(src, dst, buf, size, fill=upstream != "tls")
            src.sendall(_recv_ack(dst))
            conn.send({"cpu_s": cpu_s() - cpu0, "tls": _tls_info(up)})


# --- the trainer ---------------------------------------------------------------------------------


def trainer_main(conn: Connection, size: int, tls_dir: str) -> None:
    """One transfer per command: (("server"|"tcp"|"unix"|"tls"|"tls_bio", address), "down"|"up"); times it."""
    from fedkube.transfer import endpoints  # noqa: F401  (not inside the first timed run)

    data = _pattern(size)  # uploads send it; downloads overwrite it with the same pattern
    idx = _sample_index(size)
    # Option (b)'s trainer: verifies the server against the job CA, holds no key of its own.
    ticket = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ticket.minimum_version = ssl.TLSVersion.TLSv1_3
    ticket.load_verify_locations(cafile=str(Path(tls_dir) / "server" / "ca.crt"))
    server_name = f"{JOB}-server.{NAMESPACE}.svc"
    conn.send("ready")
    while (cmd := conn.recv()) != "stop":
        (kind, address), direction = cmd
        if direction == "down":
            data.view(np.uint32)[idx] = 0
        start = time.perf_counter()
        cpu0 = cpu_s()
        sock: Conn = _connect("unix" if kind == "unix" else "tcp", address)
        # The handshake happens here.
        if kind == "tls":
            sock = ticket.wrap_socket(sock, server_hostname=server_name)
        elif kind == "tls_bio":
            sock = BioTls(sock, ticket, server_side=False, server_hostname=server_name)
        connect_s = time.perf_counter() - start
        with sock:
            if direction == "down":
                _recv_exact(sock, data.data.cast("B"))
                elapsed = time.perf_counter() - start
                cpu = cpu_s() - cpu0
                sock.sendall(ACK)
                if not np.array_equal(data.view(np.uint32)[idx], _expected(idx)):
                    raise AssertionError("trainer: the download's bytes are wrong")
            else:
                _send_all(sock, data.data.cast("B"))
                _recv_ack(sock)
                elapsed = time.perf_counter() - start
                cpu = cpu_s() - cpu0
            conn.send({"seconds": elapsed, "connect_s": connect_s, "cpu_s": cpu, "tls": _tls_info(sock)})


# --- the paths -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Route:
    """One measured path: what each role is told. ``sidecar`` None: the trainer talks to the server itself."""

    name: str
    direction: str  # "down": server -> trainer; "up": trainer -> server
    server: str  # listener: plain | mtls | ticket
    trainer: str  # what the trainer dials: server (plain, direct) | tls | tls_bio (direct) | tcp | unix (the sidecar)
    sidecar: str | None = None  # upstream mode: plain | tls | tls_fill | tls_bio
    bio: bool = False  # the server's TLS end through memory BIOs (BioTls)


def _paths() -> list[Route]:
    down = [
        Route("plain_handoff", "down", "plain", "server"),
        Route("plain_relay_splice_tcp", "down", "plain", "tcp", "plain"),
        Route("plain_relay_splice_unix", "down", "plain", "unix", "plain"),
        Route("tls_relay_tcp", "down", "mtls", "tcp", "tls"),
        Route("tls_relay_unix", "down", "mtls", "unix", "tls"),
        Route("tls_relay_fill_tcp", "down", "mtls", "tcp", "tls_fill"),
        Route("tls_relay_fill_unix", "down", "mtls", "unix", "tls_fill"),
        Route("tls_direct", "down", "ticket", "tls"),
        # Every TLS end through memory BIOs: how much of TLS's cost is the per-record syscalls.
        Route("tls_relay_bio_unix", "down", "mtls", "unix", "tls_bio", bio=True),
        Route("tls_direct_bio", "down", "ticket", "tls_bio", bio=True),
    ]
    return down + [Route(f"up_{p.name}", "up", p.server, p.trainer, p.sidecar, p.bio) for p in down]


@dataclass
class Roles:
    server: Connection
    sidecar: Connection
    trainer: Connection
    server_ports: dict[str, int]
    sidecar_addresses: dict[str, Any]


def _recv(conn: Connection, what: str) -> Any:
    if not conn.poll(WAIT_S):
        raise TimeoutError(f"{what} did not answer within {WAIT_S:.0f} s")
    return conn.recv()


def run_path(roles: Roles, path: Route) -> dict[str, Any]:
    """Moves S bytes along ``path`` once; the receiver's seconds and every role's CPU seconds."""
    roles.server.send((path.server, path.direction, path.bio))
    if path.sidecar is not None:
        roles.sidecar.send((path.trainer, path.sidecar, path.direction))
        target = (path.trainer, roles.sidecar_addresses[path.trainer])
    else:
        target = (path.trainer, roles.server_ports["plain" if path.trainer == "server" else "ticket"])
    roles.trainer.send((target, path.direction))
    trainer = _recv(roles.trainer, f"trainer on {path.name}")
    server = _recv(roles.server, f"server on {path.name}")
    out = {"seconds": trainer["seconds"], "connect_s": trainer["connect_s"]}
    out["cpu"] = {"server": server["cpu_s"], "trainer": trainer["cpu_s"]}
    out["tls"] = {"server": server["tls"], "trainer": trainer["tls"]}
    if path.sidecar is not None:
        sidecar = _recv(roles.sidecar, f"sidecar on {path.name}")
        out["cpu"]["sidecar"] = sidecar["cpu_s"]
        out["tls"]["sidecar_upstream"] = sidecar["tls"]
    return out


def _write_material(directory: Path) -> None:
    import datetime as dt

    from fedkube.security import material, pki

    now = dt.datetime.now(dt.timezone.utc)
    tls = material.JobTls.generate(NAMESPACE, JOB, [SITE], pki.Validity(now - pki.CLOCK_SKEW, now + dt.timedelta(1)))
    pki.write_bundle(directory / "server", "tls", tls.ca.cert, tls.server)
    pki.write_bundle(directory / SITE, "tls", tls.ca.cert, tls.sites[SITE])


def cpu_flags() -> dict[str, bool]:
    """The CPU features AES-GCM speed depends on (AES-NI, carry-less multiply, their vector forms)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        flags = []
    return {flag: flag in flags for flag in ("aes", "pclmulqdq", "avx2", "vaes", "vpclmulqdq")}


def cipher_only(size: int, bits: int = 256, record: int = 16 << 10) -> dict[str, float]:
    """CPU seconds per GiB of AES-GCM alone (`cryptography`'s OpenSSL, this process, one thread), sealing
    and opening ``size`` bytes in TLS-record-sized pieces: the floor under any TLS path's crypto."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    aead = AESGCM(AESGCM.generate_key(bit_length=bits))
    nonce = os.urandom(12)  # one nonce for every piece: a benchmark, nothing is kept
    plain = _pattern(min(size, 64 << 20)).tobytes()
    pieces = [plain[i : i + record] for i in range(0, len(plain), record)]
    rounds = max(1, size // len(plain))
    sealed = [aead.encrypt(nonce, p, None) for p in pieces]
    cpu0 = cpu_s()
    for _ in range(rounds):
        for p in pieces:
            aead.encrypt(nonce, p, None)
    cpu1 = cpu_s()
    for _ in range(rounds):
        for c in sealed:
            aead.decrypt(nonce, c, None)
    cpu2 = cpu_s()
    gib = rounds * len(plain) / (1 << 30)
    return {"encrypt": round((cpu1 - cpu0) / gib, 3), "decrypt": round((cpu2 - cpu1) / gib, 3)}


def _derived(cpu: dict[str, dict[str, float]]) -> dict[str, float]:
    """Differences of total CPU/GiB between paths: what the relay hop costs vs what the crypto costs."""

    def total(name: str) -> float | None:
        return sum(cpu[name].values()) if name in cpu else None

    def role(name: str, who: str) -> float | None:
        return cpu.get(name, {}).get(who)

    pairs = {
        # Option (a) over option (b): the sidecar's decrypt-and-resend hop, the trainer's local read included.
        "relay_hop_tls_unix": (total("tls_relay_unix"), total("tls_direct")),
        "relay_hop_tls_tcp": (total("tls_relay_tcp"), total("tls_direct")),
        "relay_hop_tls_fill_unix": (total("tls_relay_fill_unix"), total("tls_direct")),
        "relay_hop_splice_unix": (total("plain_relay_splice_unix"), total("plain_handoff")),
        # The crypto alone, on a one-hop path: what each end pays for TLS.
        "decrypt_trainer": (role("tls_direct", "trainer"), role("plain_handoff", "trainer")),
        "encrypt_server": (role("tls_direct", "server"), role("plain_handoff", "server")),
        "tls_direct_over_plain_handoff": (total("tls_direct"), total("plain_handoff")),
        "tls_relay_unix_over_plain_relay_unix": (total("tls_relay_unix"), total("plain_relay_splice_unix")),
        # What memory BIOs (one socket call per MiB instead of per 16 KiB record) save.
        "bio_saves_direct": (total("tls_direct"), total("tls_direct_bio")),
        "bio_saves_relay_unix": (total("tls_relay_fill_unix"), total("tls_relay_bio_unix")),
        "relay_hop_tls_bio_unix": (total("tls_relay_bio_unix"), total("tls_direct_bio")),
        "up_bio_saves_direct": (total("up_tls_direct"), total("up_tls_direct_bio")),
        "up_relay_hop_tls_unix": (total("up_tls_relay_unix"), total("up_tls_direct")),
        "up_relay_hop_tls_fill_unix": (total("up_tls_relay_fill_unix"), total("up_tls_direct")),
        "up_encrypt_trainer": (role("up_tls_direct", "trainer"), role("up_plain_handoff", "trainer")),
        "up_decrypt_server": (role("up_tls_direct", "server"), role("up_plain_handoff", "server")),
    }
    return {k: round(a - b, 3) for k, (a, b) in pairs.items() if a is not None and b is not None}


def _openssl_conf(directory: Path, ciphersuites: str) -> None:
    """Make every process started from now on offer only ``ciphersuites`` in TLS 1.3.

    Python's ssl module cannot set TLS 1.3 suites (``set_ciphers`` is for TLS <= 1.2), but OpenSSL applies its
    config file's ``system_default`` section to every context it makes; the spawned roles read it at start-up.
    """
    conf = directory / "openssl.cnf"
    conf.write_text(
        "openssl_conf = default_conf\n[default_conf]\nssl_conf = ssl_sect\n[ssl_sect]\n"
        f"system_default = system_default_sect\n[system_default_sect]\nCiphersuites = {ciphersuites}\n"
    )
    os.environ["OPENSSL_CONF"] = str(conf)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=256, help="bytes moved per transfer, in MiB")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of floor + every path; best time is kept")
    parser.add_argument(
        "--path", action="append", default=[], help="measure only these paths (repeatable; default: all)"
    )
    parser.add_argument(
        "--ciphersuites",
        default=None,
        metavar="SUITES",
        help="TLS 1.3 suites to offer, e.g. TLS_AES_128_GCM_SHA256 (default: OpenSSL's, which picks AES-256-GCM)",
    )
    args = parser.parse_args()
    paths = [p for p in _paths() if not args.path or p.name in args.path]
    if args.path and len(paths) != len(set(args.path)):
        known = ", ".join(p.name for p in _paths())
        parser.error(f"unknown path in {args.path}; known: {known}")
    size = args.size_mib << 20
    gib = size / (1 << 30)
    ctx = mp.get_context("spawn")
    result: dict[str, Any] = {
        "size_mib": args.size_mib,
        "repeats": args.repeats,
        "cpus": os.cpu_count(),
        "cpu_flags": cpu_flags(),
        "openssl": ssl.OPENSSL_VERSION,
        "ciphersuites": args.ciphersuites or "openssl default",
        "loadavg_before": [round(x, 2) for x in os.getloadavg()],
    }
    with tempfile.TemporaryDirectory(prefix="fedkube-tls-bench-") as tmp:
        _write_material(Path(tmp))
        if args.ciphersuites:
            _openssl_conf(Path(tmp), args.ciphersuites)
        procs = []

        def start(target: Any, *fargs: Any) -> Connection:
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=target, args=(child, *fargs), daemon=True)
            proc.start()
            procs.append(proc)
            return parent

        server = start(server_main, size, tmp)
        ports = _recv(server, "server")
        sidecar = start(sidecar_main, size, tmp, ports)
        trainer = start(trainer_main, size, tmp)
        roles = Roles(server, sidecar, trainer, ports, _recv(sidecar, "sidecar"))
        _recv(trainer, "trainer")
        seconds: dict[str, list[float]] = {p.name: [] for p in paths}
        connects: dict[str, list[float]] = {p.name: [] for p in paths}
        cpu: dict[str, dict[str, list[float]]] = {p.name: {} for p in paths}
        tls: dict[str, dict[str, str]] = {}
        floors: list[float] = []
        floor_cpu: dict[str, list[float]] = {"receiver": [], "sender": []}
        # The machine is shared: interleave the floor with the paths, and keep the best of each.
        for _ in range(args.repeats):
            floor_s, receiver_cpu, sender_cpu = tcp_floor_detail(size)
            floors.append(floor_s)
            floor_cpu["receiver"].append(receiver_cpu / gib)
            floor_cpu["sender"].append(sender_cpu / gib)
            for path in paths:
                run = run_path(roles, path)
                seconds[path.name].append(run["seconds"])
                connects[path.name].append(run["connect_s"])
                for who, c in run["cpu"].items():
                    cpu[path.name].setdefault(who, []).append(c / gib)
                tls[path.name] = run["tls"]
        for conn in (server, sidecar, trainer):
            conn.send("stop")
        for proc in procs:
            proc.join(60)
    floor = min(floors)
    result["floor_s"] = round(floor, 3)
    result["floor_mib_s"] = round(size / floor / (1 << 20))
    result["floor_runs_s"] = [round(x, 3) for x in floors]
    result["floor_cpu_s_per_gib"] = {k: round(statistics.median(v), 3) for k, v in floor_cpu.items()}
    medians: dict[str, dict[str, float]] = {}
    table: dict[str, Any] = {}
    for path in paths:
        best = min(seconds[path.name])
        # Median over runs: CPU per GiB is what load distorts least (bench/README.md).
        medians[path.name] = {who: statistics.median(v) for who, v in cpu[path.name].items()}
        table[path.name] = {
            "s": round(best, 3),
            "mib_s": round(size / best / (1 << 20)),
            "over_floor": round(best / floor, 2),
            "runs_s": [round(x, 3) for x in seconds[path.name]],
            # The trainer's connect (+ TLS handshake on tls_direct; a relay's upstream dial is in the transfer).
            "connect_ms_median": round(1000 * statistics.median(connects[path.name]), 2),
            "cpu_s_per_gib": {who: round(v, 3) for who, v in medians[path.name].items()},
            "cpu_s_per_gib_total": round(sum(medians[path.name].values()), 3),
            "tls": tls[path.name],
        }
    result["paths"] = table
    result["derived_cpu_s_per_gib"] = _derived(medians)
    bits = 128 if "AES_128" in (args.ciphersuites or "") else 256
    result[f"aes_{bits}_gcm_only_cpu_s_per_gib"] = cipher_only(size, bits)
    result["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    result["moved_mib"] = mib(size)
    emit(result)


if __name__ == "__main__":
    main()
