"""fedexperts: federated fine-tuning of Mixture-of-Experts LLMs with personalized experts."""

from fedexperts.errors import FedExpertsError, SurgeryError, UnsupportedModelError

__version__ = "0.1.0"

__all__ = ["FedExpertsError", "SurgeryError", "UnsupportedModelError", "__version__"]
