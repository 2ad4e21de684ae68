"""Shared pieces of the FedMoE tests that use a model: building, preparing and stepping the algorithm."""

import torch

from fedexperts.algorithms.fedmoe.algorithm import HELD_KEY, SCORE_KEY, FedMoE
from fedexperts.algorithms.fedmoe.config import FedMoEConfig, FedMoEOptions, RandomMoEConfig, RandomMoEOptions
from fedexperts.algorithms.fedmoe.random_moe import RandomMoE
from fedexperts.algorithms.settings import ExpertWeighting, ServerConfig
from fedexperts.federation.payload import decode, encode
from fedexperts.interface import ClientInfo, ClientUpdate, LocalData, Payload
from fedexperts.models import tiny_model
from tests.algorithms.helpers import batches_for

LAYERS = 3  # the tiny OLMoE: 3 MoE layers of 8 experts, top-2


def _budgets(budgets, settings):
    """Named budgets as the config gives them: a list in client order, and those client ids."""
    if budgets is None:
        return None
    settings["budgets"] = list(budgets.values())
    return list(budgets)


MECHANICS = {"warmup_rounds": 0, "wait_for_stage_1": False}
"""Settings of the mechanics tests: profiling measures at once and budget clients never wait (the paper's schedule,
the config's default, has its own tests)."""


def fedmoe(budgets=None, *, server=None, expert_weighting=ExpertWeighting.EXAMPLES, **settings):
    """``FedMoE`` with ``budgets`` by client id (``None``: ``budget_fraction``) and other ``fedmoe`` settings."""
    settings = {**MECHANICS, **settings}
    client_ids = _budgets(budgets, settings)
    options = FedMoEOptions(**settings)
    config = FedMoEConfig(server=server or ServerConfig(), fedmoe=options, expert_weighting=expert_weighting)
    return FedMoE(config, client_ids=client_ids)


def random_moe(budgets=None, **settings):
    settings = {**MECHANICS, **settings}
    client_ids = _budgets(budgets, settings)
    return RandomMoE(RandomMoEConfig(fedmoe=RandomMoEOptions(**settings)), client_ids=client_ids)


def prepared(algorithm):
    model = tiny_model("olmoe")
    algorithm.prepare(model)
    return model, algorithm.initial_global_state(model)


def step(algorithm, model, state, client, *, seed=0, categories=None):
    """One untrained client step through the wire format: downlink, setup (profiling measures), uplink, check."""
    info = ClientInfo(client, 4)
    received = decode(encode(algorithm.downlink(state, info)))
    batches = batches_for(model, seed)
    data = LocalData(info, lambda: iter(batches), categories=categories or {})
    context = algorithm.setup_client(model, received, None, data)
    reply = decode(encode(algorithm.uplink(context)))
    algorithm.check_update(reply, state, info)
    return ClientUpdate(info, reply)


def per_layer(*experts):
    return [list(experts) for _ in range(LAYERS)]


def filled(algorithm, model, state, client, value):
    """A reply whose every trained tensor (dense and held rows) is ``value``."""
    info = ClientInfo(client, 1)
    context = algorithm.setup_client(model, decode(encode(algorithm.downlink(state, info))), None, LocalData(info))
    with torch.no_grad():
        for name in [*algorithm.layout.dense, *algorithm.layout.rows]:
            context.model.get_parameter(name).fill_(value)
    return decode(encode(algorithm.uplink(context)))


def echo(algorithm, state, client, score=None):
    """The client's downlink sent straight back (a reply of the right shapes), with a score."""
    info = ClientInfo(client, 4)
    payload = algorithm.downlink(state, info)
    metadata = {"examples": 4, "fedmoe_phase": payload.metadata["fedmoe_phase"], HELD_KEY: payload.metadata[HELD_KEY]}
    if score is not None:
        metadata[SCORE_KEY] = score
    reply = Payload(dict(payload.tensors), metadata)
    algorithm.check_update(reply, state, info)
    return ClientUpdate(info, reply)


def activation(*hot):
    vector = torch.full((8,), 0.01, dtype=torch.float64)
    vector[list(hot)] = 1.0
    return [vector.clone() for _ in range(LAYERS)]
