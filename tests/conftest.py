"""Suite-wide test configuration."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, settings

# Emulated Kubernetes API, kubeconfig and the pinned helm/kubectl binaries (pytest
# accepts pytest_plugins only in the root conftest).
pytest_plugins = ["tests.support.fixtures"]

# CI must not flake on a newly drawn example: there, hypothesis explores a
# fixed sequence (derandomize). Developers' runs keep exploring at random and
# store failures in .hypothesis/ to replay them.
settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", deadline=None, print_blob=True)
settings.load_profile("ci" if os.environ.get("CI") else os.environ.get("HYPOTHESIS_PROFILE", "dev"))


def _ours(handler: logging.Handler) -> bool:
    """Not one of pytest's own handlers (log capture, live logging), which it adds and removes per phase."""
    return not type(handler).__module__.startswith("_pytest.")


@pytest.fixture(autouse=True)
def _no_leaked_log_handlers() -> Iterator[None]:
    """Fail a test that leaves a logging handler on the root logger, and remove that handler.

    A handler installed during a test (e.g. by an in-process ``main()``, which
    calls ``configure_logging``) holds the stream ``sys.stderr`` was then:
    pytest's capture of that test, closed when the test ends. Every later log
    line, from any test or a background thread still ending, then prints
    "--- Logging error --- ... I/O operation on closed file". Unlike a check
    for threads still alive, this is exact: no timing is involved.
    """
    root = logging.getLogger()
    before, level = list(root.handlers), root.level
    yield
    added = [h for h in root.handlers if h not in before and _ours(h)]
    for handler in added:
        root.removeHandler(handler)
        handler.close()
    root.setLevel(level)
    if added:
        pytest.fail(f"the test left logging handler(s) {added} on the root logger; they write to this test's "
                    "closed output streams from now on. Fix: remove them when the test ends, e.g. with "
                    "fedkube.logs.unconfigure_logging() in a fixture", pytrace=False)
