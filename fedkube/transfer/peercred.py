"""Pod-local endpoints serve only processes of their own user (SO_PEERCRED, and its TCP stand-in).

The sidecar's bulk handoff (an abstract Unix socket) answers whoever connects
with a server connection that already carries the site's token; the trainer's
handoff taker writes the site's update into whatever socket it is handed. An
abstract socket has no file, so no file mode keeps anyone out: in a pod only
the pod's containers share its namespace, but under ``fedkube run`` every
local user does. So every listener that is meant for the processes beside it
(an abstract name, or a loopback address) admits a connection only when the
peer runs as the same user as the listener:

* a Unix socket says who connected (``SO_PEERCRED``: the peer's pid, uid and
  gid when it called ``connect``);
* TCP has no such option, but on loopback both ends of a connection are
  sockets of this host, and the kernel tells the owner of the peer's: one
  ``sock_diag`` netlink query for the exact 4-tuple (0.07-0.25 ms on this
  2-core box), or, where netlink is not allowed, a scan of ``/proc/net/tcp{,6}``
  (13 ms with 260 sockets open, 90 ms with 6,000: the fallback only). A host with neither
  (not Linux) cannot check: its loopback listeners stay open to every local
  user, as before.
  gRPC servers on loopback (the sidecar's trainer port, the trainer's Download
  service) get the same check per call from :class:`SameUserInterceptor`,
  since gRPC accepts their connections itself.

In a pod every container runs as the pod's user (``runAsUser``, set by the
operator's builders), so the sidecar and the trainer pass and nothing else in
the pod's network namespace does unless it runs as that user too. Root is not
let in on its own account: a process of another user is refused whoever it is,
and root can already read the sidecar's files and memory by other means.

A refusal is logged (naming the endpoint, the peer's uid and pid) and counted:
``refusals()`` for this process, and every callback given to ``observe()`` (the
sidecar's ``fedkube_sidecar_rejected_local_connections_total``).
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket
import struct
import sys
import threading
import urllib.parse
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

log = logging.getLogger(__name__)

#: The refusal's ``reason`` label: the peer runs as another user than this process.
PEER_UID_MISMATCH = "PeerUidMismatch"

_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
_NOT_A_CONNECTION = frozenset({"06", "0A"})  # TIME_WAIT (owned by no one: uid 0), LISTEN
_PROC_NET = Path("/proc/net")

_lock = threading.Lock()
_refused: Counter[str] = Counter()
_observers: list[Callable[[str], None]] = []


@dataclass(frozen=True)
class Peer:
    """Who is at the other end of a local connection; ``pid`` is -1 where the kernel does not say (TCP)."""

    uid: int
    pid: int = -1


def own_user_only(host: str) -> bool:
    """Whether a listener on ``host`` is pod-local: an abstract Unix name (``@...``) or a loopback address."""
    if host.startswith("@"):
        return True
    name = host.strip("[]")
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def peer_of(conn: socket.socket) -> Peer | None:
    """The user (and pid) of the process that connected ``conn``; None when it cannot be told.

    None for a TCP peer that is not on loopback, on a host without ``/proc``, and
    for a TCP peer whose socket is already gone (then the connection is too).
    """
    if conn.family == socket.AF_UNIX:
        pid, uid, _gid = _UCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
        return Peer(uid=uid, pid=pid)
    if conn.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    try:
        peer_addr, ours = conn.getpeername(), conn.getsockname()
    except OSError:
        return None
    ip = ipaddress.ip_address(peer_addr[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if not ip.is_loopback:
        return None
    uid = _tcp_owner(str(ip), int(peer_addr[1]), int(ours[1]), str(ours[0]))
    return None if uid is None else Peer(uid=uid)


def admit(conn: socket.socket, endpoint: str) -> bool:
    """True when ``conn``'s peer may use ``endpoint`` (a pod-local listener); otherwise log, count, and False.

    A peer that cannot be told is refused too, except where nothing can be told
    at all (no ``/proc`` on this host: not Linux).
    """
    return _judge(peer_of(conn), conn.family == socket.AF_UNIX or _proc_tcp_readable(), endpoint)


def admit_grpc(context: grpc.ServicerContext, port: int, endpoint: str) -> bool:
    """:func:`admit` for a call on a gRPC server listening on loopback ``port``.

    The peer is ``ipv4:127.0.0.1:<port>`` or ``ipv6:[::1]:<port>`` (brackets
    percent-encoded by newer gRPC). Anything else cannot reach a loopback
    listener, so a peer that does not read as one is refused, not waved through.
    """
    host, _, peer_port = urllib.parse.unquote(context.peer()).partition(":")[2].rpartition(":")
    uid: int | None = None
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if ip.is_loopback and peer_port.isdigit():
            uid = _tcp_owner(str(ip), int(peer_port), port)
    except ValueError:
        pass
    return _judge(None if uid is None else Peer(uid=uid), _proc_tcp_readable(), endpoint)


class SameUserInterceptor(grpc.ServerInterceptor):
    """Refuses every call from a process of another user on a gRPC server that listens on loopback.

    ``port()`` is the server's bound port (known only after ``add_insecure_port``).
    The call ends with PERMISSION_DENIED before its handler runs.
    """

    def __init__(self, endpoint: str, port: Callable[[], int]) -> None:
        self.endpoint = endpoint
        self.port = port

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        return _guarded(handler, self._check)

    def _check(self, context: grpc.ServicerContext) -> None:
        if not admit_grpc(context, self.port(), self.endpoint):
            context.abort(grpc.StatusCode.PERMISSION_DENIED,
                          f"{self.endpoint} serves only processes of this pod's user ({PEER_UID_MISMATCH})")


def _guarded(handler: grpc.RpcMethodHandler, check: Callable[[grpc.ServicerContext], None]) -> grpc.RpcMethodHandler:
    def wrap(behavior: Callable[[Any, grpc.ServicerContext], Any]) -> Callable[[Any, grpc.ServicerContext], Any]:
        def guarded(request: Any, context: grpc.ServicerContext) -> Any:
            check(context)
            return behavior(request, context)

        return guarded

    kinds = {
        (False, False): ("unary_unary", grpc.unary_unary_rpc_method_handler),
        (False, True): ("unary_stream", grpc.unary_stream_rpc_method_handler),
        (True, False): ("stream_unary", grpc.stream_unary_rpc_method_handler),
        (True, True): ("stream_stream", grpc.stream_stream_rpc_method_handler),
    }
    attr, make = kinds[(handler.request_streaming, handler.response_streaming)]
    return make(
        wrap(getattr(handler, attr)),
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def _judge(peer: Peer | None, can_tell: bool, endpoint: str) -> bool:
    own = os.geteuid()
    if peer is not None and peer.uid == own:
        return True
    if peer is None and not can_tell:
        return True
    who = "a peer whose user cannot be told" if peer is None else (
        f"uid {peer.uid}" + (f" (pid {peer.pid})" if peer.pid > 0 else ""))
    log.warning(
        "%s: refused a connection from %s: only processes of uid %d (this process's user) may use this pod-local "
        "endpoint (reason %s); fix: run the trainer as the same user as the sidecar (in a pod: the pod's "
        "securityContext.runAsUser)", endpoint, who, own, PEER_UID_MISMATCH,
    )  # fmt: skip
    with _lock:
        _refused[PEER_UID_MISMATCH] += 1
        observers = list(_observers)
    for observer in observers:
        observer(PEER_UID_MISMATCH)
    return False


def observe(callback: Callable[[str], None]) -> None:
    """Call ``callback(reason)`` for every connection refused in this process from now on (a metric)."""
    with _lock:
        _observers.append(callback)


def unobserve(callback: Callable[[str], None]) -> None:
    """Stop calling ``callback`` (a stopped sidecar of a test process must not keep counting)."""
    with _lock:
        if callback in _observers:
            _observers.remove(callback)


def refusals() -> dict[str, int]:
    """Connections refused in this process so far, by reason."""
    with _lock:
        return dict(_refused)


def _proc_tcp_readable() -> bool:
    return (_PROC_NET / "tcp").exists()


def _hex(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> str:
    """``ip:port`` as ``/proc/net/tcp{,6}`` prints it: each 32-bit word of the address in host byte order."""
    packed = ip.packed
    words = "".join(f"{int.from_bytes(packed[i : i + 4], sys.byteorder):08X}" for i in range(0, len(packed), 4))
    return f"{words}:{port:04X}"


def _tcp_owner(peer_host: str, peer_port: int, our_port: int, our_host: str = "") -> int | None:
    """The uid owning the socket at ``peer_host:peer_port`` connected to our ``our_port`` on loopback.

    ``our_host`` defaults to the loopback address of the peer's family.
    """
    ip = ipaddress.ip_address(peer_host)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    ours = ipaddress.ip_address(our_host) if our_host else ipaddress.ip_address(
        "127.0.0.1" if isinstance(ip, ipaddress.IPv4Address) else "::1")
    if isinstance(ours, ipaddress.IPv6Address) and ours.ipv4_mapped is not None:
        ours = ours.ipv4_mapped
    try:
        return _diag_owner(ip, peer_port, ours, our_port)
    except _NotFound:
        pass  # e.g. our end is another loopback address than assumed: the scan matches any
    except OSError as exc:  # netlink refused (a seccomp profile, an old kernel): the slow way
        log.debug("sock_diag lookup failed (%s); scanning /proc/net/tcp", exc)
    return _scan_owner(ip, peer_port, our_port)


class _NotFound(Exception):
    """sock_diag knows no socket with that 4-tuple."""


_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST = 1
_NLMSG_ERROR = 2
_NLMSG = struct.Struct("=LHHLL")  # nlmsghdr: len, type, flags, seq, pid
_DIAG_REQ = struct.Struct("=BBBBI")  # inet_diag_req_v2 up to its sockid: family, protocol, ext, pad, states
_TCP_TIME_WAIT = 6
_UID_AT = _NLMSG.size + 4 + 48 + 12  # inet_diag_msg: 4 bytes, sockid (48), expires, rqueue, wqueue, then uid


def _diag_owner(
    peer: ipaddress.IPv4Address | ipaddress.IPv6Address, peer_port: int,
    ours: ipaddress.IPv4Address | ipaddress.IPv6Address, our_port: int,
) -> int:  # fmt: skip
    """The uid of the socket whose local end is ``peer:peer_port`` and remote end ``ours:our_port`` (sock_diag).

    An IPv4 query also finds an IPv6 socket speaking IPv4 (gRPC's): both are in the same hash.
    """
    family = socket.AF_INET if isinstance(peer, ipaddress.IPv4Address) else socket.AF_INET6
    sockid = (struct.pack("!HH", peer_port, our_port) + peer.packed.ljust(16, b"\0") + ours.packed.ljust(16, b"\0")
              + struct.pack("=III", 0, 0xFFFFFFFF, 0xFFFFFFFF))  # any interface, no cookie
    request = _DIAG_REQ.pack(family, socket.IPPROTO_TCP, 0, 0, 0xFFFFFFFF) + sockid
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_SOCK_DIAG) as nl:
        nl.settimeout(1.0)
        nl.sendto(_NLMSG.pack(_NLMSG.size + len(request), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST, 1, 0) + request, (0, 0))
        reply = nl.recv(8192)
    _length, kind, _flags, _seq, _pid = _NLMSG.unpack_from(reply)
    if kind == _NLMSG_ERROR:
        (error,) = struct.unpack_from("=i", reply, _NLMSG.size)
        if -error == errno.ENOENT:
            raise _NotFound
        raise OSError(-error, os.strerror(-error))
    if kind != _SOCK_DIAG_BY_FAMILY or len(reply) < _UID_AT + 4:
        raise OSError(errno.EPROTO, f"unexpected sock_diag answer (type {kind}, {len(reply)} bytes)")
    if reply[_NLMSG.size + 1] == _TCP_TIME_WAIT:  # a closed connection's leftover, owned by no one (uid 0)
        raise _NotFound
    (uid,) = struct.unpack_from("=I", reply, _UID_AT)
    return int(uid)


def _scan_owner(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, peer_port: int, our_port: int) -> int | None:
    """:func:`_tcp_owner` by reading ``/proc/net/tcp{,6}``; our end is matched by port (any loopback address).

    Either end may be an IPv6 socket speaking IPv4 (gRPC's are: ``::ffff:127.0.0.1``), so an IPv4
    connection is looked for in both tables.
    """
    spellings: list[tuple[str, str]] = []  # (table, the peer's address as the table prints it)
    if isinstance(ip, ipaddress.IPv4Address):
        spellings = [("tcp", _hex(ip, peer_port)), ("tcp6", _hex(ipaddress.IPv6Address(f"::ffff:{ip}"), peer_port))]
    else:
        spellings = [("tcp6", _hex(ip, peer_port))]
    port_suffix = f":{our_port:04X}"
    for table, local in spellings:
        try:
            with (_PROC_NET / table).open() as f:
                next(f, None)  # the header
                for line in f:
                    fields = line.split()
                    # sl local rem st tx:rx tr:when retrnsmt uid timeout inode ...
                    if (len(fields) > 7 and fields[1] == local and fields[2].endswith(port_suffix)
                            and _is_loopback_hex(fields[2]) and fields[3] not in _NOT_A_CONNECTION):
                        return int(fields[7])
        except OSError:
            continue
    return None


def _is_loopback_hex(address: str) -> bool:
    words = address.partition(":")[0]
    packed = b"".join(int(words[i : i + 8], 16).to_bytes(4, sys.byteorder) for i in range(0, len(words), 8))
    ip = ipaddress.ip_address(packed)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


__all__ = [
    "PEER_UID_MISMATCH", "Peer", "SameUserInterceptor", "admit", "admit_grpc", "observe", "own_user_only", "peer_of",
    "refusals", "unobserve",
]
