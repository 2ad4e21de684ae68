"""Client-level differential privacy around any algorithm: DP-FedAvg's clip and Gaussian noise (docs/privacy.md).

McMahan et al., "Learning Differentially Private Recurrent Language Models" (ICLR 2018), with every client
weighing the same. A client's *update* is its reply minus the global state it started from, over every
tensor the server aggregates; its L2 norm (over all those tensors together, Flower's flat clip) is scaled
down to at most ``privacy.clip``.

* ``central``: the server clips each accepted update and takes ``global + (sum of clipped updates +
  N(0, (z * clip)^2 I)) / m``, ``m`` the clients *sampled* this round, then hands that one result to the
  wrapped algorithm's aggregate (whose server rule, FedAvg's or an adaptive one, applies as ever). Deviations,
  named: the mean is unweighted (DP-FedAvg's ``w_i = 1``; the algorithms' own aggregate weighs clients by
  their examples, which would let a client's example count scale its influence past the clip), and its
  denominator is the number sampled, not the number that replied, so a failed or refused client shrinks the
  step instead of raising everyone's weight (Flower's ``DifferentialPrivacyServerSideFixedClipping`` divides
  by the repliers and warns when they differ). The noise std on the mean is ``z * clip / m``, Flower's
  ``compute_stdv``.
* ``local``: each client clips its own update and adds ``N(0, (z * clip)^2 I)`` before it sends it; the server
  aggregates the noisy replies with the wrapped algorithm's own rule (post-processing).

What stays outside: personal parameters (never sent), and every number a reply's metadata carries (losses,
scores, example counts, timings). The privacy spent is accounted per round (:mod:`.accountant`).
"""

from __future__ import annotations

import hashlib
import math
import secrets
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn

from fedexperts.algorithms.privacy.accountant import Accountant
from fedexperts.algorithms.privacy.config import PrivacySettings
from fedexperts.errors import FedExpertsError
from fedexperts.interface import (
    EXAMPLES_KEY,
    Algorithm,
    ClientContext,
    ClientInfo,
    ClientUpdate,
    LocalData,
    Payload,
    ProximalTerm,
    State,
)
from fedexperts.moe.params import Role

_INNER, _PRIVACY = "algorithm", "privacy"


