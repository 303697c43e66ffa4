"""PNG/JPEG import, and the stored form of every image record (PNG, JPEG and DICOM alike).

An image becomes float16 C x H x W in [0, 1] at the import's image size: C = 1 for grayscale,
3 for colour. 8-bit images are divided by 255; 16-bit and float grayscale PNGs are min-max
normalized (their useful range is rarely the full 0..65535). EXIF orientation is applied; EXIF
and every other metadata block is dropped (only pixels are stored). Only PNG and JPEG are parsed:
a renamed GIF or TIFF is "not a readable image", which keeps the decoder surface small.

The stored payload is an .npz (numpy's zip of .npy arrays, loadable with `numpy.load`):

    pixels   float16 C x H x W
    meta     uint8, UTF-8 JSON: source, size, for DICOM the modality and remapped UIDs (no PHI)
    dicom    uint8, the de-identified DICOM Part-10 file (DICOM records only)

It is written without timestamps so the same record always gives the same bytes. The content
hash covers the pixels and their shape only, so re-importing a file is an exact duplicate.
"""

from __future__ import annotations

import hashlib
import io
import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance.data.errors import FileRejected
from appliance.data.labels import find_label
from appliance.data.report import FileOutcome
from appliance.data.splits import assign_split

if TYPE_CHECKING:
    import numpy as np

    from appliance.data.pipeline import ImportContext
    from appliance.data.walk import InputFile

MAX_IMAGE_PIXELS = 89_478_485
"""Pillow's own decompression-bomb limit (width x height), enforced here whatever Image.MAX_IMAGE_PIXELS says."""

_HIGH_DEPTH_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
_GRAY_MODES = frozenset({"1", "L", "LA", "La"})
_NOT_READABLE = "not a readable image (a PNG or JPEG file that is complete and not corrupt)"


def import_image_file(number: int, item: InputFile, ctx: ImportContext) -> FileOutcome:
    """Import one PNG/JPEG file; FileRejected when it is not a readable image."""
    from appliance.data.pipeline import AcceptedRecord

    pixels, meta = read_image_pixels(item.path, ctx.options.image_size)
    content_hash = pixel_content_hash(pixels, "image")
    if ctx.is_duplicate(content_hash):
        ctx.changes["duplicate_exact"] += 1
        return FileOutcome(number, item.rel, item.size, "image", "duplicate",
                           "the same image is already in this dataset or earlier in this import",
                           records_read=1, duplicates=1)
    label = find_label(ctx.labels, item.rel)
    if label is None:
        ctx.changes["unlabelled"] += 1
    split = assign_split(content_hash, ctx.split_seed, ctx.options.splits)
    ctx.accept(AcceptedRecord(content_hash, split, number, "image", encode_image_payload(pixels, meta),
                              label=label))
    return FileOutcome(number, item.rel, item.size, "image", "imported", records_read=1, imported=1)


def read_image_pixels(path: Path, size: int) -> tuple[np.ndarray, dict[str, Any]]:
    """Verify, then decode a PNG/JPEG into float16 C x size x size; FileRejected with one line otherwise."""
    import numpy as np
    from PIL import Image, ImageOps

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path, formats=["PNG", "JPEG"]) as probe:
                fmt, width, height = probe.format, probe.width, probe.height
                if width * height > MAX_IMAGE_PIXELS:
                    raise FileRejected(f"the image is {width} x {height} pixels, larger than {MAX_IMAGE_PIXELS} "
                                       "pixels (decompression bomb guard); shrink or tile it first")
                probe.verify()
            # verify() leaves the image unusable; decode from a fresh handle.
            with Image.open(path, formats=["PNG", "JPEG"]) as image:
                image.load()
                mode = image.mode
                upright = ImageOps.exif_transpose(image)
                if mode in _HIGH_DEPTH_MODES:
                    arr = np.asarray(upright, dtype=np.float32)[None]
                    low, high = float(arr.min()), float(arr.max())
                    arr = (arr - low) / (high - low) if high > low else np.zeros_like(arr)
                elif mode in _GRAY_MODES:
                    arr = np.asarray(upright.convert("L"), dtype=np.float32)[None] / 255.0
                else:
                    arr = np.asarray(upright.convert("RGB"), dtype=np.float32).transpose(2, 0, 1) / 255.0
    except FileRejected:
        raise
    except (PermissionError, FileNotFoundError, MemoryError):
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise FileRejected(f"the image is larger than {MAX_IMAGE_PIXELS} pixels (decompression bomb guard); "
                           "shrink or tile it first") from None
    except Exception:  # UnidentifiedImageError, OSError "truncated", SyntaxError, struct.error, a bad EXIF...
        raise FileRejected(_NOT_READABLE) from None
    pixels = resize_channels(np.nan_to_num(arr), size)
    meta = {"source": "image", "format": fmt, "mode": mode, "width": width, "height": height}
    return pixels, meta


