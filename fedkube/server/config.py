"""The server's configuration: environment + FLJob spec -> one typed object.

Everything the server process reads from its environment is read here and
nowhere else, so a wrong setting fails at start with a message naming the env
var or the spec field (LESSONS.md 18), never deep inside a round.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedkube import envvars
from fedkube.errors import ConfigError
from fedkube.security.settings import TlsSettings
from fedkube.server.enrollment import EnrollSettings
from fedkube.server.influence import Influence
from fedkube.spec import FLJobSpec, ModelSource, Strategy, Timeouts, Transfer, load_job
from fedkube.spec.evaluation import Evaluation
from fedkube.spec.model import DEFAULT_MAX_BYTES, ModelSourceKind, model_max_bytes
from fedkube.spec.strategy import CLIP_LEARNING_RATE, StrategyName

log = logging.getLogger(__name__)

DEFAULT_REGISTER_TIMEOUT_S = 30.0
MAX_REGISTER_TIMEOUT_S = 3600.0  # longer would make the guard pointless

# The spec model is the one source of every default: these instances carry them.
_TRANSFER = Transfer()
_TIMEOUTS = Timeouts()
_MODEL = ModelSource()
_STRATEGY = Strategy()
# The spec.strategy fields of JobSettings.influence.
_INFLUENCE = ("weighting", "max_examples_per_site", "clip_norm", "clip_quantile", "clip_learning_rate")


@dataclass(frozen=True)
class TransferSettings:
    """How the server pulls result tensors from clients (and serves the global model); spec.transfer."""

    chunk_bytes: int = _TRANSFER.chunk_bytes
    chunk_timeout_s: float = _TRANSFER.chunk_timeout_seconds
    idle_timeout_s: float = _TRANSFER.idle_timeout_seconds
    max_attempts: int = _TRANSFER.max_attempts

    @classmethod
    def from_spec(cls, transfer: Transfer) -> TransferSettings:
        """The settings of a checked ``spec.transfer``."""
        return cls(
            chunk_bytes=transfer.chunk_bytes,
            chunk_timeout_s=transfer.chunk_timeout_seconds,
            idle_timeout_s=transfer.idle_timeout_seconds,
            max_attempts=transfer.max_attempts,
        )


def influence_of(strategy: Strategy) -> Influence:
    """The bounds on one site's influence that ``spec.strategy`` sets."""
    return Influence(
        strategy.weighting, strategy.max_examples_per_site, strategy.clip_norm, strategy.clip_quantile,
        strategy.clip_learning_rate if strategy.clip_learning_rate is not None else CLIP_LEARNING_RATE,
    )  # fmt: skip


