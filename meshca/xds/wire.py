"""Protobuf wire framing: varints and length-delimited fields, with the common keys and sizes precomputed."""

from __future__ import annotations

_SMALL_VARINTS = tuple(bytes((i,)) for i in range(128))


def varint(value: int) -> bytes:
    """A non-negative protobuf varint."""
    if value < 128:
        return _SMALL_VARINTS[value]
    out = bytearray()
    while value > 127:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_LENGTH_DELIMITED_KEYS = tuple(varint(number << 3 | 2) for number in range(40))


def length_delimited(field_number: int, payload: bytes) -> bytes:
    """One protobuf length-delimited field (wire type 2): a sub-message, string or bytes, even empty."""
    key = _LENGTH_DELIMITED_KEYS[field_number] if field_number < 40 else varint(field_number << 3 | 2)
    size = len(payload)
    return key + (_SMALL_VARINTS[size] if size < 128 else varint(size)) + payload
