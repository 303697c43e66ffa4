"""PNG/JPEG through run_import, the stored payload and its export, and the labels file."""

from __future__ import annotations

import struct
import zlib
from collections import Counter
from pathlib import Path

import pytest

from appliance.data.errors import DataError
from appliance.data.images import (
    MAX_IMAGE_PIXELS,
    decode_image_payload,
    encode_image_payload,
    export_image_record,
    pixel_content_hash,
)
from appliance.data.labels import find_label, load_labels
from appliance.data.pipeline import AcceptedRecord, ImportOptions, run_import
from appliance.data.report import ImportReport

SECRET = b"site-secret-for-tests-0123456789"


def _import(root: Path, **options) -> tuple[ImportReport, list[AcceptedRecord]]:
    records: list[AcceptedRecord] = []
    report = run_import(root, ImportOptions(fmt="images", **options), secret=SECRET, split_seed="seed",
                        sink=records.append)
    return report, records


def _save(path: Path, mode: str, size: tuple[int, int], value, fmt: str = "PNG") -> Path:
    from PIL import Image, ImageDraw

    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new(mode, size, value)
    ImageDraw.Draw(image).ellipse((size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2),
                                  fill=255 if mode in ("L", "P") else (255, 255, 255))
    image.save(path, format=fmt)
    return path


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG that claims width x height pixels and holds almost nothing: a decompression bomb's header."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


