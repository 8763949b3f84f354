"""One bounded GET of a pod's JSON document: the FL server's ``/status``, a site sidecar's ``/status``.

The answer comes from a pod, so it is read to at most ``limit`` + 1 bytes (one byte more: an oversized answer is
refused by the parser, not cut into something that parses) within ``timeout``; not answering is normal while the
pod starts or after it exited, so it is only logged at debug.
"""

from __future__ import annotations

import logging
import urllib.error
import urllib.request

log = logging.getLogger(__name__)


def get_document(url: str, *, limit: int, timeout: float, what: str) -> bytes | None:
    """The body at ``url`` (at most ``limit`` + 1 bytes), None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            body: bytes = resp.read(limit + 1)
            return body
    except (urllib.error.URLError, OSError, ValueError) as exc:
        log.debug("%s %s: no answer (%s)", what, url, exc)
        return None
