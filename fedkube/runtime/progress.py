"""Progress of a local run: the server's HTTP status endpoint, polled, shown with rich.

The display reads only the status document the server serves for the operator
(``GET /status``), with the operator's model and bounds
(:class:`fedkube.status.JobStatus`), so what ``fedkube run`` shows is what
Kubernetes will show. :func:`parse_status` turns a document into the view and
is tolerant of missing fields, because the run's final update comes from the
termination summary (``fedkube.runtime.local.summary_document``), which has
fewer fields than the status document.
"""

from __future__ import annotations

import logging
import threading
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text

from fedkube.status import STATUS_LIMIT, EvaluationPoint, JobStatus, SummaryError

logger = logging.getLogger(__name__)

# Metrics a line of the evaluation curve shows (the rest are in the status document and --json).
MAX_SHOWN_METRICS = 4

READY_STATES = frozenset({"registered", "training", "uploading", "done", "ready", "idle"})


@dataclass(frozen=True)
class StatusView:
    """What the display needs from one status document."""

    phase: str
    round: int
    rounds: int | None
    clients_ready: int
    clients_total: int
    bytes_transferred: int | None
    metrics: dict[str, float]  # the last completed round's aggregated metrics
    # (round, metrics, sites) of the newest evaluations (spec.evaluation), oldest first.
    evaluation: tuple[tuple[int, dict[str, float], int], ...] = ()


def parse_status(doc: Mapping[str, Any]) -> StatusView:
    """Pick the display's fields out of the server's status document (tolerant of missing fields)."""
    clients = doc.get("clients") or {}
    states: list[str] = []
    if isinstance(clients, Mapping):
        items: list[Any] = list(clients.values())
    elif isinstance(clients, list):
        items = clients
    else:
        items = []
    for item in items:
        state = item.get("state") if isinstance(item, Mapping) else item
        states.append(str(state or "").lower())
    ready = _int(doc.get("clientsReady", doc.get("clients_ready")))
    total = _int(doc.get("clientsTotal", doc.get("clients_total")))
    return StatusView(
        phase=str(doc.get("phase") or "?"),
        round=_int(doc.get("round")) or 0,
        rounds=_int(doc.get("rounds", doc.get("total_rounds"))),
        clients_ready=ready if ready is not None else sum(s in READY_STATES for s in states),
        clients_total=total if total is not None else len(states),
        bytes_transferred=_bytes(doc),
        metrics=_metrics(doc.get("metrics")),
        evaluation=_evaluation(doc.get("evaluation")),
    )


def _evaluation(value: Any) -> tuple[tuple[int, dict[str, float], int], ...]:
    if not isinstance(value, list):
        return ()
    points = [p for p in value if isinstance(p, Mapping) and _int(p.get("round")) is not None]
    return tuple((_int(p.get("round")) or 0, _metrics(p.get("metrics")), _int(p.get("sites")) or 0) for p in points)


def evaluation_line(round_: int, metrics: Mapping[str, float], sites: int, examples: int | None = None) -> str:
    """One point of the evaluation curve, e.g. ``evaluation after round 2: acc 0.9133, loss 0.31 (2 sites)``."""
    first = list(metrics.items())[:MAX_SHOWN_METRICS]
    shown = ", ".join(f"{name} {value:.4g}" for name, value in first) or "no metrics"
    on = f"{sites} site(s)" + (f", {examples} examples" if examples is not None else "")
    return f"evaluation after round {round_}: {shown} ({on})"


def evaluation_lines(points: Sequence[EvaluationPoint]) -> list[str]:
    """The evaluation curve of a run's summary, one indented line per evaluation."""
    return ["  " + evaluation_line(p.round, p.metrics, p.sites, p.examples) for p in points]


