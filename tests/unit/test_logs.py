"""fedkube.logs: ids on every line, JSON lines that parse, no tracebacks for expected conditions, output once."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from fedkube import envvars
from fedkube.errors import ConfigError
from fedkube.logs import configure_logging, expected, log_context, log_format_from_env, unconfigure_logging

log = logging.getLogger("fedkube.tests.logs")


@pytest.fixture(autouse=True)
def _clean() -> Iterator[None]:
    root = logging.getLogger()
    level = root.level
    yield
    unconfigure_logging()
    root.setLevel(level)


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_lines_carry_the_process_ids() -> None:
    out = io.StringIO()
    configure_logging("sidecar", job="mnist", site="site-a", fmt="json", stream=out)
    log.info("connected to %s", "server:7070")
    [doc] = lines(out)
    assert doc["msg"] == "connected to server:7070"
    assert (doc["level"], doc["logger"]) == ("INFO", "fedkube.tests.logs")
    assert (doc["component"], doc["job"], doc["site"]) == ("sidecar", "mnist", "site-a")
    assert "round" not in doc and "transfer" not in doc  # absent ids are left out, not null
    assert doc["time"].endswith("Z") and "T" in doc["time"]


def test_context_and_extra_ids_with_extra_winning() -> None:
    out = io.StringIO()
    configure_logging("server", job="mnist", fmt="json", stream=out)
    with log_context(round=3, client="site-a"):
        log.info("task sent")
        with log_context(transfer="tx-1"):
            log.info("fetching")
        log.info("result from %s", "site-b", extra={"client": "site-b"})
    log.info("between rounds")
    docs = lines(out)
    assert [(d.get("round"), d.get("client"), d.get("transfer")) for d in docs] == [
        (3, "site-a", None), (3, "site-a", "tx-1"), (3, "site-b", None), (None, None, None)]
    assert all(d["job"] == "mnist" and "site" not in d for d in docs)


def test_context_does_not_leak_into_other_threads() -> None:
    out = io.StringIO()
    configure_logging("server", job="j", fmt="json", stream=out)
    inside = threading.Event()
    release = threading.Event()

    def round_loop() -> None:
        with log_context(round=7):
            inside.set()
            release.wait(5)

    t = threading.Thread(target=round_loop)
    t.start()
    assert inside.wait(5)
    log.info("from another thread")
    release.set()
    t.join(5)
    [doc] = lines(out)
    assert "round" not in doc


def test_text_format_has_the_ids_in_brackets() -> None:
    out = io.StringIO()
    configure_logging("sidecar", job="mnist", site="a", stream=out)
    with log_context(round=2):
        log.warning("slow")
    [line] = out.getvalue().splitlines()
    assert line.endswith(" WARNING fedkube.tests.logs [sidecar job=mnist site=a round=2] slow")


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_expected_conditions_log_one_line_without_traceback(fmt: str) -> None:
    out = io.StringIO()
    configure_logging("server", job="j", fmt=fmt, stream=out)
    try:
        raise ConnectionResetError("peer went away")
    except ConnectionResetError as exc:
        expected(log, "client %s reconnecting", "site-a", exc=exc, extra={"client": "site-a"})
        log.warning("straggler excluded", exc_info=True)  # below ERROR: still no traceback
    text = out.getvalue()
    assert "Traceback" not in text
    assert len(text.splitlines()) == 2
    if fmt == "json":
        first, second = lines(out)
        assert first["error"] == "ConnectionResetError: peer went away" and first["client"] == "site-a"
        assert first["level"] == "WARNING" and "traceback" not in first
        assert second["error"] == "ConnectionResetError: peer went away"
    else:
        assert "client site-a reconnecting (ConnectionResetError: peer went away)" in text


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_unexpected_errors_keep_their_traceback(fmt: str) -> None:
    out = io.StringIO()
    configure_logging("server", job="j", fmt=fmt, stream=out)
    try:
        {}["missing"]
    except KeyError:
        log.exception("aggregation crashed")
    if fmt == "json":
        [doc] = lines(out)  # the traceback stays inside the one JSON line
        assert doc["level"] == "ERROR" and doc["error"] == "KeyError: 'missing'"
        assert doc["traceback"].startswith("Traceback") and "test_unexpected_errors_keep_their_traceback" in (
            doc["traceback"])
    else:
        assert "Traceback (most recent call last)" in out.getvalue()


def test_configuring_twice_prints_each_line_once() -> None:
    first, second = io.StringIO(), io.StringIO()
    root = logging.getLogger()
    before = len(root.handlers)
    configure_logging("server", job="j", fmt="json", stream=first)
    configure_logging("server", job="j2", fmt="json", stream=second)
    assert len(root.handlers) == before + 1
    log.info("once")
    assert first.getvalue() == ""
    [doc] = lines(second)
    assert doc["job"] == "j2"


def test_bad_format_is_a_config_error_naming_the_variable() -> None:
    with pytest.raises(ConfigError, match=envvars.LOG_FORMAT):
        configure_logging("server", job="j", fmt="xml")
    with pytest.raises(ConfigError, match="text or json"):
        log_format_from_env({envvars.LOG_FORMAT: "yaml"})
    assert log_format_from_env({}) == "text"
    assert log_format_from_env({envvars.LOG_FORMAT: " JSON "}) == "json"


def test_a_real_process_logs_json_to_stderr_exactly_once() -> None:
    # A fresh interpreter: no pytest handlers, as in a server or sidecar pod.
    code = (
        "import logging, os\n"
        "from fedkube.logs import configure_logging, log_format_from_env, log_context\n"
        "fmt = log_format_from_env(os.environ)\n"
        "configure_logging('sidecar', job='mnist', site='a', fmt=fmt)\n"
        "configure_logging('sidecar', job='mnist', site='a', fmt=fmt)\n"
        "with log_context(round=1, transfer='tx-9'):\n"
        "    logging.getLogger('fedkube.sidecar.relay').info('relayed %d bytes', 1024)\n"
        "logging.getLogger('grpc').debug('hidden below INFO')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, envvars.LOG_FORMAT: "json"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    docs = [json.loads(line) for line in proc.stderr.splitlines()]
    assert [(d["logger"], d["msg"], d["round"], d["transfer"], d["site"]) for d in docs] == [
        ("fedkube.sidecar.relay", "relayed 1024 bytes", 1, "tx-9", "a")]
