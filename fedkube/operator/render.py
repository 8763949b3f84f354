"""``fedkube render job.yaml``: print exactly the objects the operator creates, as a YAML stream.

Tokens and TLS keys and certificates are replaced by a marked placeholder,
so the output is safe to share; the operator generates real ones. No owner references: they need the uid the
API server assigns to the FLJob.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from fedkube.operator.builders import build_all
from fedkube.operator.certificates import TlsPlaceholder, uses_issuer
from fedkube.operator.naming import TOKEN_PLACEHOLDER
from fedkube.spec.load import load_job
from fedkube.spec.model import DNS1123_LABEL, FLJob
from fedkube.spec.problems import SpecError

EXIT_OK, EXIT_INVALID = 0, 1


def render(job: FLJob, namespace: str | None = None) -> list[dict[str, Any]]:
    """``build_all`` of `job` (moved to `namespace` when given) with placeholder tokens and TLS material."""
    if namespace is not None:
        job = job.model_copy(update={"metadata": job.metadata.model_copy(update={"namespace": namespace})})
    tokens = {site.name: TOKEN_PLACEHOLDER for site in job.spec.clients}
    # As the operator does: a job cert-manager issues for gets Certificates, not Secrets with our keys.
    tls = None if uses_issuer(job) else TlsPlaceholder()
    return build_all(job, tokens=tokens, tls=tls, owner=None)


class _Dumper(yaml.SafeDumper):
    """Prints multi-line strings (the spec JSON) as literal blocks and never uses anchors/aliases."""

    def ignore_aliases(self, data: object) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
    style = "|" if "\n" in data and not any(line != line.rstrip() for line in data.splitlines()) else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_Dumper.add_representer(str, _str)


def to_yaml_stream(objects: Sequence[dict[str, Any]]) -> str:
    """Objects as a multi-document YAML stream, keys in builder order."""
    return yaml.dump_all(objects, Dumper=_Dumper, sort_keys=False, explicit_start=True, width=120)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``fedkube render``."""
    parser = argparse.ArgumentParser(
        prog="fedkube render", description="Print the Kubernetes objects the operator creates for an FLJob."
    )
    parser.add_argument("job", type=Path, help="the FLJob manifest (YAML or JSON)")
    parser.add_argument("-n", "--namespace", help="namespace to render into (default: the manifest's, or default)")
    return parser


def render_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``fedkube render``; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.namespace is not None and not _is_label(args.namespace):
        parser.error(f"--namespace {args.namespace!r} is not a valid namespace name (lower-case DNS label)")
    try:
        objects = render(load_job(args.job), args.namespace)
    except SpecError as exc:
        print(f"fedkube render: {exc}", file=sys.stderr)
        print("fix the problems above (`fedkube validate` lists them with warnings)", file=sys.stderr)
        return EXIT_INVALID
    sys.stdout.write(to_yaml_stream(objects))
    return EXIT_OK


def _is_label(text: str) -> bool:
    import re

    return len(text) <= 63 and re.match(DNS1123_LABEL, text) is not None
