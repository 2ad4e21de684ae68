"""Settings of local-only training (no federation): the scope each client trains for itself."""

from __future__ import annotations

from typing import ClassVar, Literal

from fedexperts.algorithms.settings import ScopedSettings


class LocalConfig(ScopedSettings):
    name: Literal["local"] = "local"
    builder: ClassVar[str] = "fedexperts.algorithms.local.algorithm:LocalOnly"
    privacy_unsupported: ClassVar[str | None] = "it shares nothing, so there is no update to clip or noise"
