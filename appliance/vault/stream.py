"""AIRLOCK-STREAM-1: segmented streaming AEAD for files (the trust-critical format code).

No I/O here beyond the file-like objects passed in; no key management; every length read from a
header is capped before it is used.

Layout (all integers big-endian):

    header   magic "AIRLOCK-STREAM" (14) | version u8 = 1 | header_len u16 (whole header)
             | algorithm u8 = 1 | segment_size u32 | dek_id_len u8 | dek_id | salt_len u8 | salt
             | nonce_prefix (7)
    segments AES-256-GCM(file_key, nonce, plaintext[segment_size], aad) || ... ; the last segment
             may be shorter (or empty) and is the only one sealed with last_flag = 1

    file_key = HKDF-SHA256(DEK, salt, info = "AIRLOCK-STREAM-1 file key" 0x00 object_id)
    nonce    = nonce_prefix (7) || segment counter u32 (4) || last_flag u8 (1)
    aad      = header bytes || object_id (UTF-8)

Why each part: the counter in the nonce catches reordered, duplicated and dropped segments; the
last flag catches truncation at a segment boundary (the "final" segment would not verify); the
header in the AAD catches any header edit; the object id in both the key derivation and the AAD
catches a file copied or moved to another object. Segments are authenticated one by one, so a
streaming reader may see plaintext of early segments before a later one fails: callers that must
be all-or-nothing decrypt into memory and drop it on error (see appliance.vault.store).
"""

from __future__ import annotations

import io
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from appliance.vault.errors import StreamError

FORMAT_NAME = "AIRLOCK-STREAM-1"
MAGIC = b"AIRLOCK-STREAM"
VERSION = 1
ALGORITHM_AES256GCM_HKDF_SHA256 = 1
DEFAULT_SEGMENT_SIZE = 1 << 20
MIN_SEGMENT_SIZE = 1 << 12
MAX_SEGMENT_SIZE = 1 << 24
TAG_SIZE = 16
KEY_SIZE = 32
NONCE_PREFIX_SIZE = 7
SALT_SIZE = 32
MAX_DEK_ID_SIZE = 64
MIN_SALT_SIZE, MAX_SALT_SIZE = 16, 64
MAX_SEGMENTS = 1 << 32  # the counter is 4 bytes

_PREFIX = struct.Struct("!14sBH")  # magic, version, header_len
_FIXED = struct.Struct("!BI")  # algorithm, segment_size
_MIN_HEADER = _PREFIX.size + _FIXED.size + 1 + 1 + MIN_SALT_SIZE + 1 + NONCE_PREFIX_SIZE
_MAX_HEADER = 512
_KEY_INFO = b"AIRLOCK-STREAM-1 file key\x00"


@dataclass(frozen=True)
class StreamHeader:
    """A parsed header. `raw` is the exact bytes, bound into every segment as associated data."""

    version: int
    algorithm: int
    segment_size: int
    dek_id: bytes
    salt: bytes
    nonce_prefix: bytes
    raw: bytes


def build_header(*, dek_id: bytes, segment_size: int = DEFAULT_SEGMENT_SIZE, salt: bytes | None = None,
                 nonce_prefix: bytes | None = None) -> StreamHeader:
    """A fresh header with a random salt and nonce prefix (both may be given, for tests only)."""
    if not MIN_SEGMENT_SIZE <= segment_size <= MAX_SEGMENT_SIZE:
        raise ValueError(f"segment_size {segment_size} outside [{MIN_SEGMENT_SIZE}, {MAX_SEGMENT_SIZE}]")
    if not 1 <= len(dek_id) <= MAX_DEK_ID_SIZE:
        raise ValueError("dek_id must be 1..64 bytes")
    salt = os.urandom(SALT_SIZE) if salt is None else salt
    nonce_prefix = os.urandom(NONCE_PREFIX_SIZE) if nonce_prefix is None else nonce_prefix
    if len(nonce_prefix) != NONCE_PREFIX_SIZE or not MIN_SALT_SIZE <= len(salt) <= MAX_SALT_SIZE:
        raise ValueError("bad salt or nonce prefix size")
    body = (_FIXED.pack(ALGORITHM_AES256GCM_HKDF_SHA256, segment_size) + bytes([len(dek_id)]) + dek_id
            + bytes([len(salt)]) + salt + nonce_prefix)
    raw = _PREFIX.pack(MAGIC, VERSION, _PREFIX.size + len(body)) + body
    return StreamHeader(VERSION, ALGORITHM_AES256GCM_HKDF_SHA256, segment_size, dek_id, salt, nonce_prefix, raw)


