"""Moved to :mod:`fedkube.status`: the operator reads these documents too, and must not import fedkube.server."""

from fedkube.status import *  # noqa: F403