def resize_channels(arr: np.ndarray, size: int) -> np.ndarray:
    """C x H x W float in [0, 1] -> C x size x size float16, each channel resized with PIL (bilinear)."""
    import numpy as np
    from PIL import Image

    out = np.empty((arr.shape[0], size, size), dtype=np.float32)
    for channel in range(arr.shape[0]):
        image = Image.fromarray(np.ascontiguousarray(arr[channel], dtype=np.float32))
        out[channel] = np.asarray(image.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)
    return np.clip(out, 0.0, 1.0).astype(np.float16)


def pixel_content_hash(pixels: np.ndarray, domain: str) -> str:
    """SHA-256 over a domain prefix, the shape and the float16 pixel bytes (little-endian)."""
    import numpy as np

    shape = "x".join(str(n) for n in pixels.shape)
    digest = hashlib.sha256(f"airlock-pixels/v1\0{domain}\0{shape}\0".encode())
    digest.update(np.ascontiguousarray(pixels, dtype="<f2").tobytes())
    return digest.hexdigest()


def encode_image_payload(pixels: np.ndarray, meta: dict[str, Any], dicom: bytes | None = None) -> bytes:
    """The stored .npz bytes (see the module docstring); deterministic for the same inputs."""
    import zipfile

    import numpy as np

    arrays = {"pixels": np.ascontiguousarray(pixels, dtype=np.float16),
              "meta": np.frombuffer(json.dumps(meta, sort_keys=True).encode(), dtype=np.uint8)}
    if dicom is not None:
        arrays["dicom"] = np.frombuffer(dicom, dtype=np.uint8)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, array in arrays.items():
            # A fixed timestamp (numpy.savez stamps the current time) keeps the bytes reproducible.
            with archive.open(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)), "w",
                              force_zip64=True) as member:
                np.lib.format.write_array(member, array, allow_pickle=False)
    return buffer.getvalue()


def decode_image_payload(data: bytes) -> tuple[np.ndarray, bytes | None, dict[str, Any]]:
    """(pixels float16 C x H x W, de-identified DICOM bytes or None, meta) from a stored payload."""
    import numpy as np

    with np.load(io.BytesIO(data), allow_pickle=False) as archive:
        pixels = archive["pixels"]
        dicom = archive["dicom"].tobytes() if "dicom" in archive.files else None
        meta = json.loads(archive["meta"].tobytes().decode()) if "meta" in archive.files else {}
    return pixels, dicom, meta


def export_image_record(payload: bytes, out_dir: Path, stem: str) -> Path:
    """Write one record for review: the de-identified DICOM as stem.dcm, else the pixels as an 8-bit stem.png."""
    import numpy as np
    from PIL import Image

    pixels, dicom, _meta = decode_image_payload(payload)
    if dicom is not None:
        path = Path(out_dir) / f"{stem}.dcm"
        path.write_bytes(dicom)
        return path
    scaled = np.clip(np.rint(pixels.astype(np.float32) * 255.0), 0, 255).astype(np.uint8)
    image = Image.fromarray(scaled[0]) if scaled.shape[0] == 1 else Image.fromarray(scaled.transpose(1, 2, 0))
    path = Path(out_dir) / f"{stem}.png"
    image.save(path, format="PNG")
    return path
