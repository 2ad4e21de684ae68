"""Exceptions raised for user mistakes: the CLI prints their message and exits non-zero."""


class FedExpertsError(Exception):
    """Base class: a problem with what the user asked for, reported without a traceback."""


class UnsupportedModelError(FedExpertsError):
    """The model's type is unknown to fedexperts, or the model has no MoE layer."""


class SurgeryError(FedExpertsError):
    """An expert subset, graft choice or saved MoE state does not fit the model."""


class DataError(FedExpertsError):
    """Instruction data that cannot be read, does not fit the schema, or cannot be split as asked."""


class RunError(FedExpertsError):
    """A run that cannot start, continue or complete (e.g. too few successful clients in a round)."""
