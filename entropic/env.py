"""Boolean environment switches (``TRITON_INTERPRET``, ``HF_HUB_OFFLINE``, ...), read one way everywhere."""

from __future__ import annotations

import os

__all__ = ["TRUTHY", "env_flag"]

TRUTHY = frozenset({"1", "true", "yes", "on"})
"""Values (case-insensitive, surrounding spaces ignored) that turn a switch on."""


def env_flag(name: str) -> bool:
    """Whether environment variable ``name`` is set to one of :data:`TRUTHY`."""
    return os.environ.get(name, "").strip().lower() in TRUTHY