def _seed(*parts: object) -> int:
    """A 63-bit seed from ``parts`` (stable across processes, unlike ``hash``)."""
    digest = hashlib.sha256("/".join(str(part) for part in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def clip_update(update: dict[str, torch.Tensor], clip: float) -> tuple[dict[str, torch.Tensor], float]:
    """The update scaled to L2 norm at most ``clip`` (over every tensor together), and its norm before."""
    norm = math.sqrt(sum(float(delta.double().square().sum()) for delta in update.values()))
    scale = 1.0 if norm <= clip else clip / norm
    return {name: delta.double() * scale for name, delta in update.items()}, norm


def gaussian(like: dict[str, torch.Tensor], std: float, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Independent ``N(0, std^2)`` per coordinate, in float64, drawn in sorted-name order (reproducible)."""
    return {
        name: torch.randn(like[name].shape, generator=generator, dtype=torch.float64) * std for name in sorted(like)
    }


class PrivateAlgorithm:
    """``inner`` with its shared update clipped and noised (see the module docstring); everything else is its own.

    Attributes it does not define are ``inner``'s, so code that reads an algorithm's own facts still can.
    """

    def __init__(self, inner: Algorithm, settings: PrivacySettings, *, population: int, sample_size: int) -> None:
        if settings.clip is None:
            raise FedExpertsError("privacy.clip must be set to wrap an algorithm in differential privacy")
        self.inner = inner
        self.settings = settings
        self.clip = settings.clip
        self.population, self.sample_size = population, sample_size
        self.accountant = Accountant(
            mode=settings.mode,
            noise_multiplier=settings.noise_multiplier,
            population=population,
            sample_size=sample_size,
            delta=settings.delta,
        )
        self.noise_seed = settings.seed if settings.seed is not None else secrets.randbits(62)
        """Central noise: secret unless ``privacy.seed`` is given; checkpointed with the server state."""
        self._spent: dict[str, Any] | None = None

    def __getattr__(self, name: str) -> Any:
        if name == "inner":  # not yet set (copying, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)

    # -- the Algorithm protocol, delegated ---------------------------------------------------------
    @property
    def name(self) -> str:
        return self.inner.name

    @name.setter
    def name(self, value: str) -> None:
        self.inner.name = value

    @property
    def roles(self) -> dict[str, Role]:
        return self.inner.roles

    @roles.setter
    def roles(self, value: dict[str, Role]) -> None:
        self.inner.roles = value

    @property
    def client_sub_moes(self) -> bool:
        return self.inner.client_sub_moes

    @client_sub_moes.setter
    def client_sub_moes(self, value: bool) -> None:
        self.inner.client_sub_moes = value

    @property
    def counts_routing(self) -> bool:
        return self.inner.counts_routing

    def prepare(self, model: nn.Module) -> None:
        self.inner.prepare(model)

    def client_experts(self, received: Payload) -> dict[str, list[int]] | None:
        return self.inner.client_experts(received)

    def prepare_client_model(self, model: nn.Module) -> None:
        self.inner.prepare_client_model(model)

    def initial_global_state(self, model: nn.Module) -> State:
        return self.inner.initial_global_state(model)

    def downlink(self, global_state: State, client: ClientInfo) -> Payload:
        return self.inner.downlink(global_state, client)

    def setup_client(
        self, model: nn.Module, received: Payload, personal: Payload | None, data: LocalData
    ) -> ClientContext:
        return self.inner.setup_client(model, received, personal, data)

    def proximal_term(self, context: ClientContext) -> ProximalTerm | None:
        return self.inner.proximal_term(context)

    def training_phases(self, context: ClientContext) -> Sequence[AbstractContextManager[object]]:
        return self.inner.training_phases(context)

    def personal_state(self, context: ClientContext) -> Payload | None:
        return self.inner.personal_state(context)

    def check_update(self, update: Payload, global_state: State, client: ClientInfo) -> None:
        self.inner.check_update(update, global_state, client)

    def finish(self) -> None:
        self.inner.finish()

    # -- the client: local clip and noise -----------------------------------------------------------
    def uplink(self, context: ClientContext) -> Payload:
        """``inner``'s reply; in ``local`` mode its update clipped and noised against what the client received."""
        reply = self.inner.uplink(context)
        if self.settings.mode != "local" or not reply.tensors:
            return reply
        started = context.received.tensors
        strays = sorted(set(reply.tensors) - set(started))
        if strays:
            raise FedExpertsError(f"{self.name}: privacy: the reply's {strays[:3]} were not received (no update)")
        update = {name: tensor.double() - started[name].double() for name, tensor in reply.tensors.items()}
        clipped, _norm = clip_update(update, self.clip)
        if self.settings.seed is None:
            generator = torch.Generator().manual_seed(secrets.randbits(63))
        else:
            seed = _seed(self.settings.seed, context.round, context.client.client_id)
            generator = torch.Generator().manual_seed(seed)
        noise = gaussian(clipped, self.settings.noise_multiplier * self.clip, generator)
        tensors = {
            name: (started[name].double() + clipped[name] + noise[name]).to(tensor.dtype)
            for name, tensor in reply.tensors.items()
        }
        return Payload(tensors, reply.metadata)

    # -- the server ---------------------------------------------------------------------------------
    def aggregate(self, global_state: State, updates: Sequence[ClientUpdate]) -> State:
        """Central: the noised mean of clipped updates through ``inner``'s aggregate; local: ``inner``'s own."""
        z = self.settings.noise_multiplier
        clipped_count = 0
        if self.settings.mode == "local" or not updates:
            result = self.inner.aggregate(global_state, updates)
            std = z * self.clip
        else:
            total: dict[str, torch.Tensor] = {}
            for update in updates:
                delta = {
                    name: tensor.double() - global_state[name].detach().cpu().double()
                    for name, tensor in update.payload.tensors.items()
                }
                clipped, norm = clip_update(delta, self.clip)
                clipped_count += norm > self.clip
                for name, value in clipped.items():
                    total[name] = total[name] + value if name in total else value
            generator = torch.Generator().manual_seed(_seed(self.noise_seed, self.accountant.releases + 1))
            noise = gaussian(total, z * self.clip, generator)
            tensors = {
                name: (global_state[name].detach().cpu().double() + (total[name] + noise[name]) / self.sample_size).to(
                    global_state[name].dtype
                )
                for name in total
            }
            one = ClientUpdate(ClientInfo("dp-mean", 1), Payload(tensors, {EXAMPLES_KEY: 1}))
            result = self.inner.aggregate(global_state, [one])
            std = z * self.clip / self.sample_size
        self.accountant.release()
        self._spent = {
            "mode": self.settings.mode,
            "clip": self.clip,
            "noise_multiplier": z,
            "noise_std": std,
            "sampled": self.sample_size,
            "population": self.population,
            "clipped": clipped_count,
            "delta": self.settings.delta,
            "epsilon": self.accountant.epsilon,
            "releases": self.accountant.releases,
        }
        return result

    def privacy_spent(self) -> dict[str, Any] | None:
        """The last round's mechanism and the privacy spent through it (the round record's ``privacy``)."""
        return self._spent

    def server_state(self) -> Payload:
        inner = self.inner.server_state()
        privacy = {"accountant": self.accountant.state(), "noise_seed": self.noise_seed}
        return Payload(inner.tensors, {_INNER: inner.metadata, _PRIVACY: privacy})

    def load_server_state(self, state: Payload) -> None:
        privacy = state.metadata.get(_PRIVACY)
        if not isinstance(privacy, dict) or not isinstance(privacy.get("accountant"), dict):
            raise FedExpertsError("the checkpoint holds no privacy accountant, but privacy.clip is set")
        self.accountant.load(privacy["accountant"])
        self.noise_seed = int(privacy["noise_seed"])
        self.inner.load_server_state(Payload(state.tensors, state.metadata.get(_INNER, {})))
