"""Suite-wide test configuration."""

from __future__ import annotations

import os

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
