"""Shortening a text to a document's limit: the status documents (:mod:`fedkube.status`) and the site view
(:mod:`fedkube.siteview`) cut long messages rather than refuse them. Its own module, because the sidecar writes
the site view and starts without pydantic, which :mod:`fedkube.status` needs."""

from __future__ import annotations


def clip(text: str, limit: int) -> str:
    """``text`` shortened to ``limit`` characters, the cut marked with an ellipsis."""
    return text if len(text) <= limit else text[: max(0, limit - 1)] + "\u2026"


__all__ = ["clip"]
