"""`fedkube render` and `fedkube validate`: output, exit codes, and no heavy imports."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from fedkube.cli import COMMANDS, main
from fedkube.operator import builders
from fedkube.operator.certificates import TlsPlaceholder
from fedkube.operator.naming import TOKEN_PLACEHOLDER
from fedkube.operator.render import render, to_yaml_stream
from fedkube.spec import load_job
from tests.unit.spec.manifests import EXAMPLE, ROOT, example_manifest, full_manifest


def _write(tmp_path: Path, data: dict[str, Any], name: str = "job.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def test_render_prints_exactly_build_all(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["render", str(EXAMPLE)]) == 0
    out = capsys.readouterr().out
    docs = list(yaml.safe_load_all(out))
    job = load_job(EXAMPLE)
    expected = builders.build_all(job, tokens={c.name: TOKEN_PLACEHOLDER for c in job.spec.clients},
                                  tls=TlsPlaceholder(), owner=None)
    assert docs == expected
    assert out == to_yaml_stream(render(job))
    assert "&id0" not in out and "*id0" not in out


def test_render_marks_tokens_and_tls_keys_as_placeholders(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["render", str(EXAMPLE)]) == 0
    secrets = [d for d in yaml.safe_load_all(capsys.readouterr().out) if d["kind"] == "Secret"]
    tokens = [s for s in secrets if s["type"] == "Opaque"]
    tls = [s for s in secrets if s["type"] == "kubernetes.io/tls"]
    assert len(tokens) == 3 and len(tls) == 4  # the CA, the server, two sites
    for secret in tokens:
        assert set(secret["stringData"].values()) == {TOKEN_PLACEHOLDER}
    for secret in tls:
        assert {base64.b64decode(v).decode() for v in secret["data"].values()} == {TOKEN_PLACEHOLDER}
        assert "BEGIN" not in yaml.safe_dump(secret)


def test_render_with_an_issuer_ref_prints_certificates_not_keys(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    data = example_manifest()
    data["spec"]["security"] = {"issuerRef": {"name": "org-ca", "kind": "ClusterIssuer"}}
    assert main(["render", str(_write(tmp_path, data))]) == 0
    docs = list(yaml.safe_load_all(capsys.readouterr().out))
    assert sorted(d["metadata"]["name"] for d in docs if d["kind"] == "Certificate") == [
        "quickstart-numpy-client-site-a-tls", "quickstart-numpy-client-site-b-tls", "quickstart-numpy-server-tls"]
    assert not [d for d in docs if d["kind"] == "Secret" and d["type"] == "kubernetes.io/tls"]


@pytest.mark.parametrize("flag", ["--namespace", "-n"])
def test_render_namespace_override(flag: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path, full_manifest())  # names namespace "ml"; the flag wins
    assert main(["render", str(path), flag, "team-b"]) == 0
    docs = list(yaml.safe_load_all(capsys.readouterr().out))
    assert {d["metadata"]["namespace"] for d in docs} == {"team-b"}
    (client,) = [d for d in docs if d["metadata"]["name"] == "mnist-client-site-a"]
    env = {e["name"]: e.get("value") for e in client["spec"]["initContainers"][0]["env"]}
    assert env["FEDKUBE_SERVER_ADDRESS"] == "mnist-server.team-b.svc:7070"
    spec = json.loads(next(d for d in docs if d["kind"] == "ConfigMap")["data"]["job.json"])
    assert spec["metadata"]["namespace"] == "team-b"


def test_render_invalid_spec_exits_1_with_the_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = example_manifest()
    data["spec"]["minClients"] = 3
    assert main(["render", str(_write(tmp_path, data))]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "spec.minClients" in captured.err and "fix:" in captured.err


def test_render_rejects_a_bad_namespace(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["render", str(EXAMPLE), "-n", "Team_B"])
    assert info.value.code == 2
    assert "not a valid namespace" in capsys.readouterr().err


def test_validate_valid_job(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(EXAMPLE)]) == 0
    assert "valid (0 error(s), 0 warning(s))" in capsys.readouterr().out


def test_validate_lists_every_problem_with_its_fix(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = full_manifest()
    data["spec"]["clients"][2]["name"] = "site-a"
    data["spec"]["transfer"]["idleTimeoutSeconds"] = 5
    assert main(["validate", str(_write(tmp_path, data))]) == 1
    out = capsys.readouterr().out
    assert "error: spec.clients[2].name: site 'site-a' is listed twice" in out
    assert "error: spec.transfer.idleTimeoutSeconds" in out
    assert out.count("  fix: ") == 2
    assert "invalid (2 error(s), 0 warning(s))" in out


def test_validate_warnings_pass_unless_strict(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = example_manifest()
    data["spec"]["timeouts"].update(pendingSeconds=900, deploySeconds=600)
    path = _write(tmp_path, data)
    assert main(["validate", str(path)]) == 0
    assert "warning: spec.timeouts.pendingSeconds" in capsys.readouterr().out
    assert main(["validate", "--strict", str(path)]) == 1


def test_validate_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = example_manifest()
    data["spec"]["rounds"] = 0
    assert main(["validate", "--json", str(_write(tmp_path, data))]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["valid"] is False and doc["warnings"] == []
    assert doc["errors"][0]["path"] == "spec.rounds" and doc["errors"][0]["fix"]


@pytest.mark.parametrize(
    ("content", "words"),
    [(None, "does not exist"), ("kind: Pod\n", "kind is 'Pod'"), ("a: [\n", "not valid YAML")],
    ids=["missing-file", "not-an-fljob", "bad-yaml"],
)
def test_validate_unreadable_input(
    content: str | None, words: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "job.yaml"
    if content is not None:
        path.write_text(content)
    assert main(["validate", str(path)]) == 1
    assert words in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv",
    [[], ["validate"], ["render"], ["bogus"], ["validate", "a.yaml", "--nope"]],
    ids=["nothing", "validate-no-file", "render-no-file", "unknown-command", "unknown-option"],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    try:
        code = main(argv)
    except SystemExit as exc:
        code = int(exc.code or 0)
    assert code == 2
    assert "usage:" in capsys.readouterr().err


def test_help_lists_every_command_without_importing_it(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


def test_validate_and_render_import_neither_grpc_nor_torch() -> None:
    code = (
        "import sys, contextlib, io\n"
        "from fedkube.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        f"    assert main(['validate', {str(EXAMPLE)!r}]) == 0\n"
        f"    assert main(['render', {str(EXAMPLE)!r}]) == 0\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('grpc', 'torch', 'kopf', 'kubernetes'))\n"
        "assert not heavy, heavy\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_console_script_runs_validate() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "fedkube.cli", "validate", str(EXAMPLE)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "valid" in proc.stdout


def test_a_command_whose_module_is_absent_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    from fedkube import cli

    monkeypatch.setitem(cli.COMMANDS, "ghost", cli.Command("fedkube.no_such_module", "main", "not installed"))
    with pytest.raises(SystemExit, match=r"fedkube ghost: this installation has no fedkube\.no_such_module"):
        main(["ghost"])


def test_subcommand_gets_the_remaining_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    from fedkube import cli

    seen: list[list[str]] = []
    monkeypatch.setattr(cli, "resolve", lambda name: lambda argv: seen.append(argv) or 7)
    assert main(["run", "job.yaml", "--json"]) == 7
    assert seen == [["job.yaml", "--json"]]
