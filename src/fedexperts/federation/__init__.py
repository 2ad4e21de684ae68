"""Runtimes: the server loop over a transport, in-process and Flower; the wire format; state stores."""

from fedexperts.federation.payload import decode, encode

__all__ = ["decode", "encode"]
