"""The error of the model file formats."""

from __future__ import annotations

from fedkube.errors import ConfigError


class FormatError(ConfigError):
    """A model file cannot be read or written; the message names the file, what is wrong and the fix."""
