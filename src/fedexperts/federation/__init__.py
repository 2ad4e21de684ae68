"""Moving named tensors between server and clients, and keeping state safe."""

from fedexperts.federation.payload import Payload, PayloadError, decode, encode, validate_update

__all__ = ["Payload", "PayloadError", "decode", "encode", "validate_update"]
