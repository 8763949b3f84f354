"""Revoked sites on the server: who is refused now, and the watch that learns of new revocations.

The operator writes ``spec.revokedSites`` into the spec ConfigMap the server mounts (``FEDKUBE_SPEC_FILE``); the
kubelet swaps a changed ConfigMap into the pod within its sync period (about a minute by default), and
:class:`SpecWatch` re-reads the file every :data:`POLL_S`. So a revocation takes effect within the kubelet's
sync period plus a few seconds, without a new CA, a restart or a new mount.

The set only grows while the server runs: a name that disappears from the file (an edit the operator should
not have propagated, or a hand-edited spec) does not re-admit the site. :meth:`RevokedSites.add` returns the
newly revoked names, which the server acts on once: refuse from now on (``Revoked``, counted in
``fedkube_server_rejected_connections_total``), close the site's live stream and fail it for the job.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

import yaml

from fedkube.protocol import REVOKED
from fedkube.spec.revocation import FIELD

log = logging.getLogger(__name__)

__all__ = ["POLL_S", "REVOKED", "RevokedSites", "SpecWatch", "read_revoked"]

#: How often the spec file is read again. The kubelet's sync period dominates the latency; this keeps the
#: server's share of it small at the cost of one small file read.
POLL_S = 2.0


class RevokedSites:
    """The names refused from now on; thread-safe, only grows."""

    def __init__(self, initial: Iterable[str] = ()) -> None:
        self._lock = threading.Lock()
        self._names: frozenset[str] = frozenset(initial)

    def __contains__(self, site: object) -> bool:
        return site in self._names  # a frozenset swapped whole: readers need no lock

    @property
    def names(self) -> frozenset[str]:
        return self._names

    def add(self, names: Iterable[str]) -> list[str]:
        """Revoke ``names``; returns those not revoked before, sorted."""
        with self._lock:
            new = sorted(set(names) - self._names)
            if new:
                self._names = self._names | frozenset(new)
        return new

    @staticmethod
    def message(site: str) -> str:
        return (f"site {site!r} is revoked (spec.revokedSites of the job): every connection of it is refused; "
                "fix: if this is the site's own sidecar, ask the job owner (revocation is final for the FLJob: the "
                "site takes part again only in a new FLJob)")


def read_revoked(path: Path) -> list[str] | None:
    """``spec.revokedSites`` of the FLJob file at ``path``; None when it cannot be read now (half-written)."""
    try:
        doc = yaml.safe_load(path.read_text()) if path.suffix in (".yaml", ".yml") else json.loads(path.read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return None
    spec = doc.get("spec") if isinstance(doc, dict) else None
    names = spec.get(FIELD) if isinstance(spec, dict) else None
    if names is None:
        return []
    return [n for n in names if isinstance(n, str)] if isinstance(names, list) else None


class SpecWatch:
    """Re-reads the spec file every ``interval`` s and calls ``on_revoked(site)`` for each newly revoked site."""

    def __init__(self, path: Path, revoked: RevokedSites, on_revoked: Callable[[str], None], *, job: str,
                 interval: float = POLL_S) -> None:  # fmt: skip
        self._path = path
        self._revoked = revoked
        self._on_revoked = on_revoked
        self._job = job
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fedkube-revocation", daemon=True)

    def start(self) -> SpecWatch:
        """Read once now (a restarted server refuses what the file names before it admits anyone), then watch."""
        self.poll()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def poll(self) -> list[str]:
        """One read; the newly revoked sites (already acted on)."""
        names = read_revoked(self._path)
        if names is None:
            return []
        new = self._revoked.add(names)
        for site in new:
            log.warning("job %s: site %s revoked (spec.revokedSites): refusing it from now on", self._job, site)
            self._on_revoked(site)
        return new

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.poll()
            except Exception:  # a watch that dies would silently stop revoking
                log.exception("job %s: reading %s for revoked sites failed; trying again", self._job, self._path)
