"""Size a federation from a model's config alone: parameters by role, bytes per round, client memory.

:mod:`.presets` says what to plan (checkpoint presets, a ``config.json``, dtype names),
:func:`~fedexperts.models.partial.meta_model` builds that model on the ``meta`` device, and
:mod:`.plan` plays one client round on it under an algorithm and counts; the wire's byte layout
stays in :mod:`fedexperts.federation.payload` and the rendering in :mod:`fedexperts.reporting.plan_tables`.
"""

from fedexperts.models.partial import meta_model
from fedexperts.planning.plan import KindCount, MemoryEstimate, Plan, plan
from fedexperts.planning.presets import DTYPES, PRESET_SOURCES, PRESETS, PlanError, load_plan_config, resolve_dtype

__all__ = [
    "DTYPES",
    "PRESETS",
    "PRESET_SOURCES",
    "KindCount",
    "MemoryEstimate",
    "Plan",
    "PlanError",
    "load_plan_config",
    "meta_model",
    "plan",
    "resolve_dtype",
]
