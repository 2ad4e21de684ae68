import pytest
import torch

from fedexperts.federation.state import CheckpointStore, ClientStateStore
from fedexperts.interface import Payload, PayloadError


def test_client_state_round_trips_and_is_absent_before_first_save(tmp_path):
    store = ClientStateStore(tmp_path)
    assert store.load("client-7") is None
    state = Payload({"gate.weight": torch.randn(2, 4), "steps": torch.tensor([3])}, {"round": 2, "experts": [1, 5]})
    store.save("client-7", state)
    loaded = store.load("client-7")
    assert loaded is not None and loaded.metadata == state.metadata
    assert all(torch.equal(loaded.tensors[k], v) for k, v in state.tensors.items())


@pytest.mark.parametrize("client_id", ["", "../escape", "a/b", ".hidden", "x" * 129])
def test_unsafe_client_ids_are_refused(tmp_path, client_id):
    with pytest.raises(PayloadError, match="client id"):
        ClientStateStore(tmp_path).save(client_id, Payload({}))


def test_corrupt_client_state_is_a_clear_error(tmp_path):
    store = ClientStateStore(tmp_path)
    store.path("c1").write_bytes(b"garbage")
    with pytest.raises(PayloadError, match="unreadable state file"):
        store.load("c1")


def test_checkpoints_carry_their_round_and_a_misnamed_one_is_refused(tmp_path):
    store = CheckpointStore(tmp_path / "ckpt")
    assert store.latest() is None
    for round_number in (1, 2, 3):
        store.save(round_number, Payload({"w": torch.full((2,), float(round_number))}, {"seed": 5}))
    assert store.rounds() == [1, 2, 3]  # which to keep is the run's business (RunStore)
    latest = store.latest()
    assert latest is not None
    round_number, state = latest
    assert round_number == 3 and state.metadata == {"seed": 5, "round": 3}
    assert torch.equal(state.tensors["w"], torch.full((2,), 3.0))
    store.path(1).rename(store.path(4))
    for read in (store.load, store.check):
        with pytest.raises(PayloadError, match="holds round 1, expected 4"):
            read(4)


def test_a_committed_client_state_that_vanishes_is_an_error_not_a_fresh_start(tmp_path):
    store = ClientStateStore(tmp_path)
    store.stage(1, "c1", Payload({"w": torch.ones(2)}))
    assert store.staged(1) == {tmp_path / "c1.safetensors": tmp_path / ".staging" / "round-000001" / "c1.safetensors"}
    store.commit(1)
    assert store.staged(1) == {}
    store.path("c1").unlink()
    with pytest.raises(PayloadError, match="committed personal state of c1 is missing"):
        store.load("c1")
    store.save("c2", Payload({"w": torch.ones(2)}))
    reopened = ClientStateStore(tmp_path)  # what it finds when it opens counts as committed too
    store.path("c2").unlink()
    with pytest.raises(PayloadError, match="c2 is missing"):
        reopened.load("c2")


def test_a_torn_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    store = CheckpointStore(tmp_path)
    store.save(1, Payload({"w": torch.ones(2)}))

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("fedexperts.atomic.save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        store.save(2, Payload({"w": torch.zeros(2)}))
    assert store.rounds() == [1]
    assert [p.name for p in tmp_path.iterdir()] == ["round-000001.safetensors"]


def test_a_committed_state_names_the_round_it_was_trained_in(tmp_path):
    store = ClientStateStore(tmp_path)
    assert store.round_of("client-0") is None
    store.stage(3, "client-0", Payload({"w": torch.ones(2)}, {"k": 1}))
    assert store.round_of("client-0") is None  # staged, not committed
    store.commit(3)
    assert store.round_of("client-0") == 3
    assert store.load("client-0").metadata == {"k": 1}  # the round rides in the header, not in the state's metadata
    store.save("client-1", Payload({"w": torch.ones(2)}))
    with pytest.raises(PayloadError, match="does not name the round"):
        store.round_of("client-1")
