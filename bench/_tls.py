"""TLS material for benchmarks: one job CA, the server's bundle and one site bundle per party, in a directory.

The same material and contexts fedkube's processes use (`JobTls.generate`, `pki.write_bundle`,
`material.files_in`): TLS 1.3, the job CA only, a site certificate per receiver.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

NAMESPACE, JOB = "bench", "bench-transfer"


def write_material(directory: Path, sites: list[str]) -> None:
    """The server's bundle in ``directory/server`` and each site's in ``directory/<site>``."""
    from fedkube.security import material, pki

    now = dt.datetime.now(dt.timezone.utc)
    tls = material.JobTls.generate(NAMESPACE, JOB, sites, pki.Validity(now - pki.CLOCK_SKEW, now + dt.timedelta(1)))
    pki.write_bundle(directory / "server", "tls", tls.ca.cert, tls.server)
    for site in sites:
        pki.write_bundle(directory / site, "tls", tls.ca.cert, tls.sites[site])


def server_tls(directory: str | None) -> Any:
    """The server's :class:`~fedkube.transfer.endpoints.ServerTls` from ``directory``; None (plaintext) for None."""
    if directory is None:
        return None
    from fedkube.security import material
    from fedkube.transfer.endpoints import ServerTls

    return ServerTls.from_files(material.files_in(Path(directory) / "server"), namespace=NAMESPACE, job=JOB)


def client_tls(directory: str | None, site: str) -> Any:
    """``site``'s :class:`~fedkube.transfer.endpoints.ClientTls` from ``directory``; None (plaintext) for None."""
    if directory is None:
        return None
    from fedkube.security import material, pki
    from fedkube.transfer.endpoints import ClientTls

    return ClientTls.from_files(material.files_in(Path(directory) / site), pki.server_dns_names(NAMESPACE, JOB)[0])
