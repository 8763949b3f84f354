"""Whether a process speaks mutual TLS, and with which files: FEDKUBE_TLS / _TLS_DIR / _TLS_SERVER_NAME, read once.

The server's and the sidecar's configuration call :meth:`TlsSettings.from_env`; nothing else reads these
variables. TLS is on unless the job says ``security.tls: disabled`` (FEDKUBE_TLS=disabled): enabled without a
readable directory is a :class:`~fedkube.errors.ConfigError`, never a quiet fall back to plaintext.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from fedkube import envvars
from fedkube.errors import ConfigError
from fedkube.security.material import files_in
from fedkube.security.pki import TlsFiles

ENABLED = "enabled"
DISABLED = "disabled"


@dataclass(frozen=True)
class TlsSettings:
    """``files`` is None when TLS is off; ``server_name`` is the name a sidecar checks on the server certificate
    ("" for the server itself)."""

    files: TlsFiles | None
    server_name: str = ""

    @property
    def enabled(self) -> bool:
        return self.files is not None

    @classmethod
    def disabled(cls) -> TlsSettings:
        return cls(files=None)

    @classmethod
    def from_env(cls, env: Mapping[str, str], *, server_address: str = "") -> TlsSettings:
        """The TLS settings in ``env``. ``server_address`` (host:port, sidecars only) gives the default server
        name, its host. Raises ConfigError naming the variable and the fix."""
        mode = env.get(envvars.TLS, "").strip().lower() or ENABLED
        if mode not in (ENABLED, DISABLED):
            raise ConfigError(
                f"{envvars.TLS}={mode!r} must be {ENABLED!r} or {DISABLED!r}; fix: leave it unset (TLS on) or set "
                f"{DISABLED!r} only for a job whose spec says security.tls: disabled"
            )
        if mode == DISABLED:
            return cls.disabled()
        raw = env.get(envvars.TLS_DIR, "").strip()
        if not raw:
            raise ConfigError(
                f"TLS is enabled ({envvars.TLS} is {env.get(envvars.TLS) or 'unset'}) but {envvars.TLS_DIR} is not "
                f"set; fix: point {envvars.TLS_DIR} at the directory of this party's ca.crt, tls.crt and tls.key "
                f"(the mounted TLS Secret), or set {envvars.TLS}={DISABLED} for a job with security.tls: disabled"
            )
        directory = Path(raw)
        files = files_in(directory)
        missing = [str(p) for p in (files.ca, files.cert, files.key) if not os.access(p, os.R_OK)]
        if missing:
            raise ConfigError(
                f"{envvars.TLS_DIR}={raw!r} lacks readable TLS files {missing}; fix: mount this party's TLS Secret "
                f"(keys ca.crt, tls.crt, tls.key) there, readable by this process"
            )
        name = env.get(envvars.TLS_SERVER_NAME, "").strip()
        if not name and server_address:
            name = server_address.rpartition(":")[0].strip("[]")
        return cls(files=files, server_name=name)


__all__ = ["DISABLED", "ENABLED", "TlsSettings"]
