"""A fetch's timeouts and retry policy, and the check that they fit each other, the TTL and the round."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, fields

from fedkube.transfer.wire import DEFAULT_CHUNK_BYTES, MAX_CHUNK_BYTES


@dataclass(frozen=True)
class FetchSettings:
    """Timeouts and retry policy of a fetch. Check them with :func:`validate_settings`.

    * ``chunk_timeout_s``: longest wait for the next chunk of a stream (or the
      first one) before the stream is cancelled and resumed.
    * ``idle_timeout_s``: give up when no byte arrived for this long, across
      retries; never a limit on the total duration.
    * ``max_attempts``: consecutive failed attempts without progress before giving up.
    * ``backoff_base_s`` / ``backoff_max_s``: retry delay ``base * 2**(n-1)``
      capped at max, with jitter (a uniform factor in [0.5, 1]).
    * ``max_chunk_bytes``: chunk size asked of the source (at most the wire limit).
    * ``max_checksum_retries``: refetches from 0 after a checksum mismatch.
    """

    chunk_timeout_s: float = 30.0
    idle_timeout_s: float = 120.0
    max_attempts: int = 8
    backoff_base_s: float = 0.2
    backoff_max_s: float = 10.0
    max_chunk_bytes: int = DEFAULT_CHUNK_BYTES
    max_checksum_retries: int = 2

    def backoff(self, failures: int) -> float:
        """Delay before retry number ``failures`` (1-based), with jitter."""
        exp = min(self.backoff_max_s, self.backoff_base_s * (2 ** min(failures - 1, 60)))
        return exp * random.uniform(0.5, 1.0)


@dataclass(frozen=True)
class SettingsProblem:
    """One inconsistent setting: which field, what is wrong, and the fix to apply."""

    field: str
    message: str
    fix: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}; fix: {self.fix}"


def validate_settings(
    settings: FetchSettings, *, ttl_s: float | None = None, round_timeout_s: float | None = None
) -> list[SettingsProblem]:
    """Every inconsistency between the fetch settings, the transaction TTL and the round timeout.

    Meant for job submission time (LESSONS.md 22), so a bad combination is
    reported with its fix before any transfer starts; empty means consistent.
    """
    s = settings
    out: list[SettingsProblem] = []
    for f in fields(s):
        value = getattr(s, f.name)
        if isinstance(value, float) and not (math.isfinite(value) and value > 0):
            out.append(SettingsProblem(f.name, f"must be a finite number > 0, got {value}", f"set {f.name} > 0"))
    if s.max_attempts < 1:
        out.append(SettingsProblem("max_attempts", f"must be >= 1, got {s.max_attempts}", "set max_attempts >= 1"))
    if s.max_checksum_retries < 0:
        out.append(
            SettingsProblem(
                "max_checksum_retries", "must be >= 0", "set max_checksum_retries to 0 or more (2 is usual)"
            )
        )
    if not 0 < s.max_chunk_bytes <= MAX_CHUNK_BYTES:
        out.append(
            SettingsProblem(
                "max_chunk_bytes",
                f"{s.max_chunk_bytes} is outside 1..{MAX_CHUNK_BYTES}",
                f"use {DEFAULT_CHUNK_BYTES} (the measured best) or any value up to {MAX_CHUNK_BYTES}",
            )
        )
    if s.idle_timeout_s <= s.chunk_timeout_s:
        out.append(
            SettingsProblem(
                "idle_timeout_s",
                f"idle timeout {s.idle_timeout_s}s is not above the per-chunk timeout {s.chunk_timeout_s}s, "
                "so a single slow chunk ends the whole transfer without a retry",
                f"set idle_timeout_s to at least 2x chunk_timeout_s (e.g. {2 * s.chunk_timeout_s:g})",
            )
        )
    if s.backoff_max_s < s.backoff_base_s:
        out.append(
            SettingsProblem(
                "backoff_max_s",
                f"backoff_max_s {s.backoff_max_s}s is below backoff_base_s {s.backoff_base_s}s",
                "set backoff_max_s >= backoff_base_s",
            )
        )
    if s.backoff_max_s >= s.idle_timeout_s:
        out.append(
            SettingsProblem(
                "backoff_max_s",
                f"a retry may wait {s.backoff_max_s}s, not less than the idle timeout {s.idle_timeout_s}s, "
                "so the transfer is declared stalled while it is only backing off",
                f"set backoff_max_s below idle_timeout_s (e.g. {s.idle_timeout_s / 4:g})",
            )
        )
    if ttl_s is not None:
        if ttl_s <= s.idle_timeout_s:
            out.append(
                SettingsProblem(
                    "ttl_s",
                    f"transaction TTL {ttl_s}s is not above the idle timeout {s.idle_timeout_s}s: the publisher "
                    "may drop the tensors while a receiver is still allowed to resume",
                    f"set the TTL well above idle_timeout_s (e.g. {4 * s.idle_timeout_s:g}s or the round timeout)",
                )
            )
        if round_timeout_s is not None and ttl_s < round_timeout_s:
            out.append(
                SettingsProblem(
                    "ttl_s",
                    f"transaction TTL {ttl_s}s is shorter than the round timeout {round_timeout_s}s: a slow but "
                    "healthy client loses the model mid-round (LESSONS.md 7)",
                    "derive the TTL from the round timeout (ttl_s >= round_timeout_s)",
                )
            )
    if round_timeout_s is not None and round_timeout_s <= s.idle_timeout_s:
        out.append(
            SettingsProblem(
                "round_timeout_s",
                f"round timeout {round_timeout_s}s is not above the idle timeout {s.idle_timeout_s}s, "
                "so a stalled transfer is never detected before the round ends",
                "lower idle_timeout_s or raise the round timeout",
            )
        )
    return out
