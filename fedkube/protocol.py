"""The wire vocabulary: every name, key and reserved value fedkube's processes exchange, defined once.

The messages themselves are in ``proto/fedkube/v1`` (generated into
``fedkube.wire.v1``); what they carry as free strings is named here, so the
server, the sidecar and the trainer SDK import one definition instead of each
spelling the string. This module imports nothing of ours but the generated
wire code and the error base, so every side may import it (the trainer SDK
included: it must not pull in the server, the operator or prometheus_client).

* task kinds: the ``Task.kind`` enum (control.proto), with the short names
  the server logs and the SDK shows scripts;
* task settings: the ``Task.config`` keys the server writes and the SDK
  reads (:class:`ResultTimeouts`);
* reserved names: the server's name as a transfer source and receiver, the
  control stream's metadata keys, the SDK's own timing metrics.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import cast

from fedkube.errors import ConfigError
from fedkube.wire.v1 import control_pb2

# --- versions and metadata ---------------------------------------------------------
#: ``Register.protocol_version`` the sidecar speaks and the server accepts.
PROTOCOL_VERSION = 1
#: gRPC metadata of every control-plane call: the site's name and "Bearer <token>".
SITE_METADATA = "x-fedkube-site"
AUTH_METADATA = "authorization"
BEARER = "Bearer "

# --- reserved names ----------------------------------------------------------------
#: The server's name on the data plane: the source of the global model's refs, and the one receiver of
#: every result transaction a trainer publishes.
SERVER = "server"

# --- task kinds (control.proto TaskKind) ---------------------------------------------
TASK_TRAIN = control_pb2.TASK_KIND_TRAIN
TASK_INIT = control_pb2.TASK_KIND_INIT
TASK_EVALUATE = control_pb2.TASK_KIND_EVALUATE
_KIND_PREFIX = "TASK_KIND_"


def task_kind_name(kind: int) -> str:
    """The short name of a ``TaskKind`` ("train", "init"; "unspecified" for 0, "kind <n>" for a newer one)."""
    try:
        return control_pb2.TaskKind.Name(kind).removeprefix(_KIND_PREFIX).lower()
    except ValueError:
        return f"kind {kind}"


#: The short names, as the server's logs and ``FLModel.config[TASK_KIND_KEY]`` show them.
INIT_TASK = task_kind_name(TASK_INIT)
TRAIN_TASK = task_kind_name(TASK_TRAIN)
EVALUATE_TASK = task_kind_name(TASK_EVALUATE)


def task_kind(name: str) -> control_pb2.TaskKind:
    """The ``TaskKind`` of a short name (inverse of :func:`task_kind_name`); ValueError for an unknown one."""
    return cast(control_pb2.TaskKind, control_pb2.TaskKind.Value(_KIND_PREFIX + name.upper()))


#: Where the trainer SDK shows a script the task's kind among ``FLModel.config``: ``"init"``, ``"train"`` or
#: ``"evaluate"``.
#: Not a wire key: the kind travels as ``Task.kind``; the SDK adds it for the script.
TASK_KIND_KEY = "fedkube.task"

# --- task settings (Task.config) -------------------------------------------------------
#: Prefix of every key fedkube itself puts in ``Task.config``.
CONFIG_PREFIX = "fedkube."
RESULT_IDLE_TIMEOUT_KEY = "fedkube.result_idle_timeout_s"
RESULT_START_TIMEOUT_KEY = "fedkube.result_start_timeout_s"
RESULT_TTL_KEY = "fedkube.result_ttl_s"
#: FedProx's mu from spec.strategy.proximalMu, for fedkube.trainer_sdk.fedprox (absent: no proximal term).
PROXIMAL_MU_KEY = "fedkube.proximal_mu"
#: SCAFFOLD's control variates travel as tensors named SCAFFOLD_PREFIX + <model tensor>: the server's c in a task,
#: the client's delta c_i in a result (fedkube.server.scaffold, fedkube.trainer_sdk.scaffold). Reserved: a job of
#: another strategy refuses results carrying such names.
SCAFFOLD_PREFIX = "scaffold/"

#: Seconds the trainer waits beyond the server's own stall detection, so that when the server is alive
#: its verdict (``send()`` returns False, the site sits out the round) reaches the trainer before the
#: trainer's own timeout raises in the script.
VERDICT_SLACK_S = 5.0


@dataclass(frozen=True)
class ResultTimeouts:
    """How long a trainer's ``send()`` waits for the server's download of its result (seconds).

    * ``idle_s``: fail when the download made no progress for this long;
    * ``start_s``: fail when it did not start within this long;
    * ``ttl_s``: drop the result's transaction after this long even if the
      server never completed it (never less than ``start_s + idle_s``).
    """

    idle_s: float
    start_s: float
    ttl_s: float

    @classmethod
    def for_job(cls, *, idle_timeout_s: float, chunk_timeout_s: float, round_timeout_s: float) -> ResultTimeouts:
        """What the server tells trainers, from its own fetch settings and the round timeout.

        The server gives up on a stalled download after its idle timeout plus
        at most one chunk timeout (the attempt in flight), and answers it; the
        trainer waits that long plus :data:`VERDICT_SLACK_S`, so a live
        server's answer comes first. The server pulls a result as soon as it
        is announced and closes the round at its deadline, so a download not
        started within a whole round means the server is gone.
        """
        idle = idle_timeout_s + chunk_timeout_s + VERDICT_SLACK_S
        start = round_timeout_s + idle
        return cls(idle_s=idle, start_s=start, ttl_s=start + idle)

    def to_config(self) -> dict[str, str]:
        """The ``Task.config`` entries that carry these timeouts."""
        return {
            RESULT_IDLE_TIMEOUT_KEY: repr(float(self.idle_s)),
            RESULT_START_TIMEOUT_KEY: repr(float(self.start_s)),
            RESULT_TTL_KEY: repr(float(self.ttl_s)),
        }

    @classmethod
    def from_config(cls, config: Mapping[str, str], defaults: ResultTimeouts) -> ResultTimeouts:
        """The timeouts a task's config sets, ``defaults`` for each it does not; ConfigError for a bad value."""
        idle = _seconds(config, RESULT_IDLE_TIMEOUT_KEY, defaults.idle_s)
        start = _seconds(config, RESULT_START_TIMEOUT_KEY, defaults.start_s)
        ttl = max(_seconds(config, RESULT_TTL_KEY, defaults.ttl_s), start + idle)
        return cls(idle_s=idle, start_s=start, ttl_s=ttl)


