"""Process-wide hooks: an unhandled exception is reported to the sidecar before the process dies."""

from __future__ import annotations

import sys
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any

from fedkube.errors import ConfigError
from fedkube.wire.v1 import control_pb2

if TYPE_CHECKING:
    from fedkube.trainer_sdk._session import Session

ExceptHook = Callable[[type[BaseException], BaseException, TracebackType | None], Any]


def failure_kind(exc: BaseException) -> int:
    """The FailureKind an unhandled exception maps to."""
    if isinstance(exc, ConfigError):
        return control_pb2.FAILURE_KIND_CONFIG_ERROR
    if isinstance(exc, KeyboardInterrupt):
        return control_pb2.FAILURE_KIND_ABORTED
    return control_pb2.FAILURE_KIND_EXCEPTION


def install_hooks(get: Callable[[], Session | None]) -> ExceptHook:
    """Wrap ``sys.excepthook`` so an unhandled exception is reported before the process dies."""
    previous = sys.excepthook

    def hook(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> Any:
        session = get()
        if session is not None:
            kind = failure_kind(exc)
            session.report(
                control_pb2.TRAINER_PHASE_FAILED, kind, f"{exc_type.__name__}: {exc}", exit_code=1
            )
        return previous(exc_type, exc, tb)

    sys.excepthook = hook
    return previous
