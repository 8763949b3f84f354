"""Environment variables that configure fedkube's processes.

The operator's builders set them in pod manifests; the local runtime runs the
same manifests as processes (rewriting addresses and ports, which must differ
on one machine); each process reads them in exactly one place. Keeping the
names here makes that contract one import instead of string literals in four
packages.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from fedkube.errors import ConfigError

# --- every fedkube process -------------------------------------------------
JOB = "FEDKUBE_JOB"  # FLJob name
NAMESPACE = "FEDKUBE_NAMESPACE"
LOG_FORMAT = "FEDKUBE_LOG_FORMAT"  # "text" (default) or "json"
METRICS_PORT = "FEDKUBE_METRICS_PORT"  # Prometheus /metrics; 0 or unset = off

# Set by the local runtime only (``fedkube run``): every listening port of the process is one the
# OS picks (the port variables then only say which listeners are on), and the process writes the
# ports it bound to this file as JSON ({variable: port}) once it listens; a restarted process binds
# the ports the file already names (see fedkube.portfile).
PORTS_FILE = "FEDKUBE_PORTS_FILE"
# Set by the local runtime only (``fedkube run --bind``; 127.0.0.1 by default): the host that the listeners
# meant for other hosts bind (the server's gRPC, bulk, status and metrics ports, the sidecar's metrics), "[::]"
# for every interface. Unset (in a pod): every interface. Pod-local listeners stay on loopback whatever it says.
BIND_ADDRESS = "FEDKUBE_BIND_ADDRESS"

# --- operator ----------------------------------------------------------------
WATCH_NAMESPACES = "FEDKUBE_WATCH_NAMESPACES"  # comma-separated; empty = the whole cluster
HEALTH_PORT = "FEDKUBE_HEALTH_PORT"  # liveness endpoint (GET /healthz)

# --- server ------------------------------------------------------------------
SPEC_FILE = "FEDKUBE_SPEC_FILE"  # the FLJob spec as JSON (a mounted ConfigMap in a pod)
GRPC_PORT = "FEDKUBE_GRPC_PORT"  # the server's gRPC listening port
# The server's plain-TCP bulk data plane (tensor.proto, BulkRequest); 0 = off (gRPC only).
BULK_PORT = "FEDKUBE_BULK_PORT"
STATUS_PORT = "FEDKUBE_STATUS_PORT"  # the server's HTTP status endpoint (JSON)
TOKENS_DIR = "FEDKUBE_TOKENS_DIR"  # one file per site, named after the site, holding its token
CHECKPOINT_DIR = "FEDKUBE_CHECKPOINT_DIR"
OUTPUT_DIR = "FEDKUBE_OUTPUT_DIR"  # where the server delivers the trained model (fedkube.server.output)
TERMINATION_LOG = "FEDKUBE_TERMINATION_LOG"  # where the JSON summary goes (/dev/termination-log)
# Seconds an authenticated control stream may stay open without sending Register (default 30).
REGISTER_TIMEOUT = "FEDKUBE_REGISTER_TIMEOUT_SECONDS"

# --- job-cell sidecar --------------------------------------------------------
SITE = "FEDKUBE_SITE"  # this client's site name (also given to the trainer)
SERVER_ADDRESS = "FEDKUBE_SERVER_ADDRESS"  # host:port of the server's gRPC endpoint
# host:port of the server's bulk port; empty = tensors travel over gRPC only.
SERVER_BULK_ADDRESS = "FEDKUBE_SERVER_BULK_ADDRESS"
TOKEN_FILE = "FEDKUBE_TOKEN_FILE"  # this site's token (mounted into the sidecar only)
TRAINER_PORT = "FEDKUBE_TRAINER_PORT"  # where the sidecar listens for its trainer (localhost)
# "1": exit once the job's Stop and the trainer's final state were forwarded. Set by the
# local runtime only; in a pod the sidecar is a native sidecar that the kubelet stops.
SIDECAR_EXIT_ON_STOP = "FEDKUBE_SIDECAR_EXIT_ON_STOP"
# "0": relay the trainer's bulk bytes instead of handing it the connection to the server
# (fedkube.transfer.handoff; Linux only, on by default there). Read by the sidecar and the trainer
# SDK; either one set to "0" turns it off.
BULK_HANDOFF = "FEDKUBE_BULK_HANDOFF"
# Set for a remote site only, never for an in-cluster client: the site's policy over the job's terms (JSON,
# fedkube.terms.TermsPolicy; the FLSite builders and `fedkube join` set it), and, by `fedkube join` only, "1":
# a stop of this sidecar before the job's Stop is the site leaving (Leave, Withdrawn at the server). An FLSite's
# pod leaves through its site operator instead (POST /leave on the sidecar's status port), as a pod's stop may
# also be an eviction or a crash, which are not the site's decision.
SITE_POLICY = "FEDKUBE_SITE_POLICY"
SITE_CONTROLLED = "FEDKUBE_SITE_CONTROLLED"

# --- mutual TLS (server and sidecar; fedkube.security) ------------------------
# "enabled" (the default when unset) or "disabled" (the FLJob says security.tls: disabled). Enabled with no
# TLS_DIR is a configuration error: a process never falls back to plaintext on its own.
TLS = "FEDKUBE_TLS"
# Directory holding ca.crt (the job CA), tls.crt and tls.key (this party's certificate and key): the key
# names of a Kubernetes TLS Secret, which cert-manager also writes (fedkube.security.material).
TLS_DIR = "FEDKUBE_TLS_DIR"
# Sidecar only: the name the server's certificate must carry (default: the host of SERVER_ADDRESS).
# Lets a sidecar dial 127.0.0.1 (local mode, a port-forward) and still check the Service name.
TLS_SERVER_NAME = "FEDKUBE_TLS_SERVER_NAME"
# Server only, for jobs with remote sites: the directory holding the job CA (ca.crt, ca.key) and the join tokens'
# hashes (tokens.json); unset = no enrollment listener. Its port (TLS, server-authenticated only).
ENROLL_DIR = "FEDKUBE_ENROLL_DIR"
ENROLL_PORT = "FEDKUBE_ENROLL_PORT"
ENROLL_LEDGER_DIR = "FEDKUBE_ENROLL_LEDGER_DIR"
"""Where the server keeps its enrollment ledger (spent join tokens, current site serials); unset: the checkpoint
directory."""

# --- trainer (user script + trainer SDK) --------------------------------------
SIDECAR_ADDRESS = "FEDKUBE_SIDECAR_ADDRESS"  # host:port of the sidecar's local endpoint
WORKDIR = "FEDKUBE_WORKDIR"  # this client's own working directory (LESSONS.md 24)

DEFAULT_GRPC_PORT = 7070
DEFAULT_BULK_PORT = 8471
DEFAULT_STATUS_PORT = 8080
DEFAULT_METRICS_PORT = 9090
DEFAULT_TRAINER_PORT = 7071
# A site-controlled sidecar's /status (fedkube.siteview), read by the site operator (STATUS_PORT in its env).
DEFAULT_SITE_STATUS_PORT = 9092
DEFAULT_HEALTH_PORT = 8080


def parse_port(raw: str, what: str) -> int:
    """``raw`` as a TCP port number (0-65535); a ConfigError naming ``what`` and the fix otherwise."""
    try:
        port = int(raw.strip())
    except ValueError:
        raise ConfigError(f"{what}={raw!r} is not a port number; fix: set it to an integer from 0 to 65535") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"{what}={port} is out of range; fix: set it to an integer from 0 to 65535")
    return port


def json_document(
    environ: Mapping[str, str], name: str, limit_bytes: int, *, source: str, error: type[ConfigError] = ConfigError
) -> Any:
    """The JSON value in ``environ[name]``, None when unset or blank; at most ``limit_bytes`` are read.

    ``source`` names what renders it (e.g. the chart's ``policy:`` values) for the fix; ``error`` is the
    ConfigError subclass to raise.
    """
    text = environ.get(name, "").strip()
    if not text:
        return None
    if len(text.encode()) > limit_bytes:
        raise error(f"{name} holds more than {limit_bytes} bytes; fix: shorten {source}")
    try:
        return json.loads(text)
    except ValueError as exc:
        raise error(f"{name} is not JSON ({exc}); fix: let the chart render it from {source}") from None
