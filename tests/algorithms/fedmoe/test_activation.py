"""Activation vectors: the estimate for clients that cannot measure; no model."""

import pytest
import torch

from fedexperts.algorithms.fedmoe.activation import estimate_activation, normalised, normalised_layers, uniform_prior
from fedexperts.errors import FedExpertsError


def vectors(*rows):
    return [torch.tensor(row, dtype=torch.float64) for row in rows]


# -- activation estimate ---------------------------------------------------------------------------


def test_estimate_is_the_data_weighted_mean_of_normalised_neighbours():
    estimate = estimate_activation(
        [
            (vectors([1, 0], [0.5, 0.5, 0]), 1),
            (vectors([0, 2], [0, 0, 4]), 3),  # un-normalised: [0, 1] and [0, 0, 1]
        ]
    )
    torch.testing.assert_close(estimate[0], torch.tensor([0.25, 0.75], dtype=torch.float64))
    torch.testing.assert_close(estimate[1], torch.tensor([0.125, 0.125, 0.75], dtype=torch.float64))


def test_estimate_errors():
    with pytest.raises(FedExpertsError, match="no client of the same category"):
        estimate_activation([])
    with pytest.raises(FedExpertsError, match="disagree on the expert count"):
        estimate_activation([(vectors([1, 0]), 1), (vectors([1, 0, 0]), 1)])
    with pytest.raises(FedExpertsError, match="layers"):
        estimate_activation([(vectors([1, 0]), 1), (vectors([1, 0], [1]), 1)])
    with pytest.raises(FedExpertsError, match="no examples"):
        estimate_activation([(vectors([1, 0]), 0)])


def test_normalising_and_the_prior():
    torch.testing.assert_close(
        normalised(torch.tensor([1.0, 3.0]), "x"), torch.tensor([0.25, 0.75], dtype=torch.float64)
    )
    with pytest.raises(FedExpertsError, match="x: activation is all zero"):
        normalised(torch.zeros(2), "x")
    (layer,) = normalised_layers([torch.tensor([2.0, 2.0], dtype=torch.float32)])
    assert layer.dtype == torch.float64 and layer.tolist() == [0.5, 0.5]
    assert [v.tolist() for v in uniform_prior([2, 4])] == [[0.5, 0.5], [0.25] * 4]
