"""The entry codec: headers that round-trip and catch any damage, payload checksums, layouts."""
from __future__ import annotations

import pytest
import torch

from kvstore.codec import (HEADER_BYTES, CorruptEntryError, KVLayout, as_bytes, checksum, decode_header,
                           encode_header, from_bytes, verify)

KEY = bytes(range(16))
LAYOUTS = [KVLayout(torch.bfloat16, (2, 30, 3, 16, 64)), KVLayout(torch.float32, (7,)),
           KVLayout(torch.int8, (1, 2, 3, 4, 5, 6))]


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
@pytest.mark.parametrize("kind", ["block", "chunk"])
def test_header_round_trip(layout, kind):
    data = encode_header(KEY, layout, 0xDEADBEEF12345678, kind)
    assert len(data) == HEADER_BYTES
    header = decode_header(data)
    assert (header.key, header.kind, header.layout, header.payload_bytes, header.checksum) == (
        KEY, kind, layout, layout.nbytes, 0xDEADBEEF12345678)


def test_every_single_byte_flip_in_a_header_is_detected():
    data = encode_header(KEY, LAYOUTS[0], checksum(b"payload"))
    for i in range(HEADER_BYTES):
        for mask in (0x01, 0x80, 0xFF):
            damaged = bytearray(data)
            damaged[i] ^= mask
            with pytest.raises(CorruptEntryError):
                decode_header(bytes(damaged))


def test_a_short_or_empty_header_is_detected():
    data = encode_header(KEY, LAYOUTS[1], 1)
    with pytest.raises(CorruptEntryError, match="truncated"):
        decode_header(data[:-1])
    with pytest.raises(CorruptEntryError, match="magic"):
        decode_header(bytes(HEADER_BYTES))  # an erased slot


def test_encode_refuses_a_key_of_the_wrong_size():
    with pytest.raises(ValueError, match="16 bytes"):
        encode_header(KEY[:8], LAYOUTS[1], 1)


def test_payload_checksum():
    layout = LAYOUTS[0]
    value = torch.randn(layout.shape).to(layout.dtype)
    payload = as_bytes(value)
    header = decode_header(encode_header(KEY, layout, checksum(payload)))
    verify(header, payload)
    damaged = bytearray(payload)
    damaged[len(damaged) // 2] ^= 0x04
    with pytest.raises(CorruptEntryError, match="checksum"):
        verify(header, damaged)
    with pytest.raises(CorruptEntryError, match="bytes"):
        verify(header, payload[:-2])


def test_bytes_round_trip_without_copies():
    layout = LAYOUTS[0]
    value = torch.randn(layout.shape).to(layout.dtype)
    data = as_bytes(value)
    assert len(data) == layout.nbytes
    back = from_bytes(data, layout)
    assert back.dtype == layout.dtype and tuple(back.shape) == layout.shape and torch.equal(back, value)
    assert back.data_ptr() == value.data_ptr()  # a view of the same memory
    copy = from_bytes(bytes(data), layout)  # read-only bytes: a writable copy
    copy.fill_(0)
    assert torch.equal(back, value) and not torch.equal(copy, value)
    assert torch.equal(from_bytes(as_bytes(value.transpose(0, 1)), KVLayout(layout.dtype, (30, 2, 3, 16, 64))),
                       value.transpose(0, 1))


def test_from_bytes_refuses_the_wrong_size():
    layout = LAYOUTS[1]
    with pytest.raises(CorruptEntryError, match="28"):
        from_bytes(bytes(27), layout)
    with pytest.raises(CorruptEntryError):
        from_bytes(bytes(29), layout)


def test_layout_validation():
    layout = KVLayout(torch.bfloat16, [2, 3])
    assert layout.shape == (2, 3) and layout == KVLayout(torch.bfloat16, torch.Size([2, 3]))
    assert layout.nbytes == 12 and str(layout) == "bfloat16[2, 3]"
    assert KVLayout.of(torch.zeros(4, 5, dtype=torch.float16)) == KVLayout(torch.float16, (4, 5))
    with pytest.raises(ValueError, match="unsupported KV dtype"):
        KVLayout(torch.float64, (2,))
    for shape in [(), (2, 0), (3, -1), (1,) * 7]:
        with pytest.raises(ValueError, match="positive dims"):
            KVLayout(torch.float16, shape)
