"""FEDKUBE_TLS / _TLS_DIR / _TLS_SERVER_NAME: on by default, never a quiet fall back to plaintext."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedkube import envvars
from fedkube.errors import ConfigError
from fedkube.security.settings import TlsSettings
from tests.support.tls import session_pki


def test_disabled_only_when_the_job_says_so() -> None:
    assert not TlsSettings.from_env({envvars.TLS: "disabled"}).enabled
    assert not TlsSettings.from_env({envvars.TLS: " Disabled "}).enabled


@pytest.mark.parametrize("mode", ["", "enabled"])
def test_enabled_without_a_directory_is_a_config_error_naming_the_fix(mode: str) -> None:
    with pytest.raises(ConfigError, match=rf"{envvars.TLS_DIR} is not set; fix: point {envvars.TLS_DIR}"):
        TlsSettings.from_env({envvars.TLS: mode} if mode else {})


def test_a_directory_without_the_bundle_names_the_missing_files(tmp_path: Path) -> None:
    (tmp_path / "ca.crt").write_text("x")
    with pytest.raises(ConfigError, match=r"lacks readable TLS files .*tls\.crt.*tls\.key.*fix: mount"):
        TlsSettings.from_env({envvars.TLS_DIR: str(tmp_path)})


def test_a_typo_is_refused_rather_than_read_as_off() -> None:
    with pytest.raises(ConfigError, match=r"FEDKUBE_TLS='off' must be 'enabled' or 'disabled'"):
        TlsSettings.from_env({envvars.TLS: "off"})


def test_the_server_name_defaults_to_the_host_of_the_server_address() -> None:
    directory = str(session_pki().site_dir("site-a"))
    got = TlsSettings.from_env({envvars.TLS_DIR: directory}, server_address="job1-server.ns.svc:7070")
    assert got.enabled and got.files is not None and got.files.cert.name == "tls.crt"
    assert got.server_name == "job1-server.ns.svc"
    assert TlsSettings.from_env({envvars.TLS_DIR: directory}, server_address="[::1]:7070").server_name == "::1"
    named = {envvars.TLS_DIR: directory, envvars.TLS_SERVER_NAME: "job1-server.ns.svc"}
    assert TlsSettings.from_env(named, server_address="127.0.0.1:7070").server_name == "job1-server.ns.svc"


def test_the_server_reads_tls_once_and_needs_its_namespace_to_check_site_certificates(tmp_path: Path) -> None:
    from fedkube.server.config import load_config

    spec = tmp_path / "job.yaml"
    spec.write_text("apiVersion: fedkube.dev/v1alpha1\nkind: FLJob\nmetadata: {name: tlsjob}\nspec:\n"
                    "  rounds: 1\n  clients: [{name: site-a}]\n  model: {source: firstClient}\n"
                    "  trainer: {image: example/trainer:1, command: [python, train.py]}\n")
    (tmp_path / "tokens").mkdir()
    (tmp_path / "tokens" / "site-a").write_text("t")
    env = {envvars.JOB: "tlsjob", envvars.SPEC_FILE: str(spec), envvars.TOKENS_DIR: str(tmp_path / "tokens"),
           **session_pki("tlsjob").server_env()}
    config = load_config(env)
    assert config.tls.enabled and config.namespace == "default"
    with pytest.raises(ConfigError, match=rf"{envvars.NAMESPACE} is not set.*fix: set {envvars.NAMESPACE}"):
        load_config({k: v for k, v in env.items() if k != envvars.NAMESPACE})
    assert not load_config({**env, envvars.TLS: "disabled"}).tls.enabled
    with pytest.raises(ConfigError, match=envvars.TLS_DIR):
        load_config({k: v for k, v in env.items() if k != envvars.TLS_DIR})
