"""Errors of the transfer layer.

Every error names the transaction, ref and receiver it concerns (whichever are
known) and says what to do. ``retryable`` tells the fetcher whether trying the
same request again (after a backoff, resuming at the last good offset) can help.
"""

from __future__ import annotations

from fedkube.errors import FedkubeError


def _ids(transaction_id: str | None, ref_id: str | None, receiver: str | None) -> str:
    parts = []
    if transaction_id is not None:
        parts.append(f"transaction {transaction_id!r}")
    if ref_id is not None:
        parts.append(f"ref {ref_id!r}")
    if receiver is not None:
        parts.append(f"receiver {receiver!r}")
    return ", ".join(parts) if parts else "transfer"


class TransferError(FedkubeError):
    """Base of every transfer failure; the message starts with the ids it concerns."""

    retryable = False

    def __init__(
        self,
        problem: str,
        *,
        transaction_id: str | None = None,
        ref_id: str | None = None,
        receiver: str | None = None,
    ) -> None:
        self.problem = problem
        self.transaction_id = transaction_id
        self.ref_id = ref_id
        self.receiver = receiver
        super().__init__(f"{_ids(transaction_id, ref_id, receiver)}: {problem}")


class InvalidRefError(TransferError):
    """A tensor reference is malformed or inconsistent (dtype, shape, length, checksum)."""


class InvalidRequestError(TransferError):
    """A fetch/complete request is malformed (bad id, chunk size above the limit, wrong buffer)."""


class RefNotFoundError(TransferError):
    """The transaction or the ref is unknown to the source that was asked."""


class TransactionExpiredError(TransferError):
    """The transaction was released (TTL expired, or released by its publisher) before the fetch."""


class TransactionExistsError(TransferError):
    """A transaction id was published twice with different tensors."""


class OffsetOutOfRangeError(TransferError):
    """A fetch asked for an offset beyond the tensor's length."""


class ReceiverNotExpectedError(TransferError):
    """The receiver is not one of the transaction's expected receivers."""


class ChecksumMismatchError(TransferError):
    """The received bytes do not match the ref's checksum, even after refetching."""


class TransferStalledError(TransferError):
    """No progress within the idle timeout, or too many failed attempts without progress."""


class TransferAbortedError(TransferError):
    """The caller's abort event was set while the transfer was in progress."""


class StreamBrokenError(TransferError):
    """A chunk stream broke or ended early; the fetcher resumes from its last good offset."""

    retryable = True


class ChunkTimeoutError(StreamBrokenError):
    """No chunk arrived within the per-chunk timeout; the stream was cancelled."""


class ProtocolError(StreamBrokenError):
    """The source sent a chunk at the wrong offset, an empty chunk, or past the end."""


class SourceUnavailableError(StreamBrokenError):
    """The source could not be reached, or failed in a way that a retry may fix."""
