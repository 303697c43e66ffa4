"""DICOM pixel data to what the classifier trains on: float16, C x H x W, values in [0, 1].

The steps follow the standard's pixel pipeline, in its order:

1. Decode the frames that the frame rule picks (`FrameRule`, the import's `--frames`):
   * `middle` (default): one record per image, the middle frame: the most representative single
     frame of a cine loop or a volume, and decoding every frame of a 1 000-frame ultrasound loop
     would cost seconds and gigabytes for one training sample.
   * `each`: one record per frame (a multi-frame enhanced CT of 40 slices gives 40 records).
   * `stack:N` (2.5D input): one record per multi-frame image whose N channels are N slices spread
     evenly through the volume (frame i*F/(N+1) for i = 1..N of F frames: the end slices, often
     outside the anatomy, are skipped). `stack:3` fits an RGB-pretrained classifier as it is.
     Grayscale only; an image with fewer than N frames is rejected with the reason.
   Every record of one file keeps the file's patient, so splits stay per patient.
2. Grayscale: Modality LUT (or rescale slope/intercept), then VOI LUT (or the first window),
   then MONOCHROME1 is inverted so that bright always means dense. Colour: PALETTE COLOR goes
   through its lookup table; YBR_* are converted to RGB by the decoder.
3. Min-max normalization to [0, 1] (a flat image becomes all zeros); a stack is normalized as one
   volume, so that the slices keep their relative brightness.
4. Resize to size x size with PIL (bilinear, antialiased when shrinking). The aspect ratio is not
   kept: classifiers here take square inputs, and padding would waste most of a wide US frame.

Compressed transfer syntaxes decode through pydicom's plugins, which the appliance extra ships
(docs/adr/0014-dicom-decoders.md): pylibjpeg-libjpeg (JPEG Baseline/Extended incl. 12-bit, JPEG
Lossless), pylibjpeg-openjpeg (JPEG 2000, HTJ2K), pylibjpeg-rle and numpy (RLE), pyjpegls
(JPEG-LS), Pillow (8-bit JPEG, JPEG 2000). A missing plugin (a damaged install) is rejected with
one line naming the package; pixel data that the plugins refuse is rejected as corrupt or
non-conformant, naming the transfer syntax. Errors never quote values from the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from appliance.data.errors import FileRejected
from appliance.data.images import resize_channels

if TYPE_CHECKING:
    import numpy as np
    from pydicom.dataset import Dataset

PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)
"""Pixel Data, Float Pixel Data, Double Float Pixel Data."""

MAX_FRAME_PIXELS = 1 << 28
"""Rows x Columns above which one frame is refused (268 M pixels: a whole-slide image, or a bomb)."""

_PHOTOMETRIC_NAMES = frozenset({"MONOCHROME1", "MONOCHROME2", "PALETTE COLOR", "RGB", "YBR_FULL", "YBR_FULL_422",
                                "YBR_PARTIAL_420", "YBR_PARTIAL_422", "YBR_ICT", "YBR_RCT", "HSV", "ARGB", "CMYK",
                                "XYB"})
_JPEG_2000 = ("JPEG 2000", "JPEG 2000 needs pylibjpeg-openjpeg or Pillow with OpenJPEG in the bundle")
_JPEG_LS = ("JPEG-LS", "JPEG-LS needs pyjpegls or pylibjpeg-libjpeg in the bundle")
_JPEG_LOSSLESS = ("JPEG Lossless", "JPEG Lossless needs pylibjpeg-libjpeg in the bundle")
_HTJ2K = ("HTJ2K", "HTJ2K needs pylibjpeg-openjpeg 2.0 or later in the bundle")
MISSING_DECODER = "cannot be decoded here"
"""In every reason that says a decoder plugin is missing from the installed bundle (and in no other)."""
_REINSTALL = "; reinstall the appliance from a bundle built with the 'appliance' extra"
_VIDEO = ("MPEG/HEVC video", "video transfer syntaxes are not decoded here; export still frames from the modality")
_JPEG_XL = ("JPEG XL", "JPEG XL is not supported by this appliance's DICOM library; export the images uncompressed")

COMPRESSED_SYNTAXES: dict[str, tuple[str, str]] = {
    "1.2.840.10008.1.2.4.50": ("JPEG Baseline", "8-bit JPEG needs Pillow or pylibjpeg-libjpeg in the bundle"),
    "1.2.840.10008.1.2.4.51": ("JPEG Extended (12-bit)",
                               "12-bit JPEG needs pylibjpeg-libjpeg in the bundle (Pillow reads 8-bit only)"),
    "1.2.840.10008.1.2.4.57": _JPEG_LOSSLESS,
    "1.2.840.10008.1.2.4.70": _JPEG_LOSSLESS,
    "1.2.840.10008.1.2.4.80": _JPEG_LS,
    "1.2.840.10008.1.2.4.81": _JPEG_LS,
    "1.2.840.10008.1.2.4.90": _JPEG_2000,
    "1.2.840.10008.1.2.4.91": _JPEG_2000,
    "1.2.840.10008.1.2.4.92": _JPEG_2000,
    "1.2.840.10008.1.2.4.93": _JPEG_2000,
    "1.2.840.10008.1.2.4.94": ("JPIP", "JPIP pixel data lives on a server, not in the file; export the pixels"),
    "1.2.840.10008.1.2.4.95": ("JPIP", "JPIP pixel data lives on a server, not in the file; export the pixels"),
    "1.2.840.10008.1.2.4.201": _HTJ2K,
    "1.2.840.10008.1.2.4.202": _HTJ2K,
    "1.2.840.10008.1.2.4.203": _HTJ2K,
    "1.2.840.10008.1.2.5": ("RLE Lossless", "RLE needs numpy or pylibjpeg-rle in the bundle"),
    **{f"1.2.840.10008.1.2.4.{n}": _VIDEO for n in range(100, 109)},
    **{f"1.2.840.10008.1.2.4.{n}": _JPEG_XL for n in range(110, 113)},
}


@dataclass(frozen=True)
class FrameRule:
    """Which frames of a multi-frame image become records (see the module docstring)."""

    mode: str = "middle"
    """middle | each | stack"""
    slices: int = 0
    """stack: frames per record (the record's channels)."""

    @classmethod
    def parse(cls, text: str) -> FrameRule:
        """'middle', 'each' or 'stack:N' (N from 2 to MAX_STACK)."""
        value = text.strip().lower()
        if value in ("middle", "each"):
            return cls(value)
        if value.startswith("stack:") and value[6:].isdigit() and 2 <= int(value[6:]) <= MAX_STACK:
            return cls("stack", int(value[6:]))
        raise ValueError(f"frames must be middle, each or stack:N with N from 2 to {MAX_STACK}, e.g. stack:3")

    def to_text(self) -> str:
        return f"stack:{self.slices}" if self.mode == "stack" else self.mode

    def groups(self, frames: int) -> list[list[int]]:
        """The frame indices of each record, for an image of `frames` frames (FileRejected if it cannot give any)."""
        frames = max(frames, 1)
        if self.mode == "each":
            return [[i] for i in range(frames)]
        if self.mode == "stack":
            if frames < self.slices:
                raise FileRejected(f"the image has {frames} frame{'s' if frames != 1 else ''}; --frames "
                                   f"stack:{self.slices} needs multi-frame images with at least {self.slices}; "
                                   "import single-frame images with --frames middle")
            return [[i * frames // (self.slices + 1) if frames > self.slices else i - 1
                     for i in range(1, self.slices + 1)]]
        return [[frames // 2]]


MAX_STACK = 16


def decode_dicom_pixels(ds: Dataset, size: int) -> np.ndarray:
    """The middle frame of `ds` as float16 C x size x size in [0, 1]; FileRejected when it cannot be decoded."""
    return decode_dicom_records(ds, size, FrameRule())[0][1]


def decode_dicom_records(ds: Dataset, size: int, rule: FrameRule) -> list[tuple[list[int], np.ndarray]]:
    """(frame indices, float16 C x size x size in [0, 1]) per record that `rule` makes of `ds`."""
    import numpy as np

    ts = str(ds.file_meta.get("TransferSyntaxUID", "") or "") if hasattr(ds, "file_meta") else ""
    if not ts:
        raise FileRejected("the file meta information has no Transfer Syntax UID; re-export the file from the PACS")
    _check_decoder(ts)
    rows, cols = _whole(ds, "Rows"), _whole(ds, "Columns")
    if rows < 1 or cols < 1:
        raise FileRejected("the header gives no image size (Rows/Columns); re-export the image from the PACS")
    if rows * cols > MAX_FRAME_PIXELS:
        raise FileRejected(f"one frame has {rows} x {cols} pixels; the limit is {MAX_FRAME_PIXELS} pixels")
    frames = _whole(ds, "NumberOfFrames", default=1)
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    records = []
    for indices in rule.groups(frames):
        planes = [_display_frame(ds, ts, index, photometric) for index in indices]
        if len(planes) > 1 and planes[0].shape[0] != 1:
            raise FileRejected(f"--frames {rule.to_text()} stacks grayscale frames; this image is colour "
                               "(import it with --frames middle or each)")
        records.append((indices, _normalized(np.concatenate(planes), photometric, size)))
    return records


def _display_frame(ds: Dataset, ts: str, index: int, photometric: str) -> np.ndarray:
    """One frame after the LUTs, as float32 C x H x W (C = 1 or 3), not yet normalized."""
    import numpy as np

    arr = _to_display_values(_decode_frame(ds, ts, index), ds, photometric)
    if arr.ndim == 2:
        arr = arr[None]
    elif arr.ndim == 3 and arr.shape[-1] == 3:
        arr = arr.transpose(2, 0, 1)
    else:
        shown = photometric if photometric in _PHOTOMETRIC_NAMES else "missing or unrecognized"
        raise FileRejected(f"unsupported pixel layout (photometric interpretation {shown}, decoded shape "
                           f"{' x '.join(str(n) for n in arr.shape)}); only grayscale and RGB images are imported")
    return np.nan_to_num(arr.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)


def _normalized(arr: np.ndarray, photometric: str, size: int) -> np.ndarray:
    import numpy as np

    low, high = float(arr.min()), float(arr.max())
    arr = (arr - low) / (high - low) if high > low else np.zeros_like(arr)
    if photometric == "MONOCHROME1":
        arr = 1.0 - arr
    return resize_channels(arr, size)


def _check_decoder(ts: str) -> None:
    from pydicom.pixels import get_decoder

    name, hint = COMPRESSED_SYNTAXES.get(ts, ("", ""))
    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        if name:
            raise FileRejected(f"{name} pixel data {MISSING_DECODER}: {hint}{_REINSTALL}") from None
        shown = ts if len(ts) <= 64 and set(ts) <= set("0123456789.") else "(not a valid UID)"
        raise FileRejected(f"unsupported transfer syntax {shown}; export the images uncompressed") from None
    if not decoder.is_available:
        raise FileRejected(f"{name or 'compressed'} pixel data {MISSING_DECODER}: "
                           f"{hint or 'a decoder plugin is missing from the bundle'}{_REINSTALL}")


def _decode_frame(ds: Dataset, ts: str, index: int) -> np.ndarray:
    from pydicom.pixels import get_decoder, pixel_array

    try:
        return pixel_array(ds, index=index)
    except MemoryError:
        raise
    except Exception:  # decoders raise anything on corrupt input; the file is what is wrong
        name = COMPRESSED_SYNTAXES.get(ts, ("", ""))[0]
        if name:
            plugins = ", ".join(sorted(get_decoder(ts).available_plugins))
            raise FileRejected(f"the {name} pixel data is corrupt or not conformant: the bundled decoders "
                               f"({plugins}) refuse it; re-export the image from the PACS, uncompressed or with "
                               "another transfer syntax") from None
        raise FileRejected("the pixel data cannot be decoded: the header and the pixel data disagree "
                           "(truncated or corrupt file?); copy or re-export it from the PACS") from None


def _to_display_values(arr: np.ndarray, ds: Dataset, photometric: str) -> np.ndarray:
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

    try:
        if photometric == "PALETTE COLOR":
            return apply_color_lut(arr, ds)
        if photometric.startswith("MONOCHROME") or arr.ndim == 2:
            arr = apply_modality_lut(arr, ds)
            return apply_voi_lut(arr, ds, index=0)
    except MemoryError:
        raise
    except Exception:  # a broken LUT or window in the header
        raise FileRejected("the header's modality/VOI lookup table or window does not fit the pixel data") from None
    return arr


def _whole(ds: Dataset, keyword: str, default: int = 0) -> int:
    value: Any = ds.get(keyword, default)
    try:
        return int(value if value not in (None, "") else default)
    except (TypeError, ValueError):
        raise FileRejected(f"the header's {keyword} is not a whole number; fix or re-export the file") from None
