import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from fedexperts.federation.client import ClientTask
from fedexperts.federation.flower.wire import (
    payload_to_record,
    record_bytes,
    record_to_payload,
    task_of,
)
from fedexperts.interface import Payload, PayloadError


def test_tensors_metadata_and_task_survive_the_record_with_their_dtypes():
    tensors = {
        "layer.weight": torch.randn(3, 4, dtype=torch.bfloat16),
        "layer.bias": torch.randn(4),
        "activation": torch.rand(8, dtype=torch.float64),
        "half": torch.randn(2, dtype=torch.float16),
    }
    task = ClientTask("client-3", 2, train=False, union=True)
    record = payload_to_record(
        Payload(tensors, {"examples": 7, "phase": "train"}), task=task, commit_round=1, run_uid="0a1b2c"
    )
    arrays = record["arrays"]
    assert isinstance(arrays, ArrayRecord)
    assert arrays["layer.weight"].dtype == "float32"  # numpy has no bfloat16: sent widened, exactly

    back = record_to_payload(record, sender="client-3")
    assert back.metadata == {"examples": 7, "phase": "train"}
    assert back.tensors.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert back.tensors[name].dtype == tensor.dtype
        assert torch.equal(back.tensors[name], tensor)
    assert task_of(record) == (task, 1, "0a1b2c")


def test_a_task_without_a_run_id_or_with_a_path_in_it_is_refused():
    """The node builds a folder name from the run id: nothing but letters and digits gets there."""
    task = ClientTask("client-0", 1)
    with pytest.raises(PayloadError, match="not a fedexperts task"):
        task_of(payload_to_record(Payload({}), task=task))
    with pytest.raises(PayloadError, match="is not an id"):
        task_of(payload_to_record(Payload({}), task=task, run_uid="../../etc"))


def test_bytes_are_flowers_own_count_of_the_records():
    record = payload_to_record(Payload({"w": torch.zeros(100)}, {"examples": 1}))
    arrays = record["arrays"]
    assert record_bytes(record) == arrays.count_bytes() + record["config"].count_bytes()
    assert record_bytes(record) > 100 * 4  # the tensor's raw bytes plus the .npy header and metadata


@pytest.mark.parametrize(
    "content",
    [
        RecordDict({}),
        RecordDict({"arrays": ArrayRecord({}), "config": ConfigRecord({"metadata": "not json", "dtypes": "{}"})}),
        RecordDict(
            {"arrays": ArrayRecord({}), "config": ConfigRecord({"metadata": "{}", "dtypes": '{"ghost": "bfloat16"}'})}
        ),
    ],
)
def test_a_malformed_reply_is_a_payload_error_naming_the_sender(content):
    with pytest.raises(PayloadError, match="client-1"):
        record_to_payload(content, sender="client-1")


def test_float16_transfer_on_flower_and_bfloat16_refused():
    tensors = {"w": torch.randn(32, 32)}
    full = record_bytes(payload_to_record(Payload(tensors)))
    half = payload_to_record(Payload(tensors), dtype=torch.float16)
    assert record_bytes(half) < 0.6 * full
    back = record_to_payload(half, sender="server")
    assert back.tensors["w"].dtype == torch.float32
    assert torch.allclose(back.tensors["w"], tensors["w"], atol=2e-3, rtol=1e-3)
    with pytest.raises(PayloadError, match="float16"):
        payload_to_record(Payload(tensors), dtype=torch.bfloat16)
