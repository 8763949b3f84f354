"""Building blocks of fedkube's metrics: bounded labels, per-registry process collectors, the /metrics server.

Every fedkube process puts its metrics on its own ``CollectorRegistry`` (never
the library's global default), so importing a module has no side effects and
tests can build fresh registries at will.

Label names come from one allow-list, :data:`ALLOWED_LABELS`. The FL job's
name is exported as ``fljob``, not ``job``: Prometheus attaches its own ``job``
label (the scrape job) to every series, and by default renames a clashing
exported ``job`` to ``exported_job``, which would silently break every query
that filters on it. For the same reason the operator's FLJob counts name the
FLJob's namespace ``fljob_namespace``, not ``namespace`` (fedkube.metrics.operator).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping

from prometheus_client import CollectorRegistry, Gauge, MetricsHandler, PlatformCollector, ProcessCollector
from prometheus_client.registry import DuplicateTimeseries

from fedkube import envvars
from fedkube.errors import ConfigError
from fedkube.httpserve import DEADLINE_S, MAX_CONNECTIONS, BoundedHTTPServer, Refusals
from fedkube.protocol import METRICS_CONNECTION_LIMIT, METRICS_DEADLINE

log = logging.getLogger(__name__)

#: Every label name any fedkube metric may carry. Never add per-round,
#: per-tensor or per-transfer labels: each distinct value is a new time series
#: kept by Prometheus for weeks.
ALLOWED_LABELS = frozenset({"fljob", "site", "reason", "direction", "state", "phase", "component", "name", "plane",
                            "handler", "fljob_namespace"})

#: The label value under which values past a cap are counted.
OVERFLOW = "_other"

COMPONENTS = ("server", "sidecar", "operator")

_collectors_added: weakref.WeakSet[CollectorRegistry] = weakref.WeakSet()
_info_gauges: weakref.WeakKeyDictionary[CollectorRegistry, Gauge] = weakref.WeakKeyDictionary()
_collectors_lock = threading.Lock()


def check_labels(names: Iterable[str]) -> tuple[str, ...]:
    """Return ``names`` as a tuple, or raise ValueError naming a label outside :data:`ALLOWED_LABELS`."""
    out = tuple(names)
    bad = [n for n in out if n not in ALLOWED_LABELS]
    if bad:
        raise ValueError(f"metric label(s) {bad} are not allowed; use only {sorted(ALLOWED_LABELS)} "
                         "(unbounded labels such as round or tensor name would explode the series count)")
    return out


def one_of(value: str, allowed: Iterable[str], what: str) -> str:
    """``value`` if it is in ``allowed``, else ValueError naming the choices (for enumerated labels)."""
    choices = tuple(allowed)
    if value not in choices:
        raise ValueError(f"{what} must be one of {list(choices)}, got {value!r}")
    return value


class CappedValues:
    """Admits at most ``cap`` distinct values for one label; later new values map to :data:`OVERFLOW`.

    ``known`` values (e.g. the documented failure reasons) are always admitted
    and do not count against the cap. Admission is first come, first served
    and permanent for the life of the process, so a series never changes
    meaning. The first overflowing value is logged once, naming the cap.
    """

    def __init__(self, what: str, cap: int, known: Iterable[str] = ()) -> None:
        if cap < 1:
            raise ValueError(f"{what}: cap must be >= 1, got {cap}")
        self.what = what
        self.cap = cap
        self._known = frozenset(known)
        self._admitted: set[str] = set()
        self._warned = False
        self._lock = threading.Lock()

    def admit(self, value: str) -> str:
        """The label value to use for ``value``: itself, or :data:`OVERFLOW` once the cap is reached."""
        if value in self._known:
            return value
        warn = False
        with self._lock:
            if value in self._admitted:
                return value
            if len(self._admitted) < self.cap:
                self._admitted.add(value)
                return value
            if not self._warned:
                self._warned = warn = True
        if warn:
            log.warning("metrics: more than %s distinct %s values; %r and later new ones are counted as %r",
                        self.cap, self.what, value, OVERFLOW)
        return OVERFLOW

    @property
    def admitted(self) -> frozenset[str]:
        """The values admitted past ``known`` so far."""
        with self._lock:
            return frozenset(self._admitted)


class StateSet:
    """One gauge series per state, 1 for the current state and 0 for the others.

    prometheus-client's ``Enum`` would name the label after the metric itself;
    this keeps the label ``state`` so one allow-list covers every metric and
    a dashboard can select ``fedkube_..._state{state="..."} == 1``.
    """

    def __init__(self, gauge: Gauge, what: str, states: Iterable[str], labels: Mapping[str, str]) -> None:
        self._gauge = gauge
        self._what = what
        self.states = tuple(states)
        self._labels = dict(labels)
        self._lock = threading.Lock()
        self.current: str | None = None
        for s in self.states:
            gauge.labels(**self._labels, state=s).set(0)

    def set(self, state: str) -> None:
        """Make ``state`` the current one."""
        one_of(state, self.states, f"{self._what} state")
        with self._lock:
            self.current = state
            for s in self.states:
                self._gauge.labels(**self._labels, state=s).set(1 if s == state else 0)


def new_registry() -> CollectorRegistry:
    """A fresh registry with the process (RSS, CPU, open fds) and platform (Python version) collectors on it."""
    registry = CollectorRegistry(auto_describe=True)
    add_process_collectors(registry)
    return registry


def add_process_collectors(registry: CollectorRegistry) -> None:
    """Put the library's process and platform collectors on ``registry`` once (later calls do nothing).

    Two metric facades sharing one registry (``fedkube run`` tests, or a
    process that is both) must not register the same series twice, which the
    library rejects.
    """
    with _collectors_lock:
        if registry in _collectors_added:
            return
        _collectors_added.add(registry)
    for make in (ProcessCollector, PlatformCollector):
        # A registry that already has them (the library's default one has both) keeps its own.
        with contextlib.suppress(DuplicateTimeseries):
            make(registry=registry)


def component_info(registry: CollectorRegistry, component: str, job: str, site: str | None = None) -> None:
    """Export ``fedkube_component_info{component, fljob, site} 1``.

    The process collector's ``process_resident_memory_bytes`` carries no
    labels of ours; dashboards join it to this series ``on (job, instance)`` to show
    memory per component, job and site.
    """
    one_of(component, COMPONENTS, "component")
    with _collectors_lock:
        g = _info_gauges.get(registry)
        if g is None:
            g = _info_gauges[registry] = Gauge(
                "fedkube_component_info", "Always 1; labels say which fedkube component and job this process is.",
                check_labels(["component", "fljob", "site"]), registry=registry)
    g.labels(component=component, fljob=job, site=site or "").set(1)


class MetricsServer:
    """A running /metrics HTTP endpoint; ``close()`` (or leaving the ``with`` block) stops it and frees the port."""

    def __init__(self, httpd: BoundedHTTPServer, thread: threading.Thread) -> None:
        self._httpd = httpd
        self._thread = thread
        self._closed = False
        self._lock = threading.Lock()

    @property
    def port(self) -> int:
        """The port actually bound (useful after asking for port 0)."""
        return int(self._httpd.server_port)

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop serving and release the socket; safe to call more than once."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout_s)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def serve_metrics(
    registry: CollectorRegistry, port: int, addr: str = "0.0.0.0", *, on_refused: Callable[[str], None] | None = None,
    max_connections: int = MAX_CONNECTIONS, deadline_s: float = DEADLINE_S,
) -> tuple[MetricsServer, int]:  # fmt: skip
    """Serve ``registry`` as Prometheus text on ``http://addr:port/metrics`` from a daemon thread.

    ``port`` 0 lets the OS choose; the bound port is returned with the server.
    Raises ConfigError when the port cannot be bound, naming the port and the
    environment variable that sets it. At most ``max_connections`` scrapes are
    served at once, each closed ``deadline_s`` after its accept (prometheus_client's
    own server has neither); ``on_refused(reason)`` is told each one closed
    ("MetricsConnectionLimit", "MetricsDeadline").
    """
    if not 0 <= port <= 65535:
        raise ConfigError(f"metrics port must be 0..65535, got {port}; fix {envvars.METRICS_PORT}")
    try:
        httpd = BoundedHTTPServer(
            (addr, port), MetricsHandler.factory(registry), name="metrics endpoint", max_connections=max_connections,
            deadline_s=deadline_s, refusals=Refusals(METRICS_CONNECTION_LIMIT, METRICS_DEADLINE),
            on_refused=on_refused,
        )  # fmt: skip
    except OSError as exc:
        raise ConfigError(f"cannot serve /metrics on {addr}:{port}: {exc}; choose a free port with "
                          f"{envvars.METRICS_PORT} (0 picks one)") from exc
    thread = threading.Thread(target=httpd.serve_forever, name="fedkube-metrics-http", daemon=True)
    thread.start()
    server = MetricsServer(httpd, thread)
    log.info("metrics: serving /metrics on %s:%s", addr, server.port)
    return server, server.port


def metrics_port_from_env(env: Mapping[str, str]) -> int:
    """The port from ``FEDKUBE_METRICS_PORT``; 0 (off) when unset or empty."""
    raw = env.get(envvars.METRICS_PORT, "").strip()
    return envvars.parse_port(raw, envvars.METRICS_PORT) if raw else 0
