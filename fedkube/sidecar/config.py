"""The sidecar's settings, read from the environment in this one place."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from fedkube import envvars, portfile
from fedkube.errors import ConfigError
from fedkube.metrics import metrics_port_from_env
from fedkube.security.settings import TlsSettings
from fedkube.terms import TermsPolicy

# Set by the local runtime: leave once the job's Stop and the trainer's final
# state were forwarded (in Kubernetes the sidecar runs until SIGTERM).
# TODO(lead): move into fedkube.envvars; the getattr keeps this module working before and after.
SIDECAR_EXIT_ON_STOP = envvars.SIDECAR_EXIT_ON_STOP


@dataclass(frozen=True)
class SidecarConfig:
    """Everything the sidecar process needs to run.

    Attributes:
        job: the FLJob name; sent in ``Register`` and checked by the server.
        site: this client's site name (its identity towards the server).
        server_address: ``host:port`` of the server's gRPC endpoint.
        token: this site's token, sent as ``authorization: Bearer <token>``.
        trainer_port: where the trainer's local endpoint listens on 127.0.0.1 (0 = any free port).
        exit_on_stop: exit 0 once the job's Stop and the trainer's final state were forwarded.
        backoff_base_s / backoff_max_s: reconnect delays (exponential with jitter between them).
        final_state_grace_s: after Stop, how long to wait for the trainer's final state before exiting anyway.
        relay_window_chunks: chunks buffered per relayed stream (bounds the sidecar's memory).
        metrics_port: where ``/metrics`` is served (0 = not served; the metrics are still kept).
        server_bulk_address: ``host:port`` of the server's bulk port; empty = tensors travel over
            gRPC only (no bulk relay for the trainer, results pushed with ``Control.Push``).
        bulk_handoff: hand the trainer the connection to the server's bulk port instead of relaying
            its bytes (:mod:`fedkube.transfer.handoff`); used only where the platform can (Linux)
            and the trainer offers it.
        ports_file: set by the local runtime: bind the listeners to ports the OS picks (or those the
            file names, after a restart) and write them there (:mod:`fedkube.portfile`).
        metrics_host: the host ``/metrics`` binds (``FEDKUBE_BIND_ADDRESS``; every interface when unset, as
            Prometheus scrapes a pod from outside; the trainer's endpoints are on 127.0.0.1 whatever it says).
        tls: this site's certificate and the server name it checks (FEDKUBE_TLS, _TLS_DIR, _TLS_SERVER_NAME),
            for both the gRPC channel and the bulk dials; off only with FEDKUBE_TLS=disabled (or when built
            by hand in a test).
        policy: the site admin's policy over the job's terms (FEDKUBE_SITE_POLICY); checked on Registered.
        site_controlled: a stop before the job's Stop is the site leaving (FEDKUBE_SITE_CONTROLLED=1): Leave.
        status_port: where the site's view (fedkube.siteview) is served on /status (FEDKUBE_STATUS_PORT; 0: any
            free port; None: not served).
        termination_log: where the final site view is written on exit (FEDKUBE_TERMINATION_LOG; None: nowhere).
    """

    job: str
    site: str
    server_address: str
    token: str
    trainer_port: int = envvars.DEFAULT_TRAINER_PORT
    exit_on_stop: bool = False
    backoff_base_s: float = 0.5
    backoff_max_s: float = 15.0
    final_state_grace_s: float = 60.0
    relay_window_chunks: int = 4
    metrics_port: int = 0
    server_bulk_address: str = ""
    bulk_handoff: bool = True
    ports_file: Path | None = None
    metrics_host: str = "0.0.0.0"
    tls: TlsSettings = field(default_factory=TlsSettings.disabled)
    policy: TermsPolicy = field(default_factory=TermsPolicy)
    site_controlled: bool = False
    status_port: int | None = None
    termination_log: Path | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> SidecarConfig:
        """Read the settings; raise ``ConfigError`` naming the variable and the fix."""
        env = os.environ if env is None else env

        def need(name: str, what: str) -> str:
            value = env.get(name, "").strip()
            if not value:
                raise ConfigError(f"{name} is not set; the sidecar needs {what}; fix: set {name}")
            return value

        job = need(envvars.JOB, "the FLJob name")
        site = need(envvars.SITE, "its site name")
        server = need(envvars.SERVER_ADDRESS, "the server's gRPC address as host:port")
        _check_address(envvars.SERVER_ADDRESS, server, f"server:{envvars.DEFAULT_GRPC_PORT}")
        bulk = env.get(envvars.SERVER_BULK_ADDRESS, "").strip()
        if bulk:
            _check_address(envvars.SERVER_BULK_ADDRESS, bulk, f"server:{envvars.DEFAULT_BULK_PORT}")
        token_file = need(envvars.TOKEN_FILE, "the path of this site's token file")
        try:
            token = Path(token_file).read_text().strip()
        except OSError as exc:
            raise ConfigError(
                f"{envvars.TOKEN_FILE}={token_file!r} cannot be read ({exc.strerror}); "
                "fix: mount the site's token Secret there or point the variable at the token file"
            ) from None
        if not token:
            raise ConfigError(f"token file {token_file!r} ({envvars.TOKEN_FILE}) is empty; fix: write the site's token")
        raw_port = env.get(envvars.TRAINER_PORT, "").strip() or str(envvars.DEFAULT_TRAINER_PORT)
        if not raw_port.isdigit() or not 0 <= int(raw_port) <= 65535:
            raise ConfigError(f"{envvars.TRAINER_PORT}={raw_port!r} is not a port number; fix: use 0..65535")
        exit_raw = env.get(SIDECAR_EXIT_ON_STOP, "").strip().lower()
        if exit_raw not in ("", "0", "1", "true", "false"):
            raise ConfigError(f"{SIDECAR_EXIT_ON_STOP}={exit_raw!r} must be 1 or 0")
        handoff_raw = env.get(envvars.BULK_HANDOFF, "").strip().lower()
        if handoff_raw not in ("", "0", "1", "true", "false"):
            raise ConfigError(f"{envvars.BULK_HANDOFF}={handoff_raw!r} must be 1 or 0 (0: relay the bytes instead)")
        policy_raw = env.get(envvars.SITE_POLICY, "").strip()
        status_raw = env.get(envvars.STATUS_PORT, "").strip()
        termination = env.get(envvars.TERMINATION_LOG, "").strip()
        return cls(
            job=job,
            site=site,
            server_address=server,
            token=token,
            trainer_port=int(raw_port),
            exit_on_stop=exit_raw in ("1", "true"),
            metrics_port=metrics_port_from_env(env),
            server_bulk_address=bulk,
            bulk_handoff=handoff_raw not in ("0", "false"),
            ports_file=portfile.path_from_env(env),
            metrics_host=env.get(envvars.BIND_ADDRESS, "").strip().strip("[]") or "0.0.0.0",
            tls=TlsSettings.from_env(env, server_address=server),
            policy=TermsPolicy.from_json(policy_raw, name=envvars.SITE_POLICY) if policy_raw else TermsPolicy(),
            site_controlled=_flag(env, envvars.SITE_CONTROLLED),
            status_port=envvars.parse_port(status_raw, envvars.STATUS_PORT) if status_raw else None,
            termination_log=Path(termination) if termination else None,
        )


def _flag(env: Mapping[str, str], name: str) -> bool:
    raw = env.get(name, "").strip().lower()
    if raw not in ("", "0", "1", "true", "false"):
        raise ConfigError(f"{name}={raw!r} must be 1 or 0")
    return raw in ("1", "true")


def _check_address(name: str, value: str, example: str) -> None:
    """``value`` must be ``host:port`` with a port from 1 to 65535; a ConfigError naming ``name`` otherwise."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.strip().isdigit():
        raise ConfigError(f"{name}={value!r} is not host:port; fix: e.g. {name}={example}")
    if envvars.parse_port(port, name) == 0:
        raise ConfigError(f"{name}={value!r} names port 0, which cannot be dialed; fix: e.g. {name}={example}")
