"""Protobuf's wire format, the little of it torpor writes and reads by hand (pure).

Owns: varints and length-delimited fields. The route table is joined from each virtual
host's cached bytes (resources.py) and a shape's serialization is cut into literal bytes
and placeholder fields (validation.py) without building or parsing messages: both need
exactly these two pieces of the encoding, and they must agree.
"""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=4096)
def varint(n: int) -> bytes:
    """`n` (not negative) as a base-128 varint; cached, since lengths and tags repeat."""
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def read_varint(data: bytes, pos: int) -> tuple[int, int]:
    """The varint at `data[pos:]` and the position after it; ValueError when `data` ends
    inside it."""
    result = shift = 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def length_delimited(field_number: int, value: bytes) -> bytes:
    """One length-delimited field (a string or a message)."""
    return varint(field_number << 3 | 2) + varint(len(value)) + value
