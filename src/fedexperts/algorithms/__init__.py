"""Federated algorithms: what is shared or personal, how clients are built, how the server aggregates."""

from fedexperts.algorithms.aggregation import ServerOptimizer, ServerRule, weighted_average

__all__ = ["ServerOptimizer", "ServerRule", "weighted_average"]