def read_header(src: BinaryIO, label: str) -> StreamHeader:
    """Read and parse a header, refusing unknown versions and any length that does not add up."""
    prefix = _read_exact(src, _PREFIX.size)
    if len(prefix) < _PREFIX.size or not prefix.startswith(MAGIC):
        raise StreamError(f"{label} is not an {FORMAT_NAME} file (bad magic)",
                          hint="the file is not vault ciphertext or its start was overwritten; restore it")
    _, version, header_len = _PREFIX.unpack(prefix)
    if version != VERSION:
        raise StreamError(f"{label} uses encrypted-file format version {version}; this appliance reads "
                          f"version {VERSION} only", hint="read it with the airlock release that wrote it")
    if not _MIN_HEADER <= header_len <= _MAX_HEADER:
        raise StreamError(f"{label} has a header length of {header_len} bytes, outside "
                          f"[{_MIN_HEADER}, {_MAX_HEADER}]", hint="the header was edited; restore the file")
    rest = _read_exact(src, header_len - _PREFIX.size)
    if len(rest) != header_len - _PREFIX.size:
        raise StreamError(f"{label} is truncated inside its header", hint="restore the file from a backup")
    try:
        algorithm, segment_size = _FIXED.unpack_from(rest, 0)
        pos = _FIXED.size
        dek_id, pos = _take_sized(rest, pos, 1, MAX_DEK_ID_SIZE)
        salt, pos = _take_sized(rest, pos, MIN_SALT_SIZE, MAX_SALT_SIZE)
        nonce_prefix = rest[pos:pos + NONCE_PREFIX_SIZE]
        pos += NONCE_PREFIX_SIZE
        if pos != len(rest) or len(nonce_prefix) != NONCE_PREFIX_SIZE:
            raise ValueError("header length does not match its fields")
    except (struct.error, ValueError) as exc:
        raise StreamError(f"{label} has a malformed header ({exc})", hint="the header was edited; restore the file") \
            from None
    if algorithm != ALGORITHM_AES256GCM_HKDF_SHA256:
        raise StreamError(f"{label} names unknown algorithm {algorithm}", hint="the header was edited or the file "
                          "comes from a newer release")
    if not MIN_SEGMENT_SIZE <= segment_size <= MAX_SEGMENT_SIZE:
        raise StreamError(f"{label} declares segment size {segment_size}, outside [{MIN_SEGMENT_SIZE}, "
                          f"{MAX_SEGMENT_SIZE}]", hint="the header was edited; restore the file")
    return StreamHeader(version, algorithm, segment_size, dek_id, salt, nonce_prefix, prefix + rest)


def encrypt_stream(src: BinaryIO, dst: BinaryIO, *, dek: bytes, dek_id: bytes, object_id: str,
                   segment_size: int = DEFAULT_SEGMENT_SIZE) -> int:
    """Encrypt all of `src` into `dst` in constant memory. Returns the plaintext byte count."""
    header = build_header(dek_id=dek_id, segment_size=segment_size)
    aead, aad = _cipher(header, dek, object_id)
    dst.write(header.raw)
    total, counter = 0, 0
    current = _read_exact(src, segment_size)
    while True:
        # Look one segment ahead: only the segment with nothing after it is sealed as the last one.
        following = _read_exact(src, segment_size) if len(current) == segment_size else b""
        last = not following
        dst.write(aead.encrypt(_nonce(header.nonce_prefix, counter, last), current, aad))
        total += len(current)
        if last:
            return total
        counter += 1
        if counter >= MAX_SEGMENTS:
            raise StreamError(f"object {object_id} is too large for {FORMAT_NAME}",
                              hint="use a larger segment size or split the object")
        current = following


