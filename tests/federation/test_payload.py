import pytest
import torch

from fedexperts.federation import Payload, PayloadError, decode, encode, validate_update
from fedexperts.federation.payload import check_metadata_numbers


def sample():
    return Payload(
        {"a.weight": torch.randn(4, 3), "b.bias": torch.randn(5).to(torch.bfloat16), "steps": torch.tensor([7])},
        {"examples": 12, "loss": 0.5, "client": "c1"},
    )


def test_round_trip_is_exact_and_keeps_dtypes():
    payload = sample()
    back = decode(encode(payload))
    assert back.metadata == payload.metadata
    assert back.tensors.keys() == payload.tensors.keys()
    for name, tensor in payload.tensors.items():
        assert back.tensors[name].dtype == tensor.dtype
        assert torch.equal(back.tensors[name], tensor)


def test_byte_count_is_the_encoded_length_and_overhead_is_the_header():
    payload = sample()
    data = encode(payload)
    header = int.from_bytes(data[:8], "little")
    assert len(data) == 8 + header + payload.tensor_bytes


def test_bf16_transfer_halves_float32_bytes():
    payload = Payload({"w": torch.randn(256, 256)})
    full, half = encode(payload), encode(payload, dtype=torch.bfloat16)
    assert 0 < 256 * 256 * 2 - (len(full) - len(half)) < 100  # the header names the cast tensor
    assert decode(half).tensors["w"].dtype == torch.float32  # restored on receipt


def test_garbage_is_refused():
    with pytest.raises(PayloadError, match="not a fedexperts message"):
        decode(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")


def test_metadata_must_be_json():
    with pytest.raises(PayloadError, match="not JSON-able"):
        encode(Payload({}, {"bad": object()}))
    with pytest.raises(PayloadError, match="not JSON-able"):
        encode(Payload({}, {"loss": float("nan")}))


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        ({"w": torch.zeros(2, 2), "x": torch.zeros(1)}, r"unexpected tensors \['x'\]"),
        ({}, r"missing tensors \['w'\]"),
        ({"w": torch.zeros(2, 3)}, r"w has shape \(2, 3\), expected \(2, 2\)"),
        ({"w": torch.zeros(2, 2, dtype=torch.long)}, "expected a floating dtype"),
        ({"w": torch.tensor([[0.0, float("nan")], [float("inf"), 1.0]])}, "2 NaN/Inf values"),
    ],
)
def test_bad_updates_are_refused_naming_sender_and_tensor(tensors, message):
    with pytest.raises(PayloadError, match=f"client-3: .*{message}"):
        validate_update(Payload(tensors), {"w": torch.zeros(2, 2)}, sender="client-3")


def test_partial_updates_when_allowed():
    validate_update(
        Payload({"w": torch.ones(2, 2)}), {"w": torch.zeros(2, 2), "v": torch.zeros(1)}, sender="c", allow_missing=True
    )


def test_non_finite_metrics_are_refused():
    check_metadata_numbers({"loss": 1.0, "name": "x"}, sender="c")
    with pytest.raises(PayloadError, match="'loss' is inf"):
        check_metadata_numbers({"loss": float("inf")}, sender="c")


def test_a_half_precision_transfer_halves_the_bytes_and_restores_each_dtype():
    import torch

    from fedexperts.federation.payload import Payload, decode, encode

    tensors = {"w": torch.randn(64, 64), "ids": torch.arange(4), "p": torch.rand(8, dtype=torch.float64)}
    full, half = encode(Payload(tensors)), encode(Payload(tensors), dtype=torch.float16)
    assert len(half) < 0.55 * len(full)
    back = decode(half)
    assert {name: t.dtype for name, t in back.tensors.items()} == {name: t.dtype for name, t in tensors.items()}
    assert torch.equal(back.tensors["ids"], tensors["ids"])
    assert torch.allclose(back.tensors["w"], tensors["w"], atol=2e-3, rtol=1e-3)
    assert not torch.equal(back.tensors["w"], tensors["w"])  # it really travelled in float16
