"""AIRLOCK-STREAM-1: round trips, and every attack refused with an error that names the file."""

from __future__ import annotations

import io
import os
import struct

import pytest

from appliance.vault.errors import StreamError
from appliance.vault.stream import (
    MAX_SEGMENT_SIZE,
    MIN_SEGMENT_SIZE,
    TAG_SIZE,
    build_header,
    decrypt_bytes,
    decrypt_stream,
    encrypt_bytes,
    encrypt_stream,
    read_header,
)

DEK = bytes(range(32))
DEK_ID = b"\x11" * 16
OBJ = "dataset-1/shard-0"
SEG = MIN_SEGMENT_SIZE
LABEL = "/vault/objects/dataset-1/shard-0.alv"


def _seal(data: bytes, *, object_id: str = OBJ, dek: bytes = DEK) -> bytes:
    return encrypt_bytes(data, dek=dek, dek_id=DEK_ID, object_id=object_id, segment_size=SEG)


def _open(blob: bytes, *, object_id: str = OBJ, expected: bytes | None = DEK_ID) -> bytes:
    return decrypt_bytes(blob, dek=DEK, object_id=object_id, label=LABEL, expected_dek_id=expected)


def _split(blob: bytes) -> tuple[bytes, list[bytes]]:
    header = read_header(io.BytesIO(blob), LABEL)
    body = blob[len(header.raw):]
    step = SEG + TAG_SIZE
    return header.raw, [body[i:i + step] for i in range(0, len(body), step)]


PLAIN = os.urandom(3 * SEG + 100)  # four segments, the last one short


