"""The ``fedkube`` command.

Each subcommand lives in its own module as ``function(argv) -> exit code``
with its own argument parser, and is imported only when it runs: ``fedkube
validate`` must work without grpc or torch, and ``fedkube --help`` must not
pay for importing the server. Adding a subcommand is one line in COMMANDS.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import fedkube

EXIT_USAGE = 2


@dataclass(frozen=True)
class Command:
    """Where a subcommand's entry point lives: ``module.function(argv: list[str]) -> int``."""

    module: str
    function: str
    help: str


COMMANDS: dict[str, Command] = {
    "run": Command("fedkube.runtime.cli", "run_main", "run an FLJob on this machine (server, sidecars, trainers)"),
    "join": Command("fedkube.runtime.join", "join_main", "join an FLJob as a remote site (enroll, sidecar, trainer)"),
    "validate": Command("fedkube.spec.command", "validate_main", "check an FLJob manifest; list problems and warnings"),
    "render": Command("fedkube.operator.render", "render_main", "print the Kubernetes objects the operator creates"),
    "export": Command("fedkube.server.export", "export_main", "write a checkpoint's model as safetensors/npz/torch"),
    "server": Command("fedkube.server.app", "main", "run the aggregator (what the server pod runs)"),
    "sidecar": Command("fedkube.sidecar.app", "main", "run the job-cell sidecar (what a client pod runs)"),
    "operator": Command("fedkube.operator.main", "main", "run the Kubernetes operator"),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedkube",
        description="Federated learning that runs natively on Kubernetes.",
        epilog="Run `fedkube COMMAND --help` for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"fedkube {fedkube.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, cmd in COMMANDS.items():
        sub.add_parser(name, help=cmd.help, add_help=False)
    return parser


def resolve(name: str) -> Callable[[list[str]], int]:
    """The entry point of subcommand `name`, imported now."""
    cmd = COMMANDS[name]
    try:
        module = importlib.import_module(cmd.module)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (cmd.module == exc.name or cmd.module.startswith(exc.name + ".")):
            raise SystemExit(
                f"fedkube {name}: this installation has no {cmd.module}; fix: install a fedkube release that "
                f"includes `fedkube {name}`"
            ) from None
        raise
    func: Callable[[list[str]], int] = getattr(module, cmd.function)
    return func


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fedkube`` console script; returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] not in COMMANDS:
        parser = _parser()
        if not args:
            parser.print_help(sys.stderr)
            return EXIT_USAGE
        # Unknown command or a top-level option (--help, --version): argparse reports it and exits.
        parser.parse_args(args)
        return EXIT_USAGE
    return int(resolve(args[0])(args[1:]) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
