"""Reading FLJob documents: YAML or JSON text, files, or dicts -> a checked :class:`FLJob`."""

from __future__ import annotations

import json
import math
import os
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from fedkube.spec.checks import check_job
from fedkube.spec.model import API_VERSION, KIND, FLJob
from fedkube.spec.problems import Problem, SpecError, format_path

PathOrText = str | os.PathLike[str]


def load_job(source: PathOrText) -> FLJob:
    """Load and check an FLJob from a file path or from YAML/JSON text; raise :class:`SpecError` if it is invalid.

    A ``Path`` is always a file. A ``str`` is text when it has a line break or starts with ``{``, else a path.
    Warnings are not raised; get them with :func:`lint` or :func:`check_job`.
    """
    data, where = read_document(source)
    return parse_job(data, source=where)


def read_document(source: PathOrText) -> tuple[Any, str]:
    """The one document in a file or text, parsed but not validated, and a name for messages."""
    if isinstance(source, str) and ("\n" in source or source.lstrip().startswith("{")):
        text, where = source, "<text>"
    else:
        path = Path(source)
        where = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise SpecError(
                [Problem("<file>", f"{path} does not exist", "check the path to the FLJob manifest")], where
            ) from None
        except (IsADirectoryError, PermissionError, UnicodeDecodeError) as exc:
            raise SpecError(
                [Problem("<file>", f"cannot read {path}: {exc}", "pass a readable YAML/JSON file")], where
            ) from None
    try:
        docs, duplicates = _parse_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise SpecError(
            [
                Problem(
                    "<document>",
                    f"not valid YAML/JSON{at}: {getattr(exc, 'problem', exc)}",
                    "fix the syntax (indentation, quotes, colons)",
                )
            ],
            where,
        ) from None
    if duplicates:
        raise SpecError(duplicates, where)
    if len(docs) != 1:
        raise SpecError(
            [
                Problem(
                    "<document>", f"expected one FLJob document, found {len(docs)}", "put exactly one FLJob in the file"
                )
            ],
            where,
        )
    return docs[0], where


def _parse_yaml(text: str) -> tuple[list[Any], list[Problem]]:
    """The documents in ``text`` (empty ones dropped), and a problem for each key a mapping repeats.

    YAML keeps the last of two equal keys without a word, so a second ``rounds:`` further down
    would silently win over the one the reader saw.
    """
    loader = yaml.SafeLoader(text)
    docs: list[Any] = []
    problems: list[Problem] = []
    try:
        while loader.check_node():
            node = loader.get_node()
            if node is None:
                continue
            _find_duplicate_keys(node, (), set(), problems)
            doc = loader.construct_document(node)
            if doc is not None:
                docs.append(doc)
    finally:
        loader.dispose()
    return docs, problems