def _metrics(value: Any) -> dict[str, float]:
    if not isinstance(value, Mapping):
        return {}
    return {str(k): float(v) for k, v in value.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return None


def _bytes(doc: Mapping[str, Any]) -> int | None:
    """Sum of the top-level (or ``transfer``) fields whose name says bytes."""
    total: int | None = None
    transfer = doc.get("transfer")
    sources: list[Mapping[str, Any]] = [doc, transfer if isinstance(transfer, Mapping) else {}]
    for source in sources:
        for key, value in source.items():
            if "bytes" in key.lower() and (n := _int(value)) is not None:
                total = (total or 0) + n
    return total


# Never through an HTTP proxy from the environment: the URL is always localhost.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def fetch_status(url: str, timeout_s: float = 1.0) -> JobStatus | None:
    """GET the server's status document; None while it is not answering (starting, exiting) or answers garbage.

    Read with the operator's model and bounds (fedkube.status), so the display shows exactly what the operator
    would accept, and a runaway answer can neither stall nor kill the display's thread.
    """
    try:
        with _OPENER.open(url, timeout=timeout_s) as response:
            body = response.read(STATUS_LIMIT + 1)
    except (OSError, urllib.error.URLError, ValueError):
        return None
    try:
        return JobStatus.from_json(body)
    except SummaryError as exc:
        logger.debug("status %s: unreadable document: %s", url, exc)
        return None


def fetch_bytes_total(url: str, timeout_s: float = 1.0) -> int | None:
    """Sum of every ``*_bytes_total`` counter on a Prometheus text endpoint; None when unreachable."""
    try:
        with _OPENER.open(url, timeout=timeout_s) as response:
            text = response.read().decode("utf-8", errors="replace")
    except OSError:
        return None
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name.endswith("_bytes_total"):
            # The value is the last field when labels contain spaces; a timestamp never follows here.
            try:
                total += float(line.rsplit(" ", 1)[-1])
            except ValueError:
                continue
    return int(total)


def _human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover - loop always returns


class ConsoleSink:
    """Process output through a rich console, so lines scroll above the live progress bar."""

    def __init__(self, console: Console) -> None:
        self._console = console
        self._lock = threading.Lock()

    def emit(self, prefix: str, line: str) -> None:
        text = Text(f"[{prefix}] ", style="dim")
        text.append(line)
        with self._lock:
            self._console.print(text, soft_wrap=True, highlight=False, markup=False)


class ProgressDisplay:
    """A live progress bar (rounds, clients ready, bytes) fed by polling the status URL."""

    def __init__(self, console: Console, interval_s: float = 0.5) -> None:
        self.console = console
        self._interval = interval_s
        self._url: str | None = None
        self._metrics_url: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(bar_width=24),
            MofNCompleteColumn(),
            TextColumn("{task.fields[detail]}"),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        )
        self._task = self._progress.add_task("rounds", total=None, detail="waiting for the server")
        self.last: StatusView | None = None
        self._evaluated = 0  # the newest evaluation's round already printed

    def watch(self, url: str | None, metrics_url: str | None = None) -> None:
        """Start polling the status ``url`` and, when given, the server's Prometheus ``metrics_url``.

        The status document carries rounds and clients; the bytes come from the
        server's ``*_bytes_total`` counters when the document has none.
        """
        self._url = url
        self._metrics_url = metrics_url
        self._thread = threading.Thread(target=self._poll, name="fedkube-progress", daemon=True)
        self._thread.start()

    def update(self, view: StatusView) -> None:
        """Show one status snapshot."""
        self.last = view
        detail = f"{view.phase} · clients {view.clients_ready}/{view.clients_total}"
        if view.bytes_transferred is not None:
            detail += f" · {_human_bytes(view.bytes_transferred)} results"
        for name, value in list(view.metrics.items())[:2]:
            detail += f" · {name} {value:.4g}"
        for round_, metrics, sites in view.evaluation:
            if round_ > self._evaluated:  # the curve scrolls above the bar, one line per evaluation
                self._evaluated = round_
                self.console.print(evaluation_line(round_, metrics, sites), highlight=False, markup=False)
        self._progress.update(self._task, total=view.rounds, completed=view.round, detail=detail)

    def _poll(self) -> None:
        while not self._stop.is_set():
            if self._url is not None and (status := fetch_status(self._url)) is not None:
                view = parse_status(status.to_dict())
                if view.bytes_transferred is None and self._metrics_url is not None:
                    view = replace(view, bytes_transferred=fetch_bytes_total(self._metrics_url))
                self.update(view)
            self._stop.wait(self._interval)

    def __enter__(self) -> ProgressDisplay:
        self._progress.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
        self._progress.stop()