@dataclass(frozen=True)
class JobSettings:
    """The parts of the FLJob spec that the server acts on.

    Built from a validated :class:`~fedkube.spec.FLJobSpec` by :meth:`from_spec`; the spec
    model checked every value, so nothing is checked again here. The defaults are the spec
    model's, for tests that build settings directly.
    """

    job: str
    rounds: int
    min_clients: int
    clients: tuple[str, ...]
    strategy: StrategyName = _STRATEGY.name
    # The strategy's parameters by their spec names (serverLr, ...), as the strategy builder takes them.
    strategy_options: Mapping[str, Any] = field(default_factory=dict)
    # spec.strategy.weighting, maxExamplesPerSite, clipNorm: bounds for every strategy, not its parameters.
    influence: Influence = field(default_factory=lambda: influence_of(_STRATEGY))
    model_source: ModelSourceKind = _MODEL.source
    model_path: str | None = _MODEL.path
    # spec.model.maxBytes, or its default derived from the server's memory limit: the init model's bound.
    model_max_bytes: int = DEFAULT_MAX_BYTES
    round_timeout_s: float = _TIMEOUTS.round_seconds
    heartbeat_timeout_s: float = _TIMEOUTS.heartbeat_seconds
    registration_timeout_s: float = _TIMEOUTS.registration_seconds
    transfer: TransferSettings = field(default_factory=TransferSettings)
    # spec.server.checkpoint.onUnusable == StartFresh: train from round 1 when no checkpoint loads.
    checkpoint_start_fresh: bool = False
    # spec.output.everyRound: deliver each round's model too, not only the final one.
    output_every_round: bool = False
    # spec.evaluation: when and on which sites the global model is evaluated (None: never).
    evaluation: Evaluation | None = None
    # spec.revokedSites when the server started (fedkube.server.revocation watches the file for more).
    revoked_sites: tuple[str, ...] = ()

    @classmethod
    def from_spec(cls, job: str, spec: FLJobSpec) -> JobSettings:
        """The server's settings of job ``job`` from its checked spec."""
        strategy = spec.strategy
        return cls(
            job=job,
            rounds=spec.rounds,
            min_clients=spec.quorum,
            clients=tuple(c.name for c in spec.clients),
            strategy=strategy.name,
            strategy_options=strategy.model_dump(by_alias=True, exclude={"name", *_INFLUENCE}, exclude_none=True),
            influence=influence_of(strategy),
            model_source=spec.model.source,
            model_path=spec.model.path,
            model_max_bytes=model_max_bytes(spec.model, spec.server.resources.limits.get("memory")),
            round_timeout_s=spec.timeouts.round_seconds,
            heartbeat_timeout_s=spec.timeouts.heartbeat_seconds,
            registration_timeout_s=spec.timeouts.registration_seconds,
            transfer=TransferSettings.from_spec(spec.transfer),
            checkpoint_start_fresh=spec.server.checkpoint.on_unusable == "StartFresh",
            output_every_round=spec.output is not None and spec.output.every_round,
            evaluation=spec.evaluation,
            revoked_sites=tuple(spec.revoked_sites or ()),
        )


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
    # Where the trained model is delivered (FEDKUBE_OUTPUT_DIR); None keeps it only in checkpoints, if any.
    output_dir: Path | None = None
    termination_log: Path | None = None
    # Where the gRPC and HTTP servers listen; in a pod every interface.
    bind_host: str = "[::]"
    # Largest control/Push message accepted; a bigger one is refused by gRPC
    # before it is buffered, so a hostile client cannot grow our memory.
    max_message_bytes: int = 0
    # How long an authenticated Connect stream may stay silent before its Register: a stream
    # that never registers would otherwise hold a server thread for good.
    register_timeout_s: float = DEFAULT_REGISTER_TIMEOUT_S
    # Mutual TLS on the gRPC and bulk ports (FEDKUBE_TLS, _TLS_DIR); off here only for tests that build a
    # config by hand: load_config turns it on unless the job says security.tls: disabled.
    tls: TlsSettings = field(default_factory=TlsSettings.disabled)
    # The FLJob's namespace: a site certificate must name it (with the job) to be one of this job's sites.
    namespace: str = "default"
    # Remote sites' enrollment port (FEDKUBE_ENROLL_DIR/_PORT; fedkube.server.enrollment); None = off.
    enroll: EnrollSettings | None = None
    # FEDKUBE_SPEC_FILE, re-read for spec.revokedSites (fedkube.server.revocation); None: nothing to watch.
    spec_file: Path | None = None

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


def settings_from_spec(job_name: str, spec: FLJobSpec) -> JobSettings:
    """Map the FLJob spec model (fedkube.spec) onto the server's settings."""
    return JobSettings.from_spec(job_name, spec)


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
    output = env.get(envvars.OUTPUT_DIR, "").strip()
    term = env.get(envvars.TERMINATION_LOG, "").strip()
    tls = TlsSettings.from_env(env)
    namespace = env.get(envvars.NAMESPACE, "").strip()
    if tls.enabled and not namespace:
        raise ConfigError(
            f"{envvars.NAMESPACE} is not set, and with TLS the server checks that each site certificate names this "
            f"job's namespace; fix: set {envvars.NAMESPACE} to the FLJob's namespace"
        )
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
        output_dir=Path(output) if output else None,
        termination_log=Path(term) if term else None,
        bind_host=bind_host,
        register_timeout_s=_seconds_env(env, envvars.REGISTER_TIMEOUT, DEFAULT_REGISTER_TIMEOUT_S),
        tls=tls,
        namespace=namespace or "default",
        enroll=EnrollSettings.from_env(env),
        spec_file=spec_path,
    )


def _load_spec(path: Path) -> FLJobSpec:
    """Parse the FLJob file with the spec model; its errors already name the field."""
    try:
        return load_job(path).spec
    except ConfigError as exc:
        raise ConfigError(f"{envvars.SPEC_FILE}={str(path)!r}: {exc}") from exc
