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


class ReceiveWithoutSendError(SDKError):
    """``receive()`` (or ``is_running()``) was called while the task last received is still unanswered.

    The server waits for that task's result until the round's deadline; a
    second ``receive()`` would block that long and the site would then be
    dropped from the round as a straggler.
    """


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
    """An ``FLModel`` holds something that cannot be sent (params that are not arrays or tensors, a
    ``num_examples`` that is not a count) or a metric name is reserved."""
