"""The data messages of `kvweave.v1.KVTransfer.Fetch`, encoded and decoded by hand.

Plain protobuf on the wire (any client or server built from the .proto interoperates), but a data
piece is built with one copy of its bytes instead of protobuf's three (into bytes, into the
message, out of it), and decoded in place: `decode_response` returns where the data sits in the
received buffer.
"""
from __future__ import annotations

import struct

from google.protobuf.message import DecodeError

from kvstore.codec import checksum
from kvweave.v1 import kvtransfer_pb2


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_chunk(layer: int, offset: int, data) -> bytes:
    """The serialized FetchResponse{chunk: LayerChunk{layer, offset, data, checksum}}, built with one
    copy of `data` (protobuf would copy it three times: into bytes, into the message, out of it)."""
    inner = (b"\x08" + _varint(layer) + b"\x10" + _varint(offset) + b"\x21" + struct.pack("<Q", checksum(data))
             + b"\x1a" + _varint(len(data)))
    return b"".join((b"\x12", _varint(len(inner) + len(data)), inner, data))


def proto_chunk(layer: int, offset: int, data) -> kvtransfer_pb2.FetchResponse:
    """The same piece as a protobuf message (for servers whose serializer is protobuf's)."""
    return kvtransfer_pb2.FetchResponse(chunk=kvtransfer_pb2.LayerChunk(
        layer=layer, offset=offset, data=bytes(data), checksum=checksum(data)))


def serialize_response(msg) -> bytes:
    """The Fetch stream's serializer: pieces from `encode_chunk` are already bytes."""
    return msg if isinstance(msg, bytes) else msg.SerializeToString()


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift >= 64:
            raise ValueError("varint longer than 64 bits")


def _fields(buf: bytes, pos: int, end: int):
    """(field number, wire type, value) of the protobuf fields in buf[pos:end]; a length-delimited
    field's value is its (start, end) in buf."""
    while pos < end:
        key, pos = _read_varint(buf, pos)
        field, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, pos = _read_varint(buf, pos)
        elif wire_type == 1:
            value, pos = int.from_bytes(buf[pos:pos + 8], "little"), pos + 8
        elif wire_type == 2:
            size, pos = _read_varint(buf, pos)
            value, pos = (pos, pos + size), pos + size
        elif wire_type == 5:
            value, pos = int.from_bytes(buf[pos:pos + 4], "little"), pos + 4
        else:
            raise ValueError(f"unsupported wire type {wire_type}")
        if pos > end:
            raise ValueError("truncated field")
        yield field, wire_type, value


def decode_response(buf: bytes):
    """A serialized FetchResponse as ("header", FetchHeader), ("chunk", layer, offset, (start, end) of
    the data in buf, checksum) or ("empty",); ValueError when malformed. The data is not copied."""
    kind = ("empty",)
    for field, wire_type, value in _fields(buf, 0, len(buf)):
        if field == 1 and wire_type == 2:  # oneof: the last one wins
            try:
                kind = ("header", kvtransfer_pb2.FetchHeader.FromString(buf[value[0]:value[1]]))
            except DecodeError as e:
                raise ValueError(f"bad header: {e}") from None
        elif field == 2 and wire_type == 2:
            layer = offset = data_checksum = 0
            data = (value[0], value[0])
            for f, wt, v in _fields(buf, value[0], value[1]):
                if (f, wt) == (1, 0):
                    layer = v
                elif (f, wt) == (2, 0):
                    offset = v
                elif (f, wt) == (3, 2):
                    data = v
                elif (f, wt) == (4, 1):
                    data_checksum = v
                elif f in (1, 2, 3, 4):
                    raise ValueError(f"LayerChunk field {f} has wire type {wt}")
            kind = ("chunk", layer, offset, data, data_checksum)
        elif field in (1, 2):
            raise ValueError(f"FetchResponse field {field} has wire type {wire_type}")
    return kind
