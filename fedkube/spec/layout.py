"""Where fedkube puts things inside its pods.

The builders mount these paths and name these volumes; the spec checks keep
user volumes and env vars from colliding with them. One module, so the two can
never disagree.
"""

from __future__ import annotations

from fedkube import envvars

# Volume names starting with this prefix belong to fedkube.
RESERVED_VOLUME_PREFIX = "fedkube-"

SPEC_DIR = "/etc/fedkube/spec"
SPEC_FILE_NAME = "job.json"
TOKENS_DIR = "/var/run/secrets/fedkube/tokens"
TOKEN_DIR = "/var/run/secrets/fedkube/token"
TOKEN_FILE_NAME = "token"
# The server's and each sidecar's TLS Secret (fedkube.security.material.MOUNT_PATH, not imported: the spec
# stays free of the PKI; a test keeps the two equal).
TLS_DIR = "/var/run/secrets/fedkube/tls"
CHECKPOINT_DIR = "/var/lib/fedkube/checkpoint"
WORKDIR = "/var/lib/fedkube/work"
TMP_DIR = "/tmp"
TERMINATION_LOG = "/dev/termination-log"

# A user mount at or below one of these would hide what fedkube mounts there.
RESERVED_MOUNT_ROOTS = ("/etc/fedkube", "/var/run/secrets/fedkube", "/var/lib/fedkube", TMP_DIR)

# Environment variables the builders set; a user value would silently lose (or win) against them.
RESERVED_ENV = frozenset(
    {
        envvars.JOB,
        envvars.NAMESPACE,
        envvars.SPEC_FILE,
        envvars.GRPC_PORT,
        envvars.STATUS_PORT,
        envvars.TOKENS_DIR,
        envvars.CHECKPOINT_DIR,
        envvars.OUTPUT_DIR,
        envvars.TERMINATION_LOG,
        envvars.METRICS_PORT,
        envvars.SITE,
        envvars.SERVER_ADDRESS,
        envvars.TOKEN_FILE,
        envvars.TRAINER_PORT,
        envvars.SIDECAR_ADDRESS,
        envvars.WORKDIR,
        envvars.TLS,
        envvars.TLS_DIR,
        envvars.TLS_SERVER_NAME,
    }
)

# The server's Service is "{job}-server" and must be a 63-character DNS label.
SERVER_SUFFIX = "-server"
MAX_JOB_NAME = 63 - len(SERVER_SUFFIX)
