"""The one error hierarchy of fedkube.

Every message says what failed, for which job/round/client/transfer, and what
to do about it.
"""

from __future__ import annotations


class FedkubeError(Exception):
    """Base class of every error fedkube raises on purpose."""


class ConfigError(FedkubeError):
    """A setting or spec value is wrong; the message names the field and the fix."""


class MissingDependencyError(FedkubeError, ImportError):
    """An optional integration was used without its package installed."""

    def __init__(self, package: str, feature: str, extra: str | None = None) -> None:
        hint = f"pip install 'fedkube[{extra}]'" if extra else f"pip install {package}"
        super().__init__(f"{feature} needs the optional package {package!r}, which is not installed; fix: {hint}")
        self.package = package
