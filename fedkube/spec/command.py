"""``fedkube validate job.yaml``: list an FLJob's problems (path, message, fix) and warnings.

Exit codes: 0 valid (warnings allowed), 1 invalid, 2 usage error.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from fedkube.spec.load import lint, read_document
from fedkube.spec.problems import Problem, SpecError

EXIT_OK, EXIT_INVALID = 0, 1


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``fedkube validate``."""
    parser = argparse.ArgumentParser(
        prog="fedkube validate", description="Check an FLJob manifest; print each problem with its field and fix."
    )
    parser.add_argument("job", type=Path, help="the FLJob manifest (YAML or JSON)")
    parser.add_argument("--json", action="store_true", help="print {valid, errors, warnings} as JSON")
    parser.add_argument("--strict", action="store_true", help="treat warnings as problems (exit 1)")
    return parser


def validate_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``fedkube validate``; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        data, where = read_document(args.job)
        _, errors, warnings = lint(data, where)
    except SpecError as exc:
        where, errors, warnings = str(args.job), exc.problems, []
    if args.json:
        doc = {
            "file": where,
            "valid": not errors,
            "errors": [_as_dict(p) for p in errors],
            "warnings": [_as_dict(p) for p in warnings],
        }
        print(json.dumps(doc, indent=2))
    else:
        _report(sys.stdout, where, errors, warnings)
    if errors or (args.strict and warnings):
        return EXIT_INVALID
    return EXIT_OK


def _as_dict(p: Problem) -> dict[str, str]:
    return {"path": p.path, "message": p.message, "fix": p.fix}


def _report(out: TextIO, where: str, errors: Sequence[Problem], warnings: Sequence[Problem]) -> None:
    for p in errors:
        print(f"error: {p.path}: {p.message}\n  fix: {p.fix}", file=out)
    for p in warnings:
        print(f"warning: {p.path}: {p.message}\n  fix: {p.fix}", file=out)
    verdict = "invalid" if errors else "valid"
    print(f"{where}: {verdict} ({len(errors)} error(s), {len(warnings)} warning(s))", file=out)
