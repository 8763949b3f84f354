"""Spec problems: what is wrong, where (the field path), and how to fix it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from fedkube.errors import ConfigError


class Problem(NamedTuple):
    """One finding about an FLJob: `path` like ``spec.clients[1].name``, what is wrong, and the fix.

    A named tuple, so ``path, message, fix = problem`` works too.
    """

    path: str
    message: str
    fix: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}; fix: {self.fix}"


class SpecError(ConfigError):
    """An FLJob is invalid; `problems` lists every finding (path, message, fix)."""

    def __init__(self, problems: Sequence[Problem], source: str | None = None) -> None:
        self.problems = list(problems)
        self.source = source
        where = f" in {source}" if source else ""
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid FLJob{where} ({len(self.problems)} problem(s)):\n{lines}")


def format_path(loc: Sequence[str | int]) -> str:
    """``("spec", "clients", 1, "name")`` -> ``spec.clients[1].name``; odd keys are quoted."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.replace("_", "a").replace("-", "a").isalnum() and not part[:1].isdigit():
            out += f".{part}" if out else part
        else:
            out += f"[{part!r}]"
    return out or "<document>"