def iter_decrypt(src: BinaryIO, *, dek: bytes, object_id: str, label: str,
                 expected_dek_id: bytes | None = None) -> Iterator[bytes]:
    """Yield authenticated plaintext segments; raise StreamError naming `label` on any problem."""
    header = read_header(src, label)
    if expected_dek_id is not None and header.dek_id != expected_dek_id:
        raise StreamError(f"{label} was encrypted under data key {header.dek_id.hex()}, not the key of object "
                          f"{object_id} ({expected_dek_id.hex()}): it was moved or copied from another object",
                          hint="put the file back under the object it belongs to, or restore this object's file")
    aead, aad = _cipher(header, dek, object_id)
    sealed_size = header.segment_size + TAG_SIZE
    counter = 0
    current = _read_exact(src, sealed_size)
    while True:
        following = _read_exact(src, sealed_size) if len(current) == sealed_size else b""
        last = not following
        if len(current) < TAG_SIZE:
            raise StreamError(f"{label} is truncated: the final segment is missing (after segment {counter - 1})",
                              hint="the copy or write was cut short; restore the file from a backup")
        try:
            yield aead.decrypt(_nonce(header.nonce_prefix, counter, last), current, aad)
        except InvalidTag:
            raise _segment_error(aead, aad, header, current, counter, last, object_id, label) from None
        if last:
            return
        counter += 1
        if counter >= MAX_SEGMENTS:
            raise StreamError(f"{label} has more segments than {FORMAT_NAME} allows",
                              hint="the file was tampered with; restore it")
        current = following


def decrypt_stream(src: BinaryIO, dst: BinaryIO, *, dek: bytes, object_id: str, label: str,
                   expected_dek_id: bytes | None = None) -> int:
    """Decrypt `src` into `dst` in constant memory. Returns the plaintext byte count."""
    total = 0
    for chunk in iter_decrypt(src, dek=dek, object_id=object_id, label=label, expected_dek_id=expected_dek_id):
        dst.write(chunk)
        total += len(chunk)
    return total


def encrypt_bytes(data: bytes, *, dek: bytes, dek_id: bytes, object_id: str,
                  segment_size: int = DEFAULT_SEGMENT_SIZE) -> bytes:
    out = io.BytesIO()
    encrypt_stream(io.BytesIO(data), out, dek=dek, dek_id=dek_id, object_id=object_id, segment_size=segment_size)
    return out.getvalue()


def decrypt_bytes(blob: bytes, *, dek: bytes, object_id: str, label: str = "ciphertext",
                  expected_dek_id: bytes | None = None) -> bytes:
    return b"".join(iter_decrypt(io.BytesIO(blob), dek=dek, object_id=object_id, label=label,
                                 expected_dek_id=expected_dek_id))


def _cipher(header: StreamHeader, dek: bytes, object_id: str) -> tuple[AESGCM, bytes]:
    if len(dek) != KEY_SIZE:
        raise ValueError("a data key is 32 bytes")
    object_bytes = object_id.encode("utf-8")
    file_key = HKDF(algorithm=hashes.SHA256(), length=KEY_SIZE, salt=header.salt,
                    info=_KEY_INFO + object_bytes).derive(dek)
    return AESGCM(file_key), header.raw + object_bytes


def _segment_error(aead: AESGCM, aad: bytes, header: StreamHeader, sealed: bytes, counter: int, last: bool,
                   object_id: str, label: str) -> StreamError:
    """Name the most likely cause. Only a diagnosis: the file is refused whatever it says."""
    if last:
        try:
            aead.decrypt(_nonce(header.nonce_prefix, counter, False), sealed, aad)
        except InvalidTag:
            pass
        else:
            return StreamError(f"{label} is truncated: segment {counter} is intact but the final segment is missing",
                               hint="the copy or write was cut short; restore the file from a backup")
    if counter == 0:
        return StreamError(f"{label} does not authenticate as object {object_id}: its header or first segment was "
                           "modified, or the file belongs to another object",
                           hint="restore the file from a backup; never edit or move vault files by hand")
    return StreamError(f"{label}: segment {counter} failed authentication (bytes modified, or segments reordered, "
                       "duplicated or dropped)", hint="restore the file from a backup")


def _nonce(prefix: bytes, counter: int, last: bool) -> bytes:
    return prefix + counter.to_bytes(4, "big") + (b"\x01" if last else b"\x00")


def _take_sized(buf: bytes, pos: int, minimum: int, maximum: int) -> tuple[bytes, int]:
    if pos >= len(buf):
        raise ValueError("header ends early")
    size = buf[pos]
    if not minimum <= size <= maximum or pos + 1 + size > len(buf):
        raise ValueError(f"field length {size} out of range")
    return buf[pos + 1:pos + 1 + size], pos + 1 + size


def _read_exact(src: BinaryIO, size: int) -> bytes:
    """Read `size` bytes, or fewer only at end of file (pipes and sockets return short reads)."""
    data = src.read(size)
    if data is None:
        data = b""
    if len(data) == size or not data:
        return data
    parts = [data]
    got = len(data)
    while got < size:
        more = src.read(size - got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)
