"""Algorithm tests' training batches (random tokens, the first four positions unsupervised) and client rounds."""

import torch

from fedexperts.config import TrainConfig
from fedexperts.data import IGNORE_INDEX
from fedexperts.interface import ClientInfo, ClientUpdate, LocalData
from fedexperts.training import train_local


def batches_for(model, seed, count=2):
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(3, model.config.vocab_size, (4, 12), generator=generator)
        labels = ids.clone()
        labels[:, :4] = IGNORE_INDEX
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def train_phases(algorithm, context, batches, *, steps=3, learning_rate=5e-2):
    """Train ``context.model`` as the client step does: ``steps`` steps inside each of the algorithm's phases."""
    settings = TrainConfig(steps_per_round=steps, learning_rate=learning_rate)
    for phase in algorithm.training_phases(context):
        with phase:
            train_local(context.model, batches, settings)


def client_round(algorithm, model, global_state, name, *, seed, examples=8, personal=None, round_number=1):
    """One client's round on ``model``: setup from the downlink and its kept state, training, uplink and state."""
    info = ClientInfo(name, examples)
    batches = batches_for(model, seed)
    data = LocalData(info, lambda: iter(batches), round_number)
    context = algorithm.setup_client(model, algorithm.downlink(global_state, info), personal, data)
    torch.manual_seed(seed)
    train_phases(algorithm, context, batches)
    return ClientUpdate(info, algorithm.uplink(context)), algorithm.personal_state(context)


def assert_states_and_checkpoint_split(result, personal: str, shared: str) -> None:
    """Two ok rounds; client states hold only ``personal`` keys, the last checkpoint's shared ones ``shared``."""
    from safetensors.torch import load_file

    assert [line["kind"] for line in result.records] == ["run", "round", "round", "final"]
    for record in result.records[1:3]:
        assert all(entry["status"] == "ok" for entry in record["clients"].values())
    states = sorted((result.run_dir / "clients").glob("*.safetensors"))
    assert [path.stem for path in states] == ["client-0", "client-1", "client-2"]
    for path in states:
        assert load_file(path) and all(personal in key for key in load_file(path))
    checkpoint = sorted((result.run_dir / "checkpoints").glob("round-*.safetensors"))[-1]
    kept = [key for key in load_file(checkpoint) if key.startswith("global/")]
    assert kept and all(shared in key for key in kept)
