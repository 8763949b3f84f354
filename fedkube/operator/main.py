"""``fedkube operator``: run the FLJob operator (kopf) in a cluster or against a kubeconfig.

Configuration comes from flags, defaulting to the environment the Helm chart
sets (charts/fedkube/templates/deployment.yaml): FEDKUBE_WATCH_NAMESPACES
(comma-separated; empty = every namespace), FEDKUBE_HEALTH_PORT (kopf's
liveness endpoint, GET /healthz, which the chart probes), FEDKUBE_METRICS_PORT,
FEDKUBE_LOG_FORMAT, FEDKUBE_ADMIN_POLICY (fedkube.operator.policy),
FEDKUBE_NETWORK_POLICY (fedkube.operator.netpol), FEDKUBE_JOB_DEFAULTS
(fedkube.operator.podspec) and, for more than one replica, FEDKUBE_PEERING /
FEDKUBE_PEERING_LIFETIME (kopf peering: the replica of highest priority
reconciles, the others wait and take over when its keep-alive record expires).
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fedkube import envvars
from fedkube.errors import ConfigError
from fedkube.logs import configure_logging
from fedkube.operator.netpol import NetworkPolicyConfig, network_config_from_env
from fedkube.operator.podspec import PodDefaults, defaults_from_env
from fedkube.operator.policy import AdminPolicy, policy_from_env

if TYPE_CHECKING:
    import kopf

logger = logging.getLogger(__name__)

# Set by the chart's Deployment; named here because only the operator reads them.
WATCH_NAMESPACES = envvars.WATCH_NAMESPACES
HEALTH_PORT = envvars.HEALTH_PORT
DEFAULT_HEALTH_PORT = envvars.DEFAULT_HEALTH_PORT
HEALTH_PATH = "/healthz"
# kopf peering (chart: peering.enabled or replicas > 1): the KopfPeering (namespaced operator, one per watched
# namespace) or ClusterKopfPeering (cluster-wide) object's name; empty runs standalone.
PEERING = "FEDKUBE_PEERING"
PEERING_LIFETIME = "FEDKUBE_PEERING_LIFETIME"  # seconds a replica's keep-alive counts; the takeover delay
PEERING_PRIORITY = "FEDKUBE_PEERING_PRIORITY"  # fixed priority (tests); default random per process
DEFAULT_PEERING_LIFETIME = 60
MODE = "FEDKUBE_OPERATOR_MODE"  # server or site (the chart's mode:)
PRIORITY_RANGE = 2**31 - 1


@dataclass(frozen=True)
class OperatorConfig:
    """How the operator process runs."""

    namespaces: tuple[str, ...]
    """Namespaces to reconcile; empty means the whole cluster."""
    health_port: int
    metrics_port: int
    interval: float
    log_format: str
    policy: AdminPolicy = field(default_factory=AdminPolicy)
    """The admin policy every FLJob must keep (FEDKUBE_ADMIN_POLICY, from the chart's policy: values)."""
    network: NetworkPolicyConfig | None = None
    """NetworkPolicies per FLJob (FEDKUBE_NETWORK_POLICY), None for none."""
    peering: str = ""
    """kopf peering object's name (FEDKUBE_PEERING); empty: standalone, only one replica may run."""
    peering_lifetime: int = DEFAULT_PEERING_LIFETIME
    """Seconds a replica's keep-alive counts: a standby takes over this long after the active one died."""
    priority: int = 0
    """This replica's peering priority: the highest live one reconciles. Random unless FEDKUBE_PEERING_PRIORITY
    fixes it (two replicas of equal priority would both pause, so the chart never sets it)."""
    job_defaults: PodDefaults = field(default_factory=PodDefaults)
    """Image, pull secrets and server resources of job pods (FEDKUBE_JOB_DEFAULTS, the chart's jobDefaults:)."""
    mode: str = "server"
    """server (FLJob handlers) or site (FLSite handlers, fedkube.operator.site; FEDKUBE_OPERATOR_MODE)."""

    @property
    def liveness_endpoint(self) -> str:
        """kopf's liveness URL; the chart's probe GETs /healthz on the health port."""
        return f"http://0.0.0.0:{self.health_port}{HEALTH_PATH}"


def build_parser() -> argparse.ArgumentParser:
    """The ``fedkube operator`` command line."""
    p = argparse.ArgumentParser(prog="fedkube operator", description="Run the fedkube FLJob operator.")
    p.add_argument(
        "-n", "--namespace", action="append", default=None,
        help=f"namespace to reconcile (repeatable); default: ${WATCH_NAMESPACES} (comma-separated), "
        "or every namespace when that is empty",
    )
    p.add_argument("-A", "--all-namespaces", action="store_true", help="reconcile FLJobs in every namespace")
    p.add_argument("--health-port", default=None,
                   help=f"port of the liveness endpoint GET {HEALTH_PATH} (default ${HEALTH_PORT} or "
                   f"{DEFAULT_HEALTH_PORT}; 0 turns it off)")
    p.add_argument("--metrics-port", default=None,
                   help=f"port of Prometheus /metrics (default ${envvars.METRICS_PORT}; 0 or unset turns it off)")
    p.add_argument("--mode", choices=("server", "site"), default=None,
                   help="server: reconcile FLJobs; site: reconcile FLSites (a remote site's cluster; default "
                   "$FEDKUBE_OPERATOR_MODE or server)")
    p.add_argument("--interval", type=float, default=5.0, help="seconds between two looks at a running job")
    p.add_argument("--log-format", choices=("text", "json"), default=None,
                   help=f"log line format (default ${envvars.LOG_FORMAT} or text)")
    return p


def parse_config(argv: Sequence[str] | None = None, environ: dict[str, str] | None = None) -> OperatorConfig:
    """Flags over environment over defaults; ConfigError for values that cannot work."""
    env = dict(os.environ if environ is None else environ)
    args = build_parser().parse_args(argv)
    if args.all_namespaces and args.namespace:
        raise ConfigError("--all-namespaces and --namespace exclude each other; fix: pass one of them")
    if args.all_namespaces:
        namespaces: tuple[str, ...] = ()
    elif args.namespace:
        namespaces = tuple(args.namespace)
    else:
        namespaces = tuple(n.strip() for n in env.get(WATCH_NAMESPACES, "").split(",") if n.strip())
    health = envvars.parse_port(args.health_port if args.health_port is not None else env.get(HEALTH_PORT) or
                                str(DEFAULT_HEALTH_PORT), "health port")
    metrics = envvars.parse_port(args.metrics_port if args.metrics_port is not None else
                                 env.get(envvars.METRICS_PORT) or "0", "metrics port")
    if args.interval <= 0:
        raise ConfigError(f"--interval must be positive, got {args.interval}")
    log_format = args.log_format or env.get(envvars.LOG_FORMAT) or "text"
    if log_format not in ("text", "json"):
        raise ConfigError(f"{envvars.LOG_FORMAT} must be text or json, got {log_format!r}")
    peering, lifetime, priority = _peering_from_env(env)
    mode = args.mode or env.get(MODE) or "server"
    if mode not in ("server", "site"):
        raise ConfigError(f"{MODE} must be server or site, got {mode!r}")
    return OperatorConfig(namespaces, health, metrics, args.interval, log_format, policy_from_env(env),
                          network_config_from_env(env), peering, lifetime, priority,
                          job_defaults=defaults_from_env(env), mode=mode)


def _peering_from_env(env: dict[str, str]) -> tuple[str, int, int]:
    name = env.get(PEERING, "").strip()
    try:
        lifetime = int(env.get(PEERING_LIFETIME) or DEFAULT_PEERING_LIFETIME)
        fixed = env.get(PEERING_PRIORITY, "").strip()
        priority = int(fixed) if fixed else 1 + secrets.randbelow(PRIORITY_RANGE)
    except ValueError as exc:
        raise ConfigError(f"{PEERING_LIFETIME} and {PEERING_PRIORITY} must be integers: {exc}") from None
    if not 2 <= lifetime <= 3600:
        raise ConfigError(f"{PEERING_LIFETIME} must be 2..3600 seconds (the takeover delay), got {lifetime}")
    return name, lifetime, priority


class KopfObjectIds(logging.Filter):
    """Names the FLJob of kopf's per-object records (``k8s_ref``) in the ``job`` field as ``namespace/name``.

    kopf's own formatters would prefix it; with fedkube's formatter the object
    would otherwise be lost from lines such as "Handler 'observe' failed".
    """

    def filter(self, record: logging.LogRecord) -> bool:
        ref = getattr(record, "k8s_ref", None)
        if isinstance(ref, dict) and not getattr(record, "job", None):
            ns, name = ref.get("namespace"), ref.get("name")
            record.job = f"{ns}/{name}" if ns else str(name)
        return True


def setup_logging(log_format: str) -> logging.Handler:
    """fedkube's log format for every line, kopf's included, printed once.

    kopf's ``configure()`` is deliberately not called: it would add a second
    root handler in kopf's own format, and every line would show twice. One
    format across server, sidecars and operator lets one log query cover all.
    """
    handler = configure_logging("operator", job="", fmt=log_format)
    handler.addFilter(KopfObjectIds())
    # kopf logs every successful timer run at INFO ("Timer 'observe' succeeded"): one line per job per interval.
    # Our handlers log what changed; kopf's warnings and errors still show.
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    # What kopf's configure() would have done: asyncio's debug chatter stays out of the operator's log.
    logging.getLogger("asyncio").setLevel(logging.WARNING)
    # One line per liveness probe (every few seconds, forever) says nothing; failed probes show in the pod's events.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    return handler


def tune_peering(settings: kopf.OperatorSettings, config: OperatorConfig, **_: Any) -> None:
    """Startup: peering is mandatory when named (no silent standalone fallback next to a second replica)."""
    if config.peering:
        settings.peering.mandatory = True
        settings.peering.lifetime = config.peering_lifetime
        settings.peering.stealth = True  # a keep-alive line every few seconds per replica says nothing


def main(argv: Sequence[str] | None = None) -> int:
    """Run the operator until SIGINT/SIGTERM; 2 for a configuration error."""
    try:
        config = parse_config(argv)
    except ConfigError as exc:
        print(f"fedkube operator: {exc}")
        return 2
    import kopf

    from fedkube.metrics import MetricsServer, OperatorMetrics, new_registry, serve_metrics
    from fedkube.operator import handlers

    setup_logging(config.log_format)
    metrics_registry = new_registry()
    metrics = OperatorMetrics(metrics_registry)
    metrics_server: MetricsServer | None = None
    if config.metrics_port:
        try:
            metrics_server, _ = serve_metrics(metrics_registry, config.metrics_port)
        except ConfigError as exc:
            print(f"fedkube operator: {exc}")
            return 2
    memo = kopf.Memo()
    memo[handlers.Memo.METRICS] = metrics
    memo[handlers.Memo.LOG_FORMAT] = config.log_format
    memo[handlers.Memo.POLICY] = config.policy
    memo[handlers.Memo.NETWORK] = config.network
    memo[handlers.Memo.JOB_DEFAULTS] = config.job_defaults
    if config.mode == "site":
        from fedkube.operator.site import handlers as site_handlers

        registry = site_handlers.register(kopf.OperatorRegistry(), interval=config.interval)
    else:
        registry = handlers.register(kopf.OperatorRegistry(), interval=config.interval)
    kopf.on.startup(registry=registry)(functools.partial(tune_peering, config=config))
    # A registry of our own carries none of kopf's default login handlers: log in the way the handlers'
    # kubernetes client does (in-cluster service account, else the kubeconfig).
    kopf.on.login(registry=registry)(kopf.login_via_client)
    where = ", ".join(config.namespaces) or "every namespace"
    logger.info("fedkube operator: reconciling FLJobs in %s; liveness on port %s; %s", where, config.health_port,
                f"peering {config.peering!r} at priority {config.priority}" if config.peering else "standalone")
    try:
        kopf.run(
            registry=registry,
            # Standalone: one replica (the chart's Deployment then uses Recreate). Peering: any number; the chart
            # installs the peering objects, and a missing one stops the operator (mandatory) rather than let two
            # replicas reconcile the same jobs.
            standalone=not config.peering,
            peering_name=config.peering or None,
            priority=config.priority,
            clusterwide=not config.namespaces,
            namespaces=list(config.namespaces),
            liveness_endpoint=config.liveness_endpoint if config.health_port else None,
            memo=memo,
        )
    finally:
        if metrics_server is not None:
            metrics_server.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
