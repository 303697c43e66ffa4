"""Images sent to /v1/classify: a DICOM Part-10 file, a PNG or a JPEG, decoded in memory and never stored.

    pixels, kind = decode_upload(body, size=224, channels=1)   # float32 C x size x size in [0, 1]

The file type comes from its first bytes, not from Content-Type. DICOM goes through the same
pixel pipeline as imports (appliance.data.dicom_pixels: LUTs, MONOCHROME1, middle frame) so a
served model sees what it was trained on. Every length in a DICOM file is checked against the
bytes actually received before anything is read or allocated: an element declaring 1 GB in a
2 KB upload is refused at once. Deflated DICOM is refused (a zip bomb in waiting), and so is any
image with more than MAX_SAMPLES pixel samples. Messages never quote values from the file.
"""

from __future__ import annotations

import io
import struct
from typing import TYPE_CHECKING, Any

from appliance.serve.errors import RequestRefused

if TYPE_CHECKING:
    import numpy as np

MAX_SAMPLES = 1 << 25
"""Pixels x samples per pixel of one image (33.5 M: a 5792 x 5792 grey frame, or 3344 x 3344 RGB)."""
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"
DEFLATED_SYNTAX = b"1.2.840.10008.1.2.1.99"
_HEADER_READ_MAX = 16
"""pydicom reads element headers (tag, VR, length) in pieces of at most this many bytes."""


def upload_kind(body: bytes) -> str:
    if len(body) >= 132 and body[128:132] == b"DICM":
        return "dicom"
    if body.startswith(PNG_MAGIC):
        return "png"
    if body.startswith(JPEG_MAGIC):
        return "jpeg"
    raise RequestRefused(415, "unsupported_file",
                         "the body is not a DICOM Part-10 file, a PNG or a JPEG (send the file's bytes as the "
                         "request body)")


class _DeclaredTooLong(Exception):
    def __init__(self, declared: int, remaining: int) -> None:
        super().__init__(declared, remaining)
        self.declared = declared
        self.remaining = remaining


class _BoundedUpload(io.BytesIO):
    """The upload as a file whose reads may not ask for more than is left: a lying length fails here."""

    def read(self, size: int | None = -1) -> bytes:
        if size is not None and size > _HEADER_READ_MAX:
            remaining = len(self.getbuffer()) - self.tell()
            if size > remaining:
                raise _DeclaredTooLong(size, remaining)
        return super().read(size)

    def seek(self, offset: int, whence: int = 0) -> int:
        end = len(self.getbuffer())
        position = {0: offset, 1: self.tell() + offset, 2: end + offset}[whence]
        if position > end:
            raise _DeclaredTooLong(position - self.tell(), end - self.tell())
        return super().seek(offset, whence)


def _meta_group(body: bytes) -> bytes:
    """The File Meta Information group (explicit VR little endian, its length first)."""
    if body[132:136] != b"\x02\x00\x00\x00" or body[136:138] != b"UL":
        return body[132:132 + 4096]  # no group length: pydicom reads it element by element; scan a prefix
    (length,) = struct.unpack("<I", body[140:144])
    return body[132:144 + min(length, len(body))]


def read_dicom_upload(body: bytes) -> Any:
    """The parsed dataset, all values in memory; RequestRefused(400/415) for anything malformed."""
    import pydicom

    from appliance.data.dicom_files import quiet_pydicom

    if DEFLATED_SYNTAX in _meta_group(body):
        raise RequestRefused(415, "deflated_dicom", "deflated DICOM is not accepted; send it uncompressed or "
                                                    "with a JPEG/RLE transfer syntax")
    try:
        with quiet_pydicom():
            return pydicom.dcmread(_BoundedUpload(body), defer_size=None)
    except _DeclaredTooLong as exc:
        raise RequestRefused(400, "dicom_length",
                             f"the DICOM file declares an element of {exc.declared} bytes but only {exc.remaining} "
                             "bytes follow (truncated or forged file); nothing was allocated for it") from None
    except MemoryError:
        raise
    except Exception as exc:  # pydicom raises anything on corrupt input; its messages may quote values
        raise RequestRefused(400, "bad_dicom", f"the DICOM file is truncated or corrupt ({type(exc).__name__} while "
                                               "parsing it)") from None


def _dicom_pixels(body: bytes, size: int, frames: str = "middle") -> np.ndarray:
    from appliance.data.dicom_files import check_is_image, quiet_pydicom
    from appliance.data.dicom_pixels import FrameRule, decode_dicom_records
    from appliance.data.errors import FileRejected

    ds = read_dicom_upload(body)
    try:
        with quiet_pydicom():
            check_is_image(ds)
            samples = int(ds.get("Rows", 0) or 0) * int(ds.get("Columns", 0) or 0) * \
                int(ds.get("SamplesPerPixel", 1) or 1)
            if samples > MAX_SAMPLES:
                raise RequestRefused(400, "image_too_large", f"one frame has {samples} pixel samples; this server "
                                                             f"takes at most {MAX_SAMPLES}")
            return decode_dicom_records(ds, size, FrameRule.parse(frames))[0][1]
    except FileRejected as exc:
        raise RequestRefused(400, "bad_dicom", exc.reason) from None
    except (RequestRefused, MemoryError):
        raise
    except Exception as exc:  # a malformed value met lazily while decoding
        raise RequestRefused(400, "bad_dicom", f"the DICOM header has a malformed element ({type(exc).__name__})") \
            from None


def _picture_pixels(body: bytes, size: int) -> np.ndarray:
    from PIL import Image

    from appliance.data.errors import FileRejected
    from appliance.data.images import read_image_pixels

    try:
        with Image.open(io.BytesIO(body), formats=["PNG", "JPEG"]) as probe:
            samples = probe.width * probe.height * len(probe.getbands())
    except Exception:  # UnidentifiedImageError, a truncated header ...
        raise RequestRefused(400, "bad_image", "the image is not a complete, readable PNG or JPEG") from None
    if samples > MAX_SAMPLES:
        raise RequestRefused(400, "image_too_large", f"the image has {samples} pixel samples; this server takes at "
                                                     f"most {MAX_SAMPLES}")
    try:
        pixels, _ = read_image_pixels(io.BytesIO(body), size)  # type: ignore[arg-type] - PIL reads file objects
    except FileRejected as exc:
        raise RequestRefused(400, "bad_image", exc.reason) from None
    return pixels


def decode_upload(body: bytes, *, size: int, channels: int, frames: str = "middle") -> tuple[np.ndarray, str]:
    """(float32 channels x size x size in [0, 1], 'dicom' | 'png' | 'jpeg'); a DICOM's frames are picked by
    `frames`, the rule its model's training data was imported with (middle, or stack:N)."""
    import numpy as np

    kind = upload_kind(body)
    pixels = _dicom_pixels(body, size, frames) if kind == "dicom" else _picture_pixels(body, size)
    pixels = pixels.astype(np.float32)
    if pixels.shape[0] != channels:
        if pixels.shape[0] == 1:
            pixels = np.repeat(pixels, channels, axis=0)  # grey into an RGB model, as in training
        elif channels == 1:
            pixels = pixels.mean(axis=0, keepdims=True)
        else:
            raise RequestRefused(400, "channels", f"the image has {pixels.shape[0]} channels; the model takes "
                                                  f"{channels}")
    return pixels, kind
