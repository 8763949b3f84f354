"""`spec.security`: `fedkube validate` warns when TLS is disabled, naming the field and why."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fedkube.cli import main
from fedkube.spec import lint
from tests.unit.spec.manifests import example_manifest


def test_disabled_tls_is_a_warning_naming_the_field_and_the_risk() -> None:
    data = example_manifest()
    data["spec"]["security"] = {"tls": "disabled"}
    job, errors, warnings = lint(data)
    assert job is not None and errors == []
    (warning,) = warnings
    assert warning.path == "spec.security.tls"
    assert "plaintext" in warning.message and "not authenticated" in warning.message
    assert "remove spec.security.tls" in warning.fix


@pytest.mark.parametrize(
    "security", [{}, {"tls": "enabled"}, {"issuerRef": {"name": "org-ca", "kind": "ClusterIssuer"}}])
def test_tls_on_gives_no_warning(security: dict[str, object]) -> None:
    data = example_manifest()
    data["spec"]["security"] = security
    assert lint(data)[1:] == ([], [])


def test_validate_prints_the_warning_and_strict_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = example_manifest()
    data["spec"]["security"] = {"tls": "disabled"}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["validate", str(path)]) == 0
    assert "warning: spec.security.tls" in capsys.readouterr().out
    assert main(["validate", "--strict", str(path)]) == 1