@pytest.mark.parametrize("size", [0, 1, SEG - 1, SEG, SEG + 1, 2 * SEG, 3 * SEG + 100])
def test_round_trip_at_segment_boundaries(size):
    data = os.urandom(size)
    blob = _seal(data)
    assert _open(blob) == data
    _, segments = _split(blob)
    assert len(segments) == max(1, -(-size // SEG))  # an empty file still has one (empty) final segment


def test_streaming_both_ways_in_constant_memory():
    class Chunky(io.RawIOBase):
        """A pipe-like source that returns short reads."""

        def __init__(self, data: bytes) -> None:
            self.data, self.pos = data, 0

        def readable(self) -> bool:
            return True

        def read(self, n: int = -1) -> bytes:
            chunk = self.data[self.pos:self.pos + min(n, 1000)]
            self.pos += len(chunk)
            return chunk

    sealed, plain = io.BytesIO(), io.BytesIO()
    written = encrypt_stream(Chunky(PLAIN), sealed, dek=DEK, dek_id=DEK_ID, object_id=OBJ, segment_size=SEG)
    assert written == len(PLAIN)
    sealed.seek(0)
    assert decrypt_stream(Chunky(sealed.getvalue()), plain, dek=DEK, object_id=OBJ, label=LABEL) == len(PLAIN)
    assert plain.getvalue() == PLAIN


def test_ciphertext_is_fresh_each_time():
    assert _seal(PLAIN) != _seal(PLAIN)
    assert PLAIN[:64] not in _seal(PLAIN)


def test_truncation_at_a_segment_boundary_is_refused():
    header, segments = _split(_seal(PLAIN))
    with pytest.raises(StreamError, match=r"shard-0\.alv is truncated: segment 2 is intact but the final segment"):
        _open(header + b"".join(segments[:3]))


def test_truncation_inside_a_segment_is_refused():
    blob = _seal(PLAIN)
    with pytest.raises(StreamError, match=r"shard-0\.alv: segment 2 failed authentication"):
        _open(blob[:len(blob) - SEG - 50])


def test_header_only_file_is_refused():
    header, _ = _split(_seal(PLAIN))
    with pytest.raises(StreamError, match="truncated: the final segment is missing"):
        _open(header)


def test_reordered_segments_are_refused():
    header, s = _split(_seal(PLAIN))
    with pytest.raises(StreamError, match="segment 1 failed authentication"):
        _open(header + s[0] + s[2] + s[1] + s[3])


def test_duplicated_segment_is_refused():
    header, s = _split(_seal(PLAIN))
    with pytest.raises(StreamError, match="segment 2 failed authentication"):
        _open(header + s[0] + s[1] + s[1] + s[2] + s[3])


def test_dropped_segment_is_refused():
    header, s = _split(_seal(PLAIN))
    with pytest.raises(StreamError, match="segment 1 failed authentication"):
        _open(header + s[0] + s[2] + s[3])


def test_dropped_final_segment_after_full_segments_is_refused():
    data = os.urandom(2 * SEG)
    header, s = _split(_seal(data))
    assert len(s) == 2
    with pytest.raises(StreamError, match="truncated"):
        _open(header + s[0])


@pytest.mark.parametrize("where", ["body", "tag", "last"])
def test_bit_flip_in_body_or_tag_is_refused(where):
    blob = bytearray(_seal(PLAIN))
    header_len = len(read_header(io.BytesIO(bytes(blob)), LABEL).raw)
    offset = {"body": header_len + SEG + TAG_SIZE + 17, "tag": header_len + SEG + TAG_SIZE - 1,
              "last": len(blob) - 1}[where]
    blob[offset] ^= 0x01
    with pytest.raises(StreamError, match=r"shard-0\.alv.*(failed authentication|does not authenticate)"):
        _open(bytes(blob))


@pytest.mark.parametrize("offset", [16, 18, 22, 26, 40, -1])
def test_any_header_edit_is_refused(offset):
    blob = bytearray(_seal(PLAIN))
    header_len = len(read_header(io.BytesIO(bytes(blob)), LABEL).raw)
    blob[offset % header_len] ^= 0x01
    with pytest.raises(StreamError, match=r"shard-0\.alv"):
        _open(bytes(blob), expected=None)


def test_bad_magic_is_refused():
    with pytest.raises(StreamError, match=r"shard-0\.alv is not an AIRLOCK-STREAM-1 file"):
        _open(b"PK\x03\x04" + _seal(PLAIN)[4:])


def test_unknown_version_is_refused():
    blob = bytearray(_seal(PLAIN))
    blob[14] = 2
    with pytest.raises(StreamError, match="format version 2; this appliance reads version 1 only"):
        _open(bytes(blob))


@pytest.mark.parametrize("claimed", [0, 20, 400, 513, 65535])
def test_header_length_lies_are_refused(claimed):
    blob = bytearray(_seal(PLAIN))
    blob[15:17] = struct.pack("!H", claimed)
    with pytest.raises(StreamError, match=r"shard-0\.alv (has a header length|has a malformed header|is truncated)"):
        _open(bytes(blob))


def test_inner_field_lengths_are_capped():
    header = bytearray(build_header(dek_id=DEK_ID, segment_size=SEG).raw)
    header[22] = 200  # dek_id_len beyond the cap and beyond the header
    with pytest.raises(StreamError, match="malformed header"):
        read_header(io.BytesIO(bytes(header)), LABEL)


@pytest.mark.parametrize("segment_size", [MIN_SEGMENT_SIZE - 1, MAX_SEGMENT_SIZE + 1])
def test_declared_segment_size_is_capped(segment_size):
    header = bytearray(build_header(dek_id=DEK_ID, segment_size=SEG).raw)
    header[18:22] = struct.pack("!I", segment_size)
    with pytest.raises(StreamError, match="segment size"):
        read_header(io.BytesIO(bytes(header)), LABEL)


def test_file_moved_to_another_object_is_refused():
    blob = _seal(PLAIN, object_id="dataset-1/shard-0")
    with pytest.raises(StreamError, match="does not authenticate as object dataset-2/shard-0"):
        _open(blob, object_id="dataset-2/shard-0")


def test_file_under_another_objects_key_is_named():
    blob = _seal(PLAIN)
    with pytest.raises(StreamError, match="moved or copied from another object"):
        decrypt_bytes(blob, dek=DEK, object_id=OBJ, label=LABEL, expected_dek_id=b"\x22" * 16)


def test_wrong_key_is_refused():
    with pytest.raises(StreamError, match="does not authenticate"):
        decrypt_bytes(_seal(PLAIN), dek=b"\x00" * 32, object_id=OBJ, label=LABEL)


def test_trailing_garbage_is_refused():
    with pytest.raises(StreamError, match=r"shard-0\.alv"):
        _open(_seal(PLAIN) + b"\x00" * 40)
