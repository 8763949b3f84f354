"""Ports a process chose itself, reported to the local runtime that started it.

On one machine a port reserved in advance (bind port 0, close, hand the number
to the child) can be taken by any other socket before the child binds it; with
thousands of sockets open (a 100-client job) that happens. So under ``fedkube
run`` (``FEDKUBE_PORTS_FILE`` set) a process binds every listener to a port the
OS picks and then writes ``{variable: port}`` to that file, and the runtime
routes the other processes' addresses to what was written. The file is also
what a restarted process binds again: its peers (the trainer dialling its
sidecar) keep the address they were given, as they would in a pod.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

from fedkube import envvars
from fedkube.errors import ConfigError


def path_from_env(env: Mapping[str, str] | None = None) -> Path | None:
    """The ports file the runtime asked for (``FEDKUBE_PORTS_FILE``), or None outside the local runtime."""
    raw = (os.environ if env is None else env).get(envvars.PORTS_FILE, "").strip()
    return Path(raw) if raw else None


def chosen(path: Path | None, var: str, configured: int) -> int:
    """The port to bind for the listener ``var``.

    ``configured`` without a ports file; with one, the port the file already
    names for ``var`` (this process is a restart), else 0: the OS picks.
    """
    if path is None:
        return configured
    return (read(path) or {}).get(var, 0)


def report(path: Path | None, ports: Mapping[str, int]) -> None:
    """Write the bound ``ports`` (variable -> port) to ``path`` in one atomic step; nothing without a path."""
    if path is None:
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps({k: int(v) for k, v in ports.items()}, sort_keys=True))
        os.replace(tmp, path)
    except OSError as exc:
        raise ConfigError(
            f"cannot write the bound ports to {path} ({envvars.PORTS_FILE}): {exc.strerror or exc}; "
            "fix: unset it outside fedkube run, or make its directory writable"
        ) from None


def read(path: Path) -> dict[str, int] | None:
    """The ports a process reported in ``path``; None while it has not (or wrote something else)."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict):
        return None
    return {str(k): int(v) for k, v in doc.items() if isinstance(v, int) and 0 < v <= 65535}
