"""The sidecar's FEDKUBE_SERVER_BULK_ADDRESS: empty means gRPC only; a bad value names the variable and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedkube import envvars
from fedkube.errors import ConfigError
from fedkube.sidecar.config import SidecarConfig
from tests.support.tls import session_pki


def _env(tmp_path: Path, **over: str) -> dict[str, str]:
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    env = {envvars.JOB: "j", envvars.SITE: "a", envvars.SERVER_ADDRESS: "server:7070", envvars.TOKEN_FILE: str(token),
           **session_pki("j").site_env("a")}
    env.update(over)
    return env


def test_bulk_address_is_optional(tmp_path: Path) -> None:
    assert SidecarConfig.from_env(_env(tmp_path)).server_bulk_address == ""
    assert SidecarConfig.from_env(_env(tmp_path, **{envvars.SERVER_BULK_ADDRESS: "  "})).server_bulk_address == ""
    cfg = SidecarConfig.from_env(_env(tmp_path, **{envvars.SERVER_BULK_ADDRESS: "job-server.ns.svc:8471"}))
    assert cfg.server_bulk_address == "job-server.ns.svc:8471"


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ("server", "is not host:port"),
        (":8471", "is not host:port"),
        ("server:http", "is not host:port"),
        ("server:0", "names port 0"),
        ("server:99999", "out of range"),
    ],
)
def test_bad_bulk_address_names_the_variable_and_the_fix(tmp_path: Path, raw: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle) as info:
        SidecarConfig.from_env(_env(tmp_path, **{envvars.SERVER_BULK_ADDRESS: raw}))
    assert envvars.SERVER_BULK_ADDRESS in str(info.value) and "fix:" in str(info.value)
