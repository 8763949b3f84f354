"""``fedkube run job.yaml``: run an FLJob on this machine.

Exit code as for the server pod: 0 the job succeeded, 1 it failed, 2 a
configuration error (the spec, or the server's own check of it); 130 when
interrupted (Ctrl-C), after every process was stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import IO, TYPE_CHECKING, Any

from fedkube.errors import ConfigError, FedkubeError
from fedkube.runtime.local import (
    MODEL_DIR,
    LocalJobRun,
    RunOptions,
    RunOutcome,
    default_run_dir,
    new_tls,
    new_tokens,
    render_job,
    summary_document,
)
from fedkube.runtime.process import OutputSink, QuietSink, StreamSink
from fedkube.runtime.resolver import LOCAL_HOST
from fedkube.status import ClientState
from fedkube.termination import TERMINATION_LIMIT

if TYPE_CHECKING:
    from fedkube.runtime.progress import ProgressDisplay

logger = logging.getLogger(__name__)

EXIT_CONFIG = 2
OUTCOMES = {0: "Succeeded", 1: "Failed", 2: "ConfigError", 130: "Interrupted"}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``fedkube run``."""
    parser = argparse.ArgumentParser(
        prog="fedkube run",
        description="Run an FLJob locally: the server, and a sidecar + trainer per client, as local processes.",
    )
    parser.add_argument("job", type=Path, help="the FLJob manifest (YAML or JSON)")
    parser.add_argument(
        "--run-dir",
        type=Path,
        default=None,
        help="where logs, volumes and working directories go (default: a new ./runs/<job>-<timestamp>[-N]); "
        "with spec.server.checkpoint.enabled, reusing one resumes after its last completed round; "
        "a run dir another fedkube run is using is refused (exit code 2)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no live progress bar (off anyway when not a TTY)")
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="show every process's INFO log lines on the console too (they are always in <run dir>/logs/)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print the final summary as JSON on stdout (process output goes to stderr)"
    )
    parser.add_argument(
        "--grace",
        type=float,
        default=20.0,
        metavar="SECONDS",
        help="after the server exits, how long clients may take to stop on their own (default: 20)",
    )
    parser.add_argument(
        "--no-bulk",
        action="store_true",
        help="move tensors over gRPC only, not over the server's plain-TCP bulk port (to compare the two; "
        "the default uses bulk wherever the manifests set it up)",
    )
    parser.add_argument(
        "--bind",
        type=bind_address,
        default=LOCAL_HOST,
        metavar="ADDR",
        help="the address the server's ports (gRPC, bulk, status, metrics) and the sidecars' metrics listen on: "
        "127.0.0.1 (the default: nothing of the run is reachable from another machine), 0.0.0.0 (every IPv4 "
        "interface) or :: (every interface); the trainers' and sidecars' pod-local endpoints stay on 127.0.0.1",
    )
    return parser


#: What ``--bind`` accepts, and what the processes are told (gRPC spells IPv6's "every interface" ``[::]``).
BIND_CHOICES = {LOCAL_HOST: LOCAL_HOST, "localhost": LOCAL_HOST, "0.0.0.0": "0.0.0.0", "::": "[::]", "[::]": "[::]"}


def bind_address(text: str) -> str:
    """``--bind``'s value as the processes take it; an argparse error naming the choices otherwise.

    Only loopback and the wildcards: the runtime and the clients reach the server at 127.0.0.1,
    which a listener on one other interface would not answer.
    """
    chosen = BIND_CHOICES.get(text.strip())
    if chosen is None:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not one of 127.0.0.1, 0.0.0.0, ::; fix: 0.0.0.0 (or ::) to be reachable from other "
            "machines, with a firewall for the interfaces that must not be"
        )
    return chosen


