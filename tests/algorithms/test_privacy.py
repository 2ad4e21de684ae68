"""Client-level differential privacy around an algorithm: clipping, the noise's std, the accountant's epsilon,
checkpointed accounting, config refusals, and short DP runs of FedAvg and FLEx with epsilon in summary.md."""

from __future__ import annotations

import math

import pytest
import torch
from dp_accounting import dp_event
from dp_accounting.privacy_accountant import NeighboringRelation
from dp_accounting.rdp import RdpAccountant

from fedexperts.algorithms.fedavg.algorithm import FedAvg
from fedexperts.algorithms.fedavg.config import FedAvgConfig
from fedexperts.algorithms.privacy import PrivacySettings
from fedexperts.algorithms.privacy.wrapper import PrivateAlgorithm, clip_update
from fedexperts.config import ConfigError, load_config
from fedexperts.interface import ClientContext, ClientInfo, ClientUpdate, Payload
from fedexperts.models import tiny_model

POPULATION, SAMPLED, CLIP, Z = 10, 4, 0.5, 1.3


@pytest.fixture(scope="module")
def prepared():
    model = tiny_model("olmoe")
    inner = FedAvg(FedAvgConfig())
    inner.prepare(model)
    return model, inner, inner.initial_global_state(model)


def private(inner, mode="central", seed=3, noise_multiplier=Z):
    settings = PrivacySettings(clip=CLIP, noise_multiplier=noise_multiplier, mode=mode, seed=seed)
    return PrivateAlgorithm(inner, settings, population=POPULATION, sample_size=SAMPLED)


def replies(state, shifts):
    return [
        ClientUpdate(ClientInfo(f"c{index}", 5 + index), Payload({k: v + shift for k, v in state.items()}, {}))
        for index, shift in enumerate(shifts)
    ]


def flat(state, start):
    return torch.cat([(state[name].double() - start[name].double()).flatten() for name in sorted(state)])


def test_clip_bounds_the_norm_and_keeps_small_updates():
    generator = torch.Generator().manual_seed(0)
    for scale in (0.01, 1.0, 100.0):
        update = {"a": torch.randn(30, generator=generator) * scale, "b": torch.randn(4, 5, generator=generator)}
        clipped, norm = clip_update(update, CLIP)
        after = math.sqrt(sum(float(t.square().sum()) for t in clipped.values()))
        assert after <= CLIP * (1 + 1e-12)
        if norm <= CLIP:
            assert all(torch.equal(clipped[k], update[k].double()) for k in update)


def test_each_contribution_is_clipped_and_the_noise_std_is_z_clip_over_the_sampled(prepared):
    _model, inner, state = prepared
    noise_only = flat(private(inner).aggregate(state, replies(state, [0.0, 0.0, 0.0])), state)
    # same seed, same round: the same noise; what differs is the sum of the clipped updates over m
    shifted = flat(private(inner).aggregate(state, replies(state, [10.0, 10.0, -10.0])), state)
    clipped_sum = (shifted - noise_only) * SAMPLED
    per_client = torch.full_like(clipped_sum, 1.0)
    per_client *= CLIP / per_client.norm()  # each +-10 update, clipped: norm CLIP along the all-ones direction
    torch.testing.assert_close(clipped_sum, per_client, rtol=0, atol=1e-5)  # (+1 +1 -1) clipped contributions
    # the noise: N(0, (z clip / m)^2) per coordinate. The seed is fixed (no flake), and over > 5000 coordinates the
    # sample std's standard error is < 1%, so 6% is > 6 standard errors: a wrong std (off by any factor) fails
    expected = Z * CLIP / SAMPLED
    assert noise_only.numel() > 5000
    assert abs(float(noise_only.std()) / expected - 1) < 0.06
    assert abs(float(noise_only.mean())) < 5 * expected / math.sqrt(noise_only.numel())


def test_local_noise_on_an_unchanged_reply_has_std_z_clip(prepared):
    model, inner, state = prepared
    algorithm = private(inner, mode="local")
    received = Payload(dict(state))
    context = inner.setup_client(model, received, None, _local(received))
    sent = flat(algorithm.uplink(context).tensors, state)
    assert abs(float(sent.std()) / (Z * CLIP) - 1) < 0.06


