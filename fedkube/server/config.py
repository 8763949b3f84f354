"""The server's configuration: environment + FLJob spec -> one typed object.

Everything the server process reads from its environment is read here and
nowhere else, so a wrong setting fails at start with a message naming the env
var or the spec field (LESSONS.md 18), never deep inside a round.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedkube import envvars
from fedkube.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_REGISTER_TIMEOUT_S = 30.0
MAX_REGISTER_TIMEOUT_S = 3600.0  # longer would make the guard pointless

# A site name is also a file name in the tokens dir and a metadata value.
_SITE_RE = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")


@dataclass(frozen=True)
class TransferSettings:
    """How the server pulls result tensors from clients (and serves the global model)."""

    chunk_bytes: int = 4 * 1024 * 1024
    chunk_timeout_s: float = 30.0
    idle_timeout_s: float = 60.0
    max_attempts: int = 5


@dataclass(frozen=True)
class JobSettings:
    """The parts of the FLJob spec that the server acts on."""

    job: str
    rounds: int
    min_clients: int
    clients: tuple[str, ...]
    strategy: str = "fedavg"
    strategy_options: Mapping[str, Any] = field(default_factory=dict)
    model_source: str = "file"  # "file" or "firstClient"
    model_path: str | None = None
    round_timeout_s: float = 600.0
    heartbeat_timeout_s: float = 30.0
    registration_timeout_s: float = 120.0
    transfer: TransferSettings = field(default_factory=TransferSettings)
    # spec.server.checkpoint.onUnusable == StartFresh: train from round 1 when no checkpoint loads.
    checkpoint_start_fresh: bool = False

    def __post_init__(self) -> None:
        problems = []
        if self.rounds < 1:
            problems.append(f"spec.rounds is {self.rounds}; fix: set it to 1 or more")
        if not self.clients:
            problems.append("spec.clients is empty; fix: list at least one client site")
        if not 1 <= self.min_clients <= max(len(self.clients), 1):
            problems.append(
                f"spec.minClients is {self.min_clients} but the job has {len(self.clients)} clients; "
                "fix: set it between 1 and the number of clients"
            )
        if len(set(self.clients)) != len(self.clients):
            problems.append(f"spec.clients has duplicate names: {sorted(self.clients)}; fix: name each site once")
        if self.model_source not in ("file", "firstClient"):
            problems.append(f"spec.model.source is {self.model_source!r}; fix: use 'file' or 'firstClient'")
        if self.model_source == "file" and not self.model_path:
            problems.append("spec.model.path is empty while spec.model.source is 'file'; fix: give the model's path")
        for name, value in (
            ("spec.timeouts.roundSeconds", self.round_timeout_s),
            ("spec.timeouts.heartbeatSeconds", self.heartbeat_timeout_s),
            ("spec.timeouts.registrationSeconds", self.registration_timeout_s),
            ("spec.transfer.chunkTimeoutSeconds", self.transfer.chunk_timeout_s),
            ("spec.transfer.idleTimeoutSeconds", self.transfer.idle_timeout_s),
        ):
            if not value > 0:
                problems.append(f"{name} is {value}; fix: set a positive number of seconds")
        if problems:
            raise ConfigError(f"FLJob {self.job!r} cannot run: " + "; ".join(problems))


@dataclass(frozen=True)
class ServerConfig:
    """Everything the server process needs, read once at start."""

    settings: JobSettings
    tokens: Mapping[str, bytes]
    grpc_port: int = envvars.DEFAULT_GRPC_PORT
    # The plain-TCP bulk data plane for tensor bytes (docs/protocol.md, "Bulk connections"):
    # None = off (tensors travel over gRPC only), 0 = any free port (tests), else that port.
    # FEDKUBE_BULK_PORT unset or 0 means off; the operator sets DEFAULT_BULK_PORT.
    bulk_port: int | None = None
    status_port: int = envvars.DEFAULT_STATUS_PORT
    metrics_port: int = 0
    checkpoint_dir: Path | None = None
    termination_log: Path | None = None
    # Where the gRPC and HTTP servers listen; in a pod every interface.
    bind_host: str = "[::]"
    # Largest control/Push message accepted; a bigger one is refused by gRPC
    # before it is buffered, so a hostile client cannot grow our memory.
    max_message_bytes: int = 0
    # How long an authenticated Connect stream may stay silent before its Register: a stream
    # that never registers would otherwise hold a server thread for good.
    register_timeout_s: float = DEFAULT_REGISTER_TIMEOUT_S

    def __post_init__(self) -> None:
        t = self.register_timeout_s
        if not (math.isfinite(t) and 0 < t <= MAX_REGISTER_TIMEOUT_S):
            raise ConfigError(
                f"{envvars.REGISTER_TIMEOUT}={t!r} is not a usable registration timeout; fix: set it to a number "
                f"of seconds above 0 and at most {MAX_REGISTER_TIMEOUT_S:g} (default {DEFAULT_REGISTER_TIMEOUT_S:g})"
            )

    @property
    def job(self) -> str:
        return self.settings.job

    def message_limit(self) -> int:
        """Max gRPC message size: one chunk plus headroom, unless set explicitly."""
        if self.max_message_bytes > 0:
            return self.max_message_bytes
        return self.settings.transfer.chunk_bytes + 1024 * 1024


def _seconds_env(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number of seconds; fix: set it to e.g. {default:g}") from None


def _int_env(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name, "").strip()
    return envvars.parse_port(raw, name) if raw else default


def read_tokens(directory: Path, sites: tuple[str, ...]) -> dict[str, bytes]:
    """One token per expected site, from the file named after it.

    A site without a token could never register, so that is a start-time error
    rather than a round-1 exclusion with a puzzling reason.
    """
    if not directory.is_dir():
        raise ConfigError(
            f"{envvars.TOKENS_DIR}={str(directory)!r} is not a directory; "
            "fix: point it at the directory holding one token file per site"
        )
    tokens: dict[str, bytes] = {}
    missing = []
    for site in sites:
        path = directory / site
        if not path.is_file():
            missing.append(site)
            continue
        token = path.read_bytes().strip()
        if not token:
            raise ConfigError(f"token file {str(path)!r} for site {site!r} is empty; fix: write the site's token in it")
        tokens[site] = token
    if missing:
        raise ConfigError(
            f"{envvars.TOKENS_DIR}={str(directory)!r} has no token file for sites {missing}; "
            "fix: create one file per site, named after the site, holding its token"
        )
    return tokens


def settings_from_spec(job_name: str, spec: Any) -> JobSettings:
    """Map the FLJob spec model (fedkube.spec) onto the server's settings.

    This is the one place that knows the spec model's attribute names.
    """
    model = getattr(spec, "model", None)
    timeouts = getattr(spec, "timeouts", None)
    transfer = getattr(spec, "transfer", None)
    strategy = getattr(spec, "strategy", "fedavg")
    strategy_name, strategy_options = _strategy_of(strategy)
    source = getattr(model, "source", "file") if model is not None else "file"
    source = getattr(source, "value", source)
    defaults = TransferSettings()
    ts = TransferSettings(
        chunk_bytes=int(_attr(transfer, "chunk_bytes", defaults.chunk_bytes)),
        chunk_timeout_s=float(_attr(transfer, "chunk_timeout_seconds", defaults.chunk_timeout_s)),
        idle_timeout_s=float(_attr(transfer, "idle_timeout_seconds", defaults.idle_timeout_s)),
        max_attempts=int(_attr(transfer, "max_attempts", defaults.max_attempts)),
    )
    clients = tuple(str(getattr(c, "name", c)) for c in (getattr(spec, "clients", None) or ()))
    for site in clients:
        if not _SITE_RE.match(site):
            raise ConfigError(f"spec.clients name {site!r} is not a valid site name; fix: use lowercase a-z, 0-9, '-'")
    rounds = int(getattr(spec, "rounds", 1))
    return JobSettings(
        job=job_name,
        rounds=rounds,
        min_clients=int(_attr(spec, "min_clients", len(clients))),
        clients=clients,
        strategy=strategy_name,
        strategy_options=strategy_options,
        model_source=str(source),
        model_path=_attr(model, "path", None),
        round_timeout_s=float(_attr(timeouts, "round_seconds", 600.0)),
        heartbeat_timeout_s=float(_attr(timeouts, "heartbeat_seconds", 30.0)),
        registration_timeout_s=float(_attr(timeouts, "registration_seconds", 120.0)),
        transfer=ts,
        checkpoint_start_fresh=_attr(_attr(getattr(spec, "server", None), "checkpoint", None), "on_unusable", "Fail")
        == "StartFresh",
    )


def _attr(obj: Any, name: str, default: Any) -> Any:
    if obj is None:
        return default
    value = getattr(obj, name, None)
    return default if value is None else value


def _strategy_of(strategy: Any) -> tuple[str, dict[str, Any]]:
    """The spec may give the strategy as a plain name or as an object with a name and options."""
    if isinstance(strategy, str):
        return strategy, {}
    strategy = getattr(strategy, "value", strategy)
    if isinstance(strategy, str):
        return strategy, {}
    name = getattr(strategy, "name", None) or getattr(strategy, "type", None) or "fedavg"
    name = getattr(name, "value", name)
    options: dict[str, Any] = {}
    dump = getattr(strategy, "model_dump", None)
    if callable(dump):
        # camelCase, as the strategy builder takes the spec's own parameter names (serverLr, ...).
        options = {k: v for k, v in dump(by_alias=True).items() if k not in ("name", "type") and v is not None}
    return str(name), options


def load_config(env: Mapping[str, str] | None = None, *, bind_host: str = "[::]") -> ServerConfig:
    """Read the server's configuration from the environment.

    Raises ConfigError naming the env var or the spec field that is wrong.
    """
    env = os.environ if env is None else env
    job = env.get(envvars.JOB, "").strip()
    if not job:
        raise ConfigError(f"{envvars.JOB} is not set; fix: set it to the FLJob's name")
    spec_file = env.get(envvars.SPEC_FILE, "").strip()
    if not spec_file:
        raise ConfigError(f"{envvars.SPEC_FILE} is not set; fix: point it at the FLJob spec (JSON or YAML)")
    spec_path = Path(spec_file)
    if not spec_path.is_file():
        raise ConfigError(f"{envvars.SPEC_FILE}={spec_file!r} does not exist; fix: point it at the FLJob spec file")
    settings = settings_from_spec(job, _load_spec(spec_path))
    tokens_dir = env.get(envvars.TOKENS_DIR, "").strip()
    if not tokens_dir:
        raise ConfigError(f"{envvars.TOKENS_DIR} is not set; fix: point it at the directory of per-site token files")
    tokens = read_tokens(Path(tokens_dir), settings.clients)
    ckpt = env.get(envvars.CHECKPOINT_DIR, "").strip()
    term = env.get(envvars.TERMINATION_LOG, "").strip()
    return ServerConfig(
        settings=settings,
        tokens=tokens,
        grpc_port=_int_env(env, envvars.GRPC_PORT, envvars.DEFAULT_GRPC_PORT),
        # Unset means off (not DEFAULT_BULK_PORT): a server started by hand or by an older
        # manifest must not grab a second port nobody asked for.
        bulk_port=_int_env(env, envvars.BULK_PORT, 0) or None,
        status_port=_int_env(env, envvars.STATUS_PORT, envvars.DEFAULT_STATUS_PORT),
        metrics_port=_int_env(env, envvars.METRICS_PORT, 0),
        checkpoint_dir=Path(ckpt) if ckpt else None,
        termination_log=Path(term) if term else None,
        bind_host=bind_host,
        register_timeout_s=_seconds_env(env, envvars.REGISTER_TIMEOUT, DEFAULT_REGISTER_TIMEOUT_S),
    )


def _load_spec(path: Path) -> Any:
    """Parse the FLJob file with the spec model; its errors already name the field."""
    from fedkube.spec import load_job

    try:
        job = load_job(path)
    except ConfigError as exc:
        raise ConfigError(f"{envvars.SPEC_FILE}={str(path)!r}: {exc}") from exc
    return getattr(job, "spec", job)
