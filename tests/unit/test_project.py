"""Project-wide checks: generated code, layering, lint and types."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "fedkube"


def _imports(path: Path) -> set[str]:
    """Every module name a file imports, at any depth (lazy imports count too)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}: use absolute imports (fedkube.x), not relative ones")
    return names


def _files(sub: str) -> list[Path]:
    return [p for p in (PKG / sub).rglob("*.py") if "v1" not in p.relative_to(PKG).parts]


# (package, forbidden import prefixes, why)
LAYERS = [
    ("trainer_sdk", ("fedkube.server", "fedkube.operator", "fedkube.runtime", "fedkube.sidecar", "fedkube.metrics",
                     "prometheus_client", "kopf", "kubernetes"),
     "user scripts import the SDK; it must not drag in the server, the sidecar, the operator or their metrics"),
    ("operator", ("grpc", "fedkube.wire", "fedkube.server", "fedkube.sidecar", "torch"),
     "the operator talks to Kubernetes and HTTP only"),
    ("wire", ("fedkube",), "generated wire code imports nothing of ours"),
    ("transfer", ("fedkube.server", "fedkube.sidecar", "fedkube.trainer_sdk", "fedkube.operator", "torch"),
     "the transfer layer is the bottom layer and torch-free"),
    ("spec", ("grpc", "fedkube.server", "fedkube.sidecar", "fedkube.operator", "fedkube.runtime", "torch"),
     "the spec model is pure"),
    ("security", ("fedkube.server", "fedkube.sidecar", "fedkube.operator", "fedkube.runtime", "fedkube.trainer_sdk",
                  "fedkube.transfer", "torch"),
     "the PKI is used by the operator, the server and the sidecar, so it depends on none of them"),
    ("formats", ("fedkube.server", "fedkube.sidecar", "fedkube.trainer_sdk", "fedkube.operator", "fedkube.runtime"),
     "the model file formats are read by the server, the CLI and the SDK alike"),
]


@pytest.mark.parametrize(("sub", "forbidden", "why"), LAYERS, ids=[layer[0] for layer in LAYERS])
def test_layering(sub: str, forbidden: tuple[str, ...], why: str) -> None:
    bad = []
    for path in _files(sub):
        for name in _imports(path):
            if sub == "wire" and name.startswith("fedkube.wire"):
                continue
            if any(name == f or name.startswith(f + ".") for f in forbidden):
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not bad, f"layering broken ({why}):\n" + "\n".join(bad)


def test_certificate_making_needs_no_grpc() -> None:
    """The operator makes the job's certificates and must not import grpc; only security/contexts.py may."""
    bad = [
        f"{p.relative_to(ROOT)} imports {n}"
        for p in _files("security")
        if p.name != "contexts.py"
        for n in _imports(p)
        if n == "grpc" or n.startswith("grpc.") or n == "fedkube.security.contexts"
    ]
    assert not bad, "\n".join(bad)


def test_protocol_module_imports_only_the_wire_code() -> None:
    """fedkube.protocol is imported by every side (the trainer SDK included), so it imports nothing else of ours."""
    ours = {n for n in _imports(PKG / "protocol.py") if n == "fedkube" or n.startswith("fedkube.")}
    assert ours <= {"fedkube.errors", "fedkube.wire.v1"}, ours


# Values of fedkube.protocol that no other module may spell: each has exactly one definition. ("server",
# "init" and "train" are left out: the same words also name a Kubernetes role, init containers, fk.init.
# The task kinds' names come from control.proto's TaskKind.)
_VOCABULARY = ("SITE_METADATA", "AUTH_METADATA", "TASK_KIND_KEY", "RESULT_IDLE_TIMEOUT_KEY",
               "RESULT_START_TIMEOUT_KEY", "RESULT_TTL_KEY", "RECEIVE_SECONDS", "SEND_SECONDS",
               "DOWNLOAD_WAIT_SECONDS")


def test_wire_vocabulary_is_defined_once() -> None:
    from fedkube import protocol

    values = {getattr(protocol, name): name for name in _VOCABULARY if isinstance(getattr(protocol, name), str)}
    bad = []
    for path in PKG.rglob("*.py"):
        if path.name == "protocol.py" or "v1" in path.relative_to(PKG).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in values:
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno} spells {node.value!r}; "
                           f"use fedkube.protocol.{values[node.value]}")
    assert not bad, "\n".join(bad)


def test_torch_is_optional_for_server_and_sidecar() -> None:
    """torch may only be imported lazily (inside a function) outside the trainer SDK."""
    bad = []
    for sub in ("server", "sidecar", "transfer", "wire", "spec", "runtime", "metrics", "operator", "formats"):
        for path in _files(sub):
            tree = ast.parse(path.read_text())
            for node in tree.body:
                mods = []
                if isinstance(node, ast.Import):
                    mods = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module:
                    mods = [node.module]
                if any(m == "torch" or m.startswith("torch.") for m in mods):
                    bad.append(str(path.relative_to(ROOT)))
    assert not bad, f"top-level torch import in a torch-optional package: {bad}"


def test_no_pickle_anywhere() -> None:
    offenders = [
        str(p.relative_to(ROOT))
        for p in PKG.rglob("*.py")
        if {"pickle", "cloudpickle", "dill"} & {n.split(".")[0] for n in _imports(p)}
    ]
    assert not offenders, f"pickle must never be used (no unpickling of network data): {offenders}"


def test_generated_wire_code_matches_proto() -> None:
    proc = subprocess.run([sys.executable, "scripts/gen_proto.py", "--check"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.slow
def test_ruff_clean() -> None:
    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.fail("ruff is not installed; fix: pip install -e '.[dev]'")
    proc = subprocess.run([ruff, "check", "."], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.slow
def test_mypy_clean() -> None:
    proc = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
