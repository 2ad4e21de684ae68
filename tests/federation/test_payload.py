import random

import pytest
import torch

from fedexperts.federation import decode, encode
from fedexperts.federation.payload import encoded_header, encoded_size, payload_size
from fedexperts.interface import Payload, PayloadError, check_metadata_numbers, validate_update


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
        ({"w": torch.zeros(2, 2, dtype=torch.long)}, "has dtype torch.int64, expected torch.float32"),
        ({"w": torch.zeros(2, 2, dtype=torch.float64)}, "has dtype torch.float64, expected torch.float32"),
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

    from fedexperts.federation.payload import decode, encode
    from fedexperts.interface import Payload

    tensors = {"w": torch.randn(64, 64), "ids": torch.arange(4), "p": torch.rand(8, dtype=torch.float64)}
    full, half = encode(Payload(tensors)), encode(Payload(tensors), dtype=torch.float16)
    assert len(half) < 0.55 * len(full)
    back = decode(half)
    assert {name: t.dtype for name, t in back.tensors.items()} == {name: t.dtype for name, t in tensors.items()}
    assert torch.equal(back.tensors["ids"], tensors["ids"])
    assert torch.allclose(back.tensors["w"], tensors["w"], atol=2e-3, rtol=1e-3)
    assert not torch.equal(back.tensors["w"], tensors["w"])  # it really travelled in float16


# -- size without bytes: encoded_size / payload_size are len(encode(...)) exactly ----------------------
_DTYPES = [
    torch.float32,
    torch.bfloat16,
    torch.float16,
    torch.float64,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
    torch.float8_e4m3fn,
]
_NAMES = [
    "a",
    "b.weight",
    "model.layers.0.q_proj.lora_A.default.weight",
    "z",
    "é-ünïcode",
    'quote"back\\slash',
    "tab\tnl\n",
]
_METADATA = [{}, {"examples": 7}, {"examples": 123456, "loss": 0.25, "client": "é", "tags": ["x", {"k": None}]}]


def random_payload(seed: int) -> Payload:
    rng = random.Random(seed)
    tensors = {}
    for index in range(rng.randint(0, 6)):
        shape = tuple(rng.randint(0, 5) if rng.random() < 0.1 else rng.randint(1, 9) for _ in range(rng.randint(0, 3)))
        dtype = rng.choice(_DTYPES)
        tensors[f"{rng.choice(_NAMES)}.{index}"] = torch.zeros(shape, dtype=dtype)
    return Payload(tensors, rng.choice(_METADATA))


@pytest.mark.parametrize("transfer", [None, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("seed", range(12))
def test_encoded_size_is_the_length_of_encode_byte_for_byte(seed, transfer):
    payload = random_payload(seed)
    data = encode(payload, dtype=transfer)
    specs = {name: (tuple(tensor.shape), tensor.dtype) for name, tensor in payload.tensors.items()}
    assert encoded_size(specs, payload.metadata, dtype=transfer) == len(data)
    header_length = int.from_bytes(data[:8], "little")
    assert encoded_header(specs, payload.metadata, dtype=transfer) == data[8 : 8 + header_length]
    meta = Payload({name: tensor.to("meta") for name, tensor in payload.tensors.items()}, payload.metadata)
    assert payload_size(meta, dtype=transfer) == len(data)


def test_encoded_size_covers_every_dtype_at_once_and_scalars():
    payload = Payload(
        {f"t{index}": torch.zeros((), dtype=dtype) for index, dtype in enumerate(_DTYPES)} | {"empty": torch.zeros(0)},
        {"examples": 1},
    )
    assert payload_size(payload) == len(encode(payload))


def test_encoded_size_refuses_metadata_that_encode_refuses():
    with pytest.raises(PayloadError, match="not JSON-able"):
        encoded_size({}, {"loss": float("nan")})