def _local(received):
    from fedexperts.interface import LocalData

    return LocalData(ClientInfo("c0", 5), round=2)


@pytest.mark.parametrize("mode", ["central", "local"])
def test_epsilon_is_the_accountants_own_number_for_the_schedule(prepared, mode):
    _model, inner, state = prepared
    algorithm = private(inner, mode=mode)
    rounds = 3
    for _ in range(rounds):
        algorithm.aggregate(state, replies(state, [0.0, 0.0]))
    spent = algorithm.privacy_spent()
    if mode == "central":  # fixed-size sampling without replacement of SAMPLED of POPULATION, replace-one
        reference = RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_ONE)
        event = dp_event.SampledWithoutReplacementDpEvent(POPULATION, SAMPLED, dp_event.GaussianDpEvent(Z / 2))
    else:  # each round's replies, seen by the server: no amplification
        reference = RdpAccountant()
        event = dp_event.GaussianDpEvent(Z / 2)
    reference.compose(event, rounds)
    assert spent["releases"] == rounds
    assert spent["epsilon"] == pytest.approx(reference.get_epsilon(1e-5), rel=1e-12)
    assert spent["noise_std"] == pytest.approx(Z * CLIP / (SAMPLED if mode == "central" else 1))


def test_a_restored_server_state_continues_noise_and_accounting_bit_exactly(prepared):
    _model, inner, state = prepared
    straight = private(inner, seed=None)
    straight.aggregate(state, replies(state, [0.1]))
    saved = straight.server_state()
    expected = straight.aggregate(state, replies(state, [0.2]))
    resumed = private(inner, seed=None)  # a new secret seed, replaced by the checkpoint's
    resumed.load_server_state(saved)
    got = resumed.aggregate(state, replies(state, [0.2]))
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert resumed.privacy_spent() == straight.privacy_spent()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["algorithm.name=fedmoe"], "privacy.clip cannot wrap algorithm 'fedmoe'"),
        (["algorithm.name=local"], "privacy.clip cannot wrap algorithm 'local'"),
        (["algorithm.name=fedavg", "algorithm.expert_weighting=tokens", "algorithm.scope=non-expert"], "'examples'"),
        (["algorithm.name=fedavg", "federation.sampling=distinct"], "federation.sampling 'random'"),
        (["privacy.noise_multiplier=0"], "privacy.noise_multiplier"),
    ],
)
def test_unsupported_combinations_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["privacy.clip=1.0", *overrides])


@pytest.mark.parametrize("algorithm", ["fedavg", "flex"])
def test_a_dp_run_completes_with_epsilon_in_its_summary(micro_model_path, tmp_path, algorithm):
    from fedexperts.federation.inprocess import run_experiment
    from fedexperts.reporting import write_report
    from tests.federation.helpers import assert_same_run, cheap_config, stopped_after

    seeded = ["privacy.seed=11"] if algorithm == "fedavg" else []  # FLEx: the secret seed of the default
    config = cheap_config(
        micro_model_path,
        tmp_path,
        f"algorithm.name={algorithm}",
        "federation.clients=3",
        "federation.fraction=0.6",
        "federation.rounds=2",
        "train.steps_per_round=1",
        "privacy.clip=0.1",
        "privacy.noise_multiplier=1.1",
        *seeded,
    )
    result = run_experiment(config, tmp_path / "run")
    last = [record for record in result.records if record["kind"] == "round"][-1]["privacy"]
    assert last["releases"] == 2 and last["sampled"] == 2 and last["epsilon"] > 0
    write_report(result.run_dir)
    summary = (result.run_dir / "summary.md").read_text()
    assert f"epsilon {last['epsilon']:.4g} at delta 1e-05 after 2 rounds" in summary
    if seeded:  # killed after round 1 and resumed: the same noise, the same epsilon, bit-identical state
        resumed = stopped_after(config, tmp_path / "resumed", 1)
        run_experiment(config, resumed, resume=True)
        assert_same_run(result.run_dir, resumed)


def test_the_context_type_is_the_algorithms_own(prepared):
    """The wrapper changes no client-side object: the context is the wrapped algorithm's."""
    model, inner, state = prepared
    algorithm = private(inner)
    received = Payload(dict(state))
    assert type(algorithm.setup_client(model, received, None, _local(received))) is ClientContext
