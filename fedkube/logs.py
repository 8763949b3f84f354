"""One log format for fedkube's processes: text or JSON lines, with job, site, round, client and transfer ids.

Each process calls :func:`configure_logging` once at startup::

    configure_logging("server", job="mnist", fmt=log_format_from_env(os.environ))

and keeps using ``logging.getLogger(__name__)`` everywhere. The ids come from
three places, the first one set wins:

1. ``extra={"round": 3, "client": "site-a", "transfer": "tx-..."}`` on one call;
2. :func:`log_context` for a block of code (a round, a transfer) in the current
   thread or asyncio task;
3. the process-wide ``job``/``site``/``component`` given to configure_logging.

Why a context variable and a handler filter rather than ``LoggerAdapter``:
adapters must be created and passed to every call site, which fights the
house rule of module-level ``getLogger(__name__)`` loggers, and records from
libraries (grpc, kopf) would carry no ids at all. The filter sits on the one
handler, so every record that reaches it gets the fields. Context variables do
not follow work into thread pools: code running on a worker thread sets its
own :func:`log_context` or passes ``extra``.

Expected conditions (a client reconnecting, a straggler excluded, a retried
chunk) are logged without stack traces: records below ERROR never print a
traceback, only a one-line ``Type: message`` summary of the exception;
:func:`expected` logs such a line at WARNING. Tracebacks are for ERROR records
(bugs and unexpected failures).

Calling :func:`configure_logging` again replaces its handler instead of adding
a second one, so no line is ever printed twice (LESSONS.md 21).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import sys
import threading
from collections.abc import Iterator, Mapping
from datetime import datetime, timezone
from typing import Any, TextIO

from fedkube import envvars
from fedkube.errors import ConfigError

FORMATS = ("text", "json")
#: Record attributes carrying the ids, in output order.
ID_FIELDS = ("component", "job", "site", "round", "client", "transfer")

_round: contextvars.ContextVar[int | None] = contextvars.ContextVar("fedkube_log_round", default=None)
_client: contextvars.ContextVar[str | None] = contextvars.ContextVar("fedkube_log_client", default=None)
_transfer: contextvars.ContextVar[str | None] = contextvars.ContextVar("fedkube_log_transfer", default=None)

_EXPECTED = "fedkube_expected"
_lock = threading.Lock()
_handler: logging.Handler | None = None


@contextlib.contextmanager
def log_context(*, round: int | None = None, client: str | None = None,
                transfer: str | None = None) -> Iterator[None]:
    """Attach ``round``/``client``/``transfer`` ids to every record logged in this block (this thread or task).

    Ids left as None keep the value of an enclosing block.
    """
    pending: list[tuple[contextvars.ContextVar[Any], Any]] = [
        (var, value) for var, value in ((_round, round), (_client, client), (_transfer, transfer))
        if value is not None
    ]
    tokens = [(var, var.set(value)) for var, value in pending]
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


class ContextFilter(logging.Filter):
    """Sets the id attributes (:data:`ID_FIELDS`) on every record; values already on the record win."""

    def __init__(self, component: str, job: str, site: str | None) -> None:
        super().__init__()
        self.component, self.job, self.site = component, job, site

    def filter(self, record: logging.LogRecord) -> bool:
        defaults: dict[str, Any] = {
            "component": self.component, "job": self.job, "site": self.site,
            "round": _round.get(), "client": _client.get(), "transfer": _transfer.get(),
        }
        for key, value in defaults.items():
            if getattr(record, key, None) is None:
                setattr(record, key, value)
        if _peer_sent_garbage(record):
            # gRPC logs a message it cannot parse at ERROR with a traceback and answers the caller
            # INTERNAL. For a process listening on the network that is an expected condition (a broken
            # or hostile peer), not a fedkube bug: one warning line, the parse error in it.
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            setattr(record, _EXPECTED, True)
        return True


def _peer_sent_garbage(record: logging.LogRecord) -> bool:
    exc = record.exc_info[1] if record.exc_info else None
    return (record.name == "grpc._common" and exc is not None and type(exc).__name__ == "DecodeError"
            and type(exc).__module__.startswith("google.protobuf"))


def _ids(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k in ID_FIELDS if (v := getattr(record, k, None)) not in (None, "")}


def _exception_summary(record: logging.LogRecord) -> str | None:
    if not record.exc_info or record.exc_info[1] is None:
        return None
    exc = record.exc_info[1]
    return f"{type(exc).__name__}: {exc}"


def _wants_traceback(record: logging.LogRecord) -> bool:
    return bool(record.exc_info) and record.levelno >= logging.ERROR and not getattr(record, _EXPECTED, False)


def _timestamp(record: logging.LogRecord) -> str:
    when = datetime.fromtimestamp(record.created, tz=timezone.utc)
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class TextFormatter(logging.Formatter):
    """``<time> <LEVEL> <logger> [component job=.. round=..] message``; tracebacks only at ERROR and above."""

    def format(self, record: logging.LogRecord) -> str:
        ids = _ids(record)
        component = ids.pop("component", "")
        tags = " ".join([str(component), *(f"{k}={v}" for k, v in ids.items())]).strip()
        line = f"{_timestamp(record)} {record.levelname} {record.name} [{tags}] {record.getMessage()}"
        summary = _exception_summary(record)
        if summary is not None:
            if _wants_traceback(record):
                line += "\n" + self.formatException(record.exc_info)  # type: ignore[arg-type]
            else:
                line += f" ({summary})"
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, the ids present, msg, and error/traceback when any."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {"time": _timestamp(record), "level": record.levelname, "logger": record.name}
        doc.update(_ids(record))
        doc["msg"] = record.getMessage()
        summary = _exception_summary(record)
        if summary is not None:
            doc["error"] = summary
            if _wants_traceback(record):
                doc["traceback"] = self.formatException(record.exc_info)  # type: ignore[arg-type]
        if record.stack_info:
            doc["stack"] = self.formatStack(record.stack_info)
        return json.dumps(doc, ensure_ascii=False, default=str)


def configure_logging(component: str, *, job: str, site: str | None = None, fmt: str = "text",
                      stream: TextIO | None = None, level: int = logging.INFO) -> logging.Handler:
    """Send every log record of this process, with ids, to ``stream`` (default stderr) in ``fmt``.

    ``component`` is the process kind (server, sidecar, operator, runtime);
    ``job`` and ``site`` are its FL job and (for a sidecar) site. Calling it
    again replaces the handler installed by the previous call. Returns the
    handler, e.g. to remove it in a test.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"log format must be one of {list(FORMATS)}, got {fmt!r}; "
                          f"fix {envvars.LOG_FORMAT} or the --log-format flag")
    if not component:
        raise ValueError("configure_logging() needs the component name (server, sidecar, operator, ...)")
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(ContextFilter(component, job, site))
    root = logging.getLogger()
    global _handler
    with _lock:
        previous, _handler = _handler, handler
        if previous is not None:
            root.removeHandler(previous)
        root.addHandler(handler)
        root.setLevel(level)
    if previous is not None:
        previous.close()
    return handler


def unconfigure_logging() -> None:
    """Remove the handler :func:`configure_logging` installed (tests; a process keeps it until exit)."""
    global _handler
    with _lock:
        previous, _handler = _handler, None
        if previous is not None:
            logging.getLogger().removeHandler(previous)
    if previous is not None:
        previous.close()


def expected(logger: logging.Logger, msg: str, *args: object, exc: BaseException | None = None,
             level: int = logging.WARNING, extra: Mapping[str, Any] | None = None) -> None:
    """Log an expected condition: one line, the exception (if any) as ``Type: message``, never a traceback."""
    fields = dict(extra or {})
    fields[_EXPECTED] = True
    exc_info = (type(exc), exc, exc.__traceback__) if exc is not None else None
    logger.log(level, msg, *args, exc_info=exc_info, extra=fields, stacklevel=2)


def log_format_from_env(env: Mapping[str, str]) -> str:
    """``FEDKUBE_LOG_FORMAT`` (text when unset); ConfigError for anything but text or json."""
    value = env.get(envvars.LOG_FORMAT, "").strip().lower() or "text"
    if value not in FORMATS:
        raise ConfigError(f"{envvars.LOG_FORMAT} must be text or json, got {env.get(envvars.LOG_FORMAT)!r}")
    return value
