"""The server's bulk port setting (FEDKUBE_BULK_PORT): parsed once, off unless set, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedkube import envvars
from fedkube.errors import ConfigError
from fedkube.server.config import load_config
from tests.support.tls import session_pki

SPEC = """\
apiVersion: fedkube.dev/v1alpha1
kind: FLJob
metadata: {name: bulkjob}
spec:
  rounds: 1
  clients: [{name: site-a}]
  model: {source: file, path: /models/init.npz}
  trainer: {image: example/trainer:1, command: [python, train.py]}
"""


def _env(tmp_path: Path, **over: str) -> dict[str, str]:
    spec = tmp_path / "job.yaml"
    spec.write_text(SPEC)
    tokens = tmp_path / "tokens"
    tokens.mkdir(exist_ok=True)
    (tokens / "site-a").write_text("t0k3n\n")
    env = {envvars.JOB: "bulkjob", envvars.SPEC_FILE: str(spec), envvars.TOKENS_DIR: str(tokens),
           **session_pki("bulkjob").server_env()}
    env.update(over)
    return env


def test_bulk_port_is_off_unless_set(tmp_path: Path) -> None:
    assert load_config(_env(tmp_path)).bulk_port is None
    assert load_config(_env(tmp_path, **{envvars.BULK_PORT: "0"})).bulk_port is None
    assert load_config(_env(tmp_path, **{envvars.BULK_PORT: " 8471 "})).bulk_port == 8471


@pytest.mark.parametrize("raw", ["bulk", "-1", "70000", "84.71"])
def test_bad_bulk_port_names_the_variable_and_the_fix(tmp_path: Path, raw: str) -> None:
    with pytest.raises(ConfigError, match=rf"{envvars.BULK_PORT}=.*fix: set it to an integer from 0 to 65535"):
        load_config(_env(tmp_path, **{envvars.BULK_PORT: raw}))
