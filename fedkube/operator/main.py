"""``fedkube operator``: run the FLJob operator (kopf) in a cluster or against a kubeconfig.

Configuration comes from flags, defaulting to the environment the Helm chart
sets (charts/fedkube/templates/deployment.yaml): FEDKUBE_WATCH_NAMESPACES
(comma-separated; empty = every namespace), FEDKUBE_HEALTH_PORT (kopf's
liveness endpoint, GET /healthz, which the chart probes), FEDKUBE_METRICS_PORT,
FEDKUBE_LOG_FORMAT, FEDKUBE_ADMIN_POLICY (fedkube.operator.policy),
FEDKUBE_NETWORK_POLICY (fedkube.operator.netpol) and FEDKUBE_JOB_DEFAULTS
(fedkube.operator.podspec).
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from fedkube import envvars
from fedkube.errors import ConfigError
from fedkube.logs import configure_logging
from fedkube.operator.netpol import NetworkPolicyConfig, network_config_from_env
from fedkube.operator.podspec import PodDefaults, defaults_from_env
from fedkube.operator.policy import AdminPolicy, policy_from_env

logger = logging.getLogger(__name__)

# Set by the chart's Deployment; named here because only the operator reads them.
WATCH_NAMESPACES = envvars.WATCH_NAMESPACES
HEALTH_PORT = envvars.HEALTH_PORT
DEFAULT_HEALTH_PORT = envvars.DEFAULT_HEALTH_PORT
HEALTH_PATH = "/healthz"


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
    job_defaults: PodDefaults = field(default_factory=PodDefaults)
    """Image, pull secrets and server resources of job pods (FEDKUBE_JOB_DEFAULTS, the chart's jobDefaults:)."""

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
    return OperatorConfig(namespaces, health, metrics, args.interval, log_format, policy_from_env(env),
                          network_config_from_env(env), defaults_from_env(env))


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
    registry = handlers.register(kopf.OperatorRegistry(), interval=config.interval)
    # A registry of our own carries none of kopf's default login handlers: log in the way the handlers'
    # kubernetes client does (in-cluster service account, else the kubeconfig).
    kopf.on.login(registry=registry)(kopf.login_via_client)
    where = ", ".join(config.namespaces) or "every namespace"
    logger.info("fedkube operator: reconciling FLJobs in %s; liveness on port %s", where, config.health_port)
    try:
        kopf.run(
            registry=registry,
            standalone=True,  # one replica (the chart's Deployment uses Recreate); no peering objects needed
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