def _seconds(config: Mapping[str, str], key: str, default: float) -> float:
    raw = config.get(key)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(
            f"task config {key}={raw!r} is not a number of seconds; fix: the server and the trainer SDK come "
            "from different fedkube versions; use the same version on both sides"
        ) from None
    if not (value > 0 and math.isfinite(value)):
        raise ConfigError(
            f"task config {key}={raw!r} must be a positive, finite number of seconds; fix: the server and the "
            "trainer SDK come from different fedkube versions; use the same version on both sides"
        )
    return value


# --- the trainer SDK's own timings (MetricReport names) ------------------------------------------
#: Names under which the trainer SDK reports its own timings through ``LogMetric``. The sidecar turns
#: them into the ``fedkube_trainer_*_seconds`` histograms and never forwards them as user metrics; a
#: script's own metric may not start with the prefix.
RESERVED_METRIC_PREFIX = "fedkube."
RECEIVE_SECONDS = "fedkube.receive_seconds"
SEND_SECONDS = "fedkube.send_seconds"
DOWNLOAD_WAIT_SECONDS = "fedkube.download_wait_seconds"


# --- why a server port refused a call or connection ---------------------------------------------
#: ``reason`` values of ``fedkube_server_rejected_connections_total`` for the ports' limits
#: (docs/protocol.md, "Hardening"); a fixed set, so the metric's series are bounded.
RECEIVER_MISMATCH = "ReceiverMismatch"  # a fetch or completion naming another site than the caller's
DOWNLOAD_BUDGET = "DownloadBudget"  # more Download calls at once than the server serves beside Control
SITE_CALL_BUDGET = "SiteCallBudget"  # one site runs the most gRPC calls at once that a site may hold
REQUEST_DEADLINE = "RequestDeadline"  # a bulk request not complete within its deadline from accept
CONNECTION_LIMIT = "ConnectionLimit"  # every bulk connection slot taken
UNAUTHENTICATED_LIMIT = "UnauthenticatedLimit"  # every bulk slot for not-yet-authenticated connections taken
PEER_CONNECTION_LIMIT = "PeerConnectionLimit"  # one address holds its most unauthenticated bulk connections
STATUS_CONNECTION_LIMIT = "StatusConnectionLimit"  # every status-port connection thread taken
STATUS_DEADLINE = "StatusDeadline"  # a status-port connection still open at its deadline
METRICS_CONNECTION_LIMIT = "MetricsConnectionLimit"  # every /metrics connection thread taken
METRICS_DEADLINE = "MetricsDeadline"  # a /metrics connection still open at its deadline
REVOKED = "Revoked"  # a site the job's spec.revokedSites names (fedkube.server.revocation)
PORT_REFUSALS = (
    RECEIVER_MISMATCH, DOWNLOAD_BUDGET, SITE_CALL_BUDGET, REQUEST_DEADLINE, CONNECTION_LIMIT, UNAUTHENTICATED_LIMIT,
    PEER_CONNECTION_LIMIT, STATUS_CONNECTION_LIMIT, STATUS_DEADLINE, METRICS_CONNECTION_LIMIT, METRICS_DEADLINE,
    REVOKED,
)  # fmt: skip
