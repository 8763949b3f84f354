"""The site operator's reading of its sidecar: the site's view (fedkube.siteview) live, or as the final word.

While the client pod runs, the sidecar serves the view on its ``site-status`` port (``GET /status``), as the
server serves its status document to the FLJob operator, and is read the same way: one bounded request, the
answer parsed as untrusted input (size limit, strict fields) and ignored when it is not a view. Once the pod
ended, the sidecar's termination message holds its last view (a refusal of the job's terms, say). ``POST /leave``
with the site's token is the site operator's one instruction to it: the FLSite was deleted, leave the job.
"""

from __future__ import annotations

import logging
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any

from fedkube import envvars
from fedkube.operator import naming
from fedkube.operator.probe import get_document
from fedkube.operator.site.builders import SITE_STATUS_PORT_NAME
from fedkube.siteview import SITE_VIEW_LIMIT, SiteView, SiteViewError

log = logging.getLogger(__name__)

TIMEOUT_S = 2.0


def default_sidecar_url(pod: Mapping[str, Any]) -> str | None:
    """``http://{pod IP}:{site-status port}`` of the client pod's sidecar, None while it has no IP."""
    ip = (pod.get("status") or {}).get("podIP")
    if not ip:
        return None
    port = envvars.DEFAULT_SITE_STATUS_PORT
    spec = pod.get("spec") or {}
    for container in [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]:
        for entry in container.get("ports") or []:
            if entry.get("name") == SITE_STATUS_PORT_NAME:
                port = int(entry["containerPort"])
    host = f"[{ip}]" if ":" in str(ip) else str(ip)
    return f"http://{host}:{port}"


def live_view(base_url: str | None) -> SiteView | None:
    """The running sidecar's view, None when it does not answer (yet) or answers something else."""
    if not base_url:
        return None
    body = get_document(f"{base_url}/status", limit=SITE_VIEW_LIMIT, timeout=TIMEOUT_S, what="site status")
    if body is None:
        return None
    try:
        return SiteView.from_json(body)
    except SiteViewError as exc:
        log.warning("site status %s: not a site view: %s", base_url, exc)
        return None


def final_view(pod: Mapping[str, Any]) -> SiteView | None:
    """The sidecar's termination message, once it ended (this run's, else the last restart's), as a view."""
    status = pod.get("status") or {}
    for entry in [*(status.get("initContainerStatuses") or []), *(status.get("containerStatuses") or [])]:
        if entry.get("name") != naming.SIDECAR_CONTAINER:
            continue
        for key in ("state", "lastState"):
            message = ((entry.get(key) or {}).get("terminated") or {}).get("message")
            if message:
                try:
                    return SiteView.from_json(str(message))
                except SiteViewError as exc:
                    log.warning("pod %s: the sidecar's termination message is not a site view: %s",
                                (pod.get("metadata") or {}).get("name"), exc)
    return None


def ask_to_leave(base_url: str | None, token: str, message: str) -> bool:
    """Tell the sidecar the site leaves the job (it sends Leave); True when it took the instruction."""
    if not base_url:
        return False
    request = urllib.request.Request(f"{base_url}/leave", data=message.encode()[:1024], method="POST",
                                     headers={"Authorization": f"Bearer {token}"})  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as resp:
            return int(resp.status) in (200, 202)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        log.warning("site sidecar %s: could not ask it to leave: %s", base_url, exc)
        return False
