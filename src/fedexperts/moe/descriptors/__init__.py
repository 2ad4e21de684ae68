"""Every explicit family description, one module per group of families.

A descriptor is written against the family's modeling file in transformers and tested through the
identity suite (tests/moe): sparse blocks found where the config says, pruned == masked original,
routing counts == the router's own top-k.
"""

from __future__ import annotations

from fedexperts.moe.descriptors.established import ESTABLISHED
from fedexperts.moe.descriptors.frontier import FRONTIER
from fedexperts.moe.descriptors.hybrid import HYBRID
from fedexperts.moe.descriptors.wrapped import WRAPPED
from fedexperts.moe.family import MoEFamily

DESCRIPTORS: tuple[MoEFamily, ...] = (*ESTABLISHED, *FRONTIER, *HYBRID, *WRAPPED)

__all__ = ["DESCRIPTORS"]
