"""The server package stays in rooms a newcomer can read: small modules, capabilities by type, not by probing."""

from __future__ import annotations

import re
from pathlib import Path

SERVER = Path(__file__).resolve().parents[3] / "fedkube" / "server"
MAX_LINES = 600

# getattr on a platform module for a constant it may lack is not probing one of our interfaces.
PLATFORM = re.compile(r"getattr\(os, \"[A-Z_]+\"")


def test_no_server_module_is_over_600_lines() -> None:
    sizes = {p.name: len(p.read_text(encoding="utf-8").splitlines()) for p in SERVER.glob("*.py")}
    big = {name: n for name, n in sizes.items() if n > MAX_LINES}
    assert not big, f"{big} exceed {MAX_LINES} lines; split them along their seams (STYLE.md, 'No god classes')"


def test_no_capability_probing_with_getattr() -> None:
    found = [
        f"{p.name}:{i}: {line.strip()}"
        for p in sorted(SERVER.glob("*.py"))
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
        if "getattr(" in line and not PLATFORM.search(line)
    ]  # fmt: skip
    assert not found, (
        f"getattr probing in fedkube/server: {found}; declare the capability as a @runtime_checkable Protocol "
        "and test it with isinstance (STYLE.md, 'Capabilities as small optional interfaces')"
    )