def _find_duplicate_keys(node: yaml.Node, loc: tuple[str | int, ...], seen: set[int], out: list[Problem]) -> None:
    if id(node) in seen:  # an alias: checked where it was defined (and it may refer to itself)
        return
    seen.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _find_duplicate_keys(item, (*loc, i), seen, out)
    elif isinstance(node, yaml.MappingNode):
        first: dict[tuple[str, str], yaml.Node] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base` overrides the base's keys on purpose
            if not isinstance(key_node, yaml.ScalarNode):
                continue  # never a field name; the model reports it
            key = key_node.value
            earlier = first.setdefault((key_node.tag, key), key_node)
            if earlier is not key_node:
                a, b = earlier.start_mark.line + 1, key_node.start_mark.line + 1
                where = f"at lines {a} and {b}" if a != b else f"on line {a}"
                out.append(
                    Problem(
                        format_path((*loc, key)),
                        f"{key!r} is given twice {where}; YAML would silently keep only the last",
                        "remove one of them",
                    )
                )
            _find_duplicate_keys(value_node, (*loc, key), seen, out)


def parse_job(data: Any, source: str | None = None) -> FLJob:
    """Validate a parsed manifest (a dict); raise :class:`SpecError` with every problem found."""
    job, errors, _ = lint(data, source)
    if errors or job is None:
        raise SpecError(errors, source)
    return job


def lint(data: Any, source: str | None = None) -> tuple[FLJob | None, list[Problem], list[Problem]]:
    """``(job or None, errors, warnings)`` for a parsed manifest, without raising for spec problems."""
    head = _check_head(data)
    if head:
        return None, head, []
    try:
        job = FLJob.model_validate(data)
    except ValidationError as exc:
        return None, [_problem(err) for err in exc.errors()], []
    errors, warnings = check_job(job)
    return (None if errors else job), errors, warnings


def validate_job(job: FLJob) -> list[Problem]:
    """Re-check an already built job (e.g. one constructed in code); raise on errors, return warnings."""
    errors, warnings = check_job(job)
    if errors:
        raise SpecError(errors, job.metadata.name)
    return warnings


def job_from_json(text: str) -> FLJob:
    """Parse the JSON the builders put in the server's spec ConfigMap (``FEDKUBE_SPEC_FILE``)."""
    return parse_job(json.loads(text), source="spec file")


def _check_head(data: Any) -> list[Problem]:
    if not isinstance(data, Mapping):
        return [
            Problem(
                "<document>",
                f"expected a mapping (an FLJob manifest), got {type(data).__name__}",
                f"start the document with apiVersion: {API_VERSION} and kind: {KIND}",
            )
        ]
    problems = []
    kind, api = data.get("kind"), data.get("apiVersion")
    if kind != KIND:
        problems.append(Problem("kind", f"kind is {kind!r}, not {KIND}", f"set kind: {KIND} (is this an FLJob?)"))
    if api != API_VERSION:
        problems.append(
            Problem(
                "apiVersion",
                f"apiVersion is {api!r}; this fedkube reads {API_VERSION}",
                f"set apiVersion: {API_VERSION}",
            )
        )
    return problems


def _problem(err: ErrorDetails) -> Problem:
    loc = tuple(err["loc"])
    path = format_path(loc)
    kind = err["type"]
    ctx = err.get("ctx") or {}
    message = err["msg"]
    if kind == "missing":
        return Problem(path, f"{loc[-1]} is required", f"add {path}")
    if kind == "extra_forbidden":
        allowed = _allowed_fields(loc[:-1])
        hint = f" ({', '.join(allowed)})" if allowed else ""
        return Problem(path, f"unknown field {loc[-1]!r}", f"remove it or correct the spelling; known fields{hint}")
    if kind == "string_pattern_mismatch":
        return Problem(path, f"{err['input']!r} has an invalid format", _pattern_fix(str(ctx.get("pattern", ""))))
    if kind == "value_error":
        what, _, fix = str(ctx.get("error", message)).partition("; fix: ")
        return Problem(path, what, fix or "correct the value")
    if kind == "literal_error":
        return Problem(path, f"{err['input']!r} is not allowed", f"use {ctx.get('expected', 'a listed value')}")
    if kind in _WANTED:
        return _wrong_type(path, _WANTED[kind], err.get("input"))
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        return Problem(path, f"{err['input']!r}: {message.lower()}", "change the value to fit the bound")
    if kind in ("too_short", "too_long"):
        return Problem(path, message, "add the missing entries" if kind == "too_short" else "shorten it")
    return Problem(path, f"{message} (got {err.get('input')!r})", "correct the value's type/format")


# What a strict field takes, by pydantic's error type; the CRD's schema types are the same.
_WANTED = {"int_type": "an integer", "float_type": "a number", "bool_type": "true or false", "string_type": "a string"}


def _wrong_type(path: str, wanted: str, given: Any) -> Problem:
    """A value of the wrong JSON type: say which type it has, and how to write the right one."""
    if isinstance(given, str) and wanted != "a string":
        if wanted == "true or false":
            fix = "write true or false, without quotes"
        else:
            fix = f"write {given.strip()} without quotes" if _is_number(given, wanted) else f"give {wanted}"
        return Problem(path, f"{given!r} is a string, but {path} takes {wanted}", fix)
    kind = {bool: "true/false", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "a mapping", type(None): "null"}.get(type(given), type(given).__name__)  # fmt: skip
    return Problem(path, f"{given!r} is {kind}, but {path} takes {wanted}", f"give {wanted}")


def _is_number(text: str, wanted: str) -> bool:
    if wanted == "an integer":
        return text.strip().lstrip("+-").isdigit()
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def _pattern_fix(pattern: str) -> str:
    if pattern.startswith("^[a-z]("):
        return "use lower-case letters, digits and '-', starting with a letter and ending with a letter or digit"
    if pattern.startswith("^[a-z0-9]("):
        return "use lower-case letters, digits and '-', starting and ending with a letter or digit"
    if pattern.startswith("^[-._a-zA-Z]"):
        return "use letters, digits, '_', '-', '.', not starting with a digit"
    return f"match the pattern {pattern}"


def _allowed_fields(loc: tuple[str | int, ...]) -> list[str]:
    """The field names (aliases) allowed at `loc`, to suggest when a field is unknown."""
    cls: type[BaseModel] | None = FLJob
    for part in loc:
        if cls is None:
            return []
        if isinstance(part, int):
            continue
        field = next((f for n, f in cls.model_fields.items() if part in (n, f.alias)), None)
        cls = _model_in(field.annotation) if field is not None else None
    if cls is None:
        return []
    return sorted(f.alias or n for n, f in cls.model_fields.items() if not f.exclude)


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None
