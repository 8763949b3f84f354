"""Errors the trainer SDK raises; each says what went wrong and how to fix it."""

from __future__ import annotations

from fedkube.errors import FedkubeError


class SDKError(FedkubeError):
    """Base of every error the trainer SDK raises on purpose."""


class NotInitializedError(SDKError):
    """An SDK call came before ``fk.init()``."""


class SidecarUnreachableError(SDKError):
    """The sidecar's local endpoint did not answer."""


class SendWithoutReceiveError(SDKError):
    """``send()`` was called without a task to answer (no ``receive()`` first, or the task was already answered)."""


class JobStoppedError(SDKError):
    """The job ended for this site: ``receive()`` after it, or ``send()`` of a task held while it stopped."""


class ResultRejectedError(SDKError):
    """The server refused the result (e.g. reason ``InvalidResult``: names, dtypes or shapes differ)."""

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class ResultTransferError(SDKError):
    """The server's download of a result never started, or stalled past the idle timeout."""


class InvalidParamsError(SDKError):
    """``FLModel.params`` holds something that cannot be sent (e.g. not an array or tensor)."""
