"""Client-level differential privacy as a wrapper around any algorithm (docs/privacy.md)."""

from fedexperts.algorithms.privacy.config import PrivacySettings

__all__ = ["PrivacySettings"]