def run_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``fedkube run``; returns the process exit code."""
    args = build_parser().parse_args(argv)
    _configure_logging()
    try:
        from fedkube.spec import load_job

        job = load_job(args.job)
    except (ConfigError, OSError) as exc:
        print(f"fedkube run: {args.job}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    job_name = str(job.metadata.name)
    if job.spec.suspend:
        print(
            f"fedkube run: {args.job}: job {job_name} is suspended (spec.suspend: true), so there is nothing to run; "
            "fix: set spec.suspend to false",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    tokens = new_tokens([c.name for c in job.spec.clients])
    try:
        manifests = render_job(job, tokens, new_tls(job))
        run_dir = (args.run_dir or default_run_dir(job_name)).resolve()
    except FedkubeError as exc:
        print(f"fedkube run: {args.job}: {exc}", file=sys.stderr)
        return EXIT_CONFIG

    out: IO[str] = sys.stderr if args.json else sys.stdout
    show_progress = not args.no_progress and out.isatty()
    with _console(out, show_progress) as (console_sink, display):
        sink = console_sink if args.verbose else QuietSink(console_sink)
        options = RunOptions(
            run_dir=run_dir, base_dir=args.job.resolve().parent, sink=sink, client_grace_s=max(0.0, args.grace),
            bulk=not args.no_bulk, bind=args.bind,
        )
        try:
            run = LocalJobRun(manifests, options, job_name=job_name)
        except ConfigError as exc:
            print(f"fedkube run: {args.job}: {exc}", file=sys.stderr)
            return EXIT_CONFIG
        try:
            outcome = execute(run, display, out=out)
        except ConfigError as exc:
            print(f"fedkube run: {args.job}: {exc}", file=sys.stderr)
            return EXIT_CONFIG
    if args.json:
        print(json.dumps(outcome_json(job_name, outcome), indent=2))
    else:
        print(format_outcome(job_name, outcome))
    return outcome.exit_code


def execute(run: LocalJobRun, display: ProgressDisplay | None = None, out: IO[str] | None = None) -> RunOutcome:
    """Start ``run``, wait for its outcome, and stop every process whatever happens.

    With ``out``, one line naming every /metrics endpoint is printed there once the pods started.

    SIGINT and SIGTERM (when called on the main thread) interrupt the run
    cleanly: every pod's process groups are terminated before this returns.
    """
    with _interrupts(run):
        try:
            run.start()
            urls = run.metrics_urls()
            if out is not None and urls:
                print(format_metrics_urls(urls), file=out, flush=True)
            if display is not None:
                display.watch(run.status_url(), run.metrics_url())
            outcome = run.wait()
            if display is not None and outcome.summary is not None:
                from fedkube.runtime.progress import parse_status

                # The bar ends on the final state, not the last poll.
                display.update(parse_status(summary_document(outcome.summary)))
            return outcome
        finally:
            run.stop_all()  # whatever happened, no process outlives the run


def outcome_json(job_name: str, outcome: RunOutcome) -> dict[str, Any]:
    """The final summary of a run as a JSON-ready dict."""
    return {
        "job": job_name,
        "outcome": OUTCOMES.get(outcome.exit_code, "Failed"),
        "exitCode": outcome.exit_code,
        "summary": summary_document(outcome.summary) if outcome.summary is not None else None,
        "pods": {
            name: {
                "phase": result.phase,
                "message": result.message,
                "containers": [
                    {
                        "name": c.name,
                        "exitCode": c.exit_code,
                        "stoppedByRuntime": c.stopped_by_runtime,
                        "restarts": c.restarts,
                    }
                    for c in result.containers
                ],
            }
            for name, result in outcome.pods.items()
        },
        "notes": list(outcome.notes),
        "runDir": str(outcome.run_dir),
        "metrics": dict(outcome.metrics_urls),
    }


def format_metrics_urls(urls: Mapping[str, str]) -> str:
    """One line: ``metrics: server http://...  site-a http://...``."""
    return "metrics: " + "  ".join(f"{name} {url}" for name, url in urls.items())


def format_outcome(job_name: str, outcome: RunOutcome) -> str:
    """The final summary of a run for a person."""
    verdict = OUTCOMES.get(outcome.exit_code, "Failed")
    lines = [f"job {job_name}: {verdict} (exit code {outcome.exit_code})"]
    summary = outcome.summary
    listed: set[str] = set()
    if summary is not None:
        lines.append(f"  rounds: {summary.round}/{summary.rounds}")
        if summary.reason:
            lines.append(f"  reason: {summary.reason}")
        if summary.message:
            lines.append(f"  message: {summary.message}")
        for c in summary.clients:
            listed.add(c.name)
            reason = f" ({c.reason})" if c.reason else ""
            lines.append(f"  client {c.name}: {ClientState(c.state).value}{reason}")
        if summary.clients_omitted > 0:
            lines.append(_omitted_line(summary.clients_omitted, listed, outcome))
        if summary.model_file:
            lines.append(f"  model: {outcome.run_dir / MODEL_DIR / summary.model_file} (sha256 {summary.model_sha256})")
        if summary.evaluation:
            from fedkube.runtime.progress import evaluation_lines  # rich loads only where it is shown

            lines += evaluation_lines(summary.evaluation)
    for note in outcome.notes:
        lines.append(f"  note: {note}")
    lines.append(f"  logs: {outcome.run_dir / 'logs'}")
    return "\n".join(lines)


def _omitted_line(omitted: int, listed: set[str], outcome: RunOutcome) -> str:
    # The server's termination summary is capped at TERMINATION_LIMIT bytes (a Kubernetes termination
    # message), leaving healthy clients out first; the runtime still knows every client pod.
    phases: dict[str, int] = {}
    for pod, site in outcome.client_sites.items():
        result = outcome.pods.get(pod)
        if site not in listed and result is not None:
            phases[result.phase] = phases.get(result.phase, 0) + 1
    pods = f"; their pods: {', '.join(f'{n} {p}' for p, n in sorted(phases.items()))}" if phases else ""
    return (
        f"  \u2026 and {omitted} more client(s) the server's summary leaves out (it is capped at {TERMINATION_LIMIT} "
        f"bytes and drops healthy clients first){pods}; to see all: `--json` lists every pod, "
        f"{outcome.run_dir / 'logs'}/<job>-client-<site>.*.log holds each client's log"
    )


def _configure_logging() -> None:
    # The runtime's own lines; children configure their own logging.
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[fedkube run] %(levelname)s %(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)


@contextlib.contextmanager
def _console(out: IO[str], show_progress: bool) -> Iterator[tuple[OutputSink, ProgressDisplay | None]]:
    if not show_progress:
        yield StreamSink(out), None
        return
    from rich.console import Console

    from fedkube.runtime.progress import ConsoleSink, ProgressDisplay

    console = Console(file=out)
    with ProgressDisplay(console) as display:
        yield ConsoleSink(console), display


@contextlib.contextmanager
def _interrupts(run: LocalJobRun) -> Iterator[None]:
    """Ctrl-C and SIGTERM stop the run cleanly instead of killing the runtime mid-way."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        logger.warning("received %s; stopping every process of the run", signal.Signals(signum).name)
        run.interrupt()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