@pytest.fixture
def image_root(tmp_path: Path) -> Path:
    import numpy as np
    from PIL import Image

    root = tmp_path / "in"
    _save(root / "cat" / "gray.png", "L", (40, 30), 10)
    _save(root / "cat" / "rgb.jpg", "RGB", (64, 64), (10, 40, 90), fmt="JPEG")
    _save(root / "dog" / "palette.png", "P", (32, 32), 3)
    deep = np.tile(np.arange(0, 4096, 64, dtype=np.uint16), (64, 1))  # 12-bit values in a 16-bit PNG
    Image.fromarray(deep).save(root / "dog" / "sixteen.png")
    _save(root / "loose.png", "RGB", (20, 20), (200, 0, 0))
    full = (root / "dog" / "palette.png").read_bytes()
    (root / "dog" / "truncated.png").write_bytes(full[: len(full) // 2])
    (root / "dog" / "notes.png").write_text("these are my notes, not an image\n")
    _png_header_only(root / "dog" / "bomb.png", 20_000, 20_000)
    return root


def test_good_images_import_and_bad_ones_are_rejected_with_one_line(image_root: Path):
    report, records = _import(image_root, image_size=32)
    outcome = {f.rel: f for f in report.files}
    assert report.buckets == {"imported": 5, "duplicate": 0, "cleaned-empty": 0, "quarantined": 0, "rejected": 3}
    assert sum(report.buckets.values()) == len(report.files) == 8
    for rel in ("dog/truncated.png", "dog/notes.png"):
        assert outcome[rel].reason.startswith("not a readable image"), rel
    assert f"larger than {MAX_IMAGE_PIXELS} pixels (decompression bomb guard)" in outcome["dog/bomb.png"].reason
    assert all("\n" not in f.reason for f in report.files)
    by_rel = {outcome[rel].file_no: rel for rel in outcome}
    stored = {by_rel[r.file_no]: r for r in records}
    assert {rel: r.label for rel, r in stored.items()} == {"cat/gray.png": "cat", "cat/rgb.jpg": "cat",
                                                            "dog/palette.png": "dog", "dog/sixteen.png": "dog",
                                                            "loose.png": None}
    shapes = {rel: decode_image_payload(r.payload)[0].shape for rel, r in stored.items()}
    assert shapes == {"cat/gray.png": (1, 32, 32), "cat/rgb.jpg": (3, 32, 32), "dog/palette.png": (3, 32, 32),
                      "dog/sixteen.png": (1, 32, 32), "loose.png": (3, 32, 32)}
    for rel, record in stored.items():
        pixels, dicom, meta = decode_image_payload(record.payload)
        assert str(pixels.dtype) == "float16" and dicom is None and meta["source"] == "image"
        assert 0.0 <= float(pixels.min()) and float(pixels.max()) <= 1.0
        assert record.kind == "image" and record.content_hash == pixel_content_hash(pixels, "image")
        assert rel.split("/")[-1].encode() not in record.payload  # no file names in what is stored
    sixteen = decode_image_payload(stored["dog/sixteen.png"].payload)[0]
    assert float(sixteen.max()) > 0.95  # 12-bit data in a 16-bit PNG is stretched, not left near black
    assert report.kind == "images" and report.changes["unlabelled"] == 1
    assert sum(report.splits.values()) == 5


def test_the_bomb_guard_holds_even_when_pillow_s_is_switched_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    _png_header_only(tmp_path / "bomb.png", 20_000, 20_000)
    report, records = _import(tmp_path / "bomb.png")
    assert not records and report.files[0].reason.startswith("the image is 20000 x 20000 pixels, larger than")


def test_the_same_pixels_twice_are_an_exact_duplicate(tmp_path: Path):
    first = _save(tmp_path / "in" / "a" / "one.png", "L", (16, 16), 0)
    (tmp_path / "in" / "b").mkdir()
    (tmp_path / "in" / "b" / "copy.png").write_bytes(first.read_bytes())
    report, records = _import(tmp_path / "in", image_size=16)
    assert len(records) == 1 and report.buckets["duplicate"] == 1 and report.changes["duplicate_exact"] == 1


def test_payload_roundtrip_is_deterministic_and_exports_a_png(tmp_path: Path):
    import numpy as np
    from PIL import Image

    pixels = np.linspace(0, 1, 3 * 8 * 8, dtype=np.float32).reshape(3, 8, 8).astype(np.float16)
    payload = encode_image_payload(pixels, {"source": "image"})
    assert payload == encode_image_payload(pixels, {"source": "image"})
    back, dicom, meta = decode_image_payload(payload)
    assert np.array_equal(back, pixels) and dicom is None and meta == {"source": "image"}
    path = export_image_record(payload, tmp_path, "r1")
    assert path.name == "r1.png"
    with Image.open(path) as image:
        assert image.mode == "RGB" and image.size == (8, 8)
        assert np.asarray(image)[7, 7, 2] == 255
    gray = export_image_record(encode_image_payload(pixels[:1], {}), tmp_path, "r2")
    with Image.open(gray) as image:
        assert image.mode == "L"


# --- labels ------------------------------------------------------------------------------------------

def test_labels_accept_common_column_names_delimiters_and_a_bom(tmp_path: Path):
    path = tmp_path / "labels.csv"
    path.write_bytes("\ufeffFile Name;Class\nscans\\p1\\a.png;normal\nb.png;tumour\n\n".encode())
    assert load_labels(path) == {"scans/p1/a.png": "normal", "b.png": "tumour"}
    path.write_text("StudyInstanceUID,SOPInstanceUID,label\n1.2.3,,study-level\n,1.2.3.4,image-level\n")
    labels = load_labels(path)
    assert labels == {"1.2.3": "study-level", "1.2.3.4": "image-level"}
    assert find_label(labels, "x/y.dcm", sop_uid="1.2.3.4", study_uid="1.2.3") == "image-level"
    assert find_label(labels, "x/y.dcm", sop_uid="9", study_uid="1.2.3") == "study-level"
    assert find_label({"p1": "by-folder", "a.png": "by-name"}, "scans/p1/a.png") == "by-name"
    assert find_label({"p1": "by-folder"}, "scans/p1/a.png") == "by-folder"
    assert find_label(None, "scans/p1/a.png") == "p1" and find_label(None, "a.png") is None


@pytest.mark.parametrize(("text", "message"), [
    ("", "is empty"),
    ("key,diagnosis\na.png,x\n", "line 1: no label column"),
    ("name,label\na.png,x\n", "line 1: no key column"),
    ("key,label\n", "has a header but no rows"),
    ("key,label\na.png,x\nb.png,\n", "line 3: the label is empty"),
    ("key,label\na.png,x\n,y\n", "line 3: the key is empty"),
    ("key,label\na.png,x\nb.png,y\na.png,x\n\na.png,z\n", "line 6: the key on line 2 repeats here with a "
                                                          "different label"),
])
def test_a_bad_labels_file_names_the_line(tmp_path: Path, text: str, message: str):
    path = tmp_path / "labels.csv"
    path.write_text(text)
    with pytest.raises(DataError, match=message) as caught:
        load_labels(path)
    assert caught.value.hint and "a.png" not in str(caught.value)


def test_a_missing_or_binary_labels_file_is_a_data_error(tmp_path: Path):
    with pytest.raises(DataError, match="labels file not found"):
        load_labels(tmp_path / "nope.csv")
    (tmp_path / "bin.csv").write_bytes(b"\xff\xfe\x00key")
    with pytest.raises(DataError, match="not UTF-8"):
        load_labels(tmp_path / "bin.csv")


def test_labels_from_a_csv_reach_the_records(image_root: Path, tmp_path: Path):
    path = tmp_path / "labels.csv"
    path.write_text("filename,label\ncat/gray.png,special\nrgb.jpg,jpeg\n")
    _report, records = _import(image_root, image_size=16, labels=path)
    assert Counter(r.label for r in records) == {"special": 1, "jpeg": 1, None: 3}
