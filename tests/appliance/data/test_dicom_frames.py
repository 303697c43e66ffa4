"""Multi-frame DICOM into training records by the import's frame rule (--frames middle|each|stack:N),
with every record of a file in its patient's split."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from appliance.data.dicom_pixels import FrameRule, decode_dicom_records
from appliance.data.errors import FileRejected
from appliance.data.images import decode_image_payload
from appliance.data.pipeline import AcceptedRecord, ImportOptions, run_import

SECRET = b"site-secret-for-frame-tests-0123"


def _volume(frames: int):
    """A multi-frame MONOCHROME2 dataset whose frame i is flat at value 10 * i (so a frame is known by its value)."""
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset

    stack = np.stack([np.full((8, 8), 10 * i, dtype=np.uint16) for i in range(frames)])
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    ds.Rows, ds.Columns, ds.NumberOfFrames = 8, 8, frames
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = stack.tobytes()
    return ds


def test_the_frame_rule_parses_and_picks_documented_frames():
    assert FrameRule.parse("middle").groups(10) == [[5]] and FrameRule.parse("MIDDLE").groups(1) == [[0]]
    assert FrameRule.parse("each").groups(3) == [[0], [1], [2]]
    assert FrameRule.parse("stack:3").groups(10) == [[2, 5, 7]]  # i * 10 // 4: the end slices are skipped
    assert FrameRule.parse("stack:3").groups(3) == [[0, 1, 2]] and FrameRule.parse("stack:3").groups(4) == [[1, 2, 3]]
    assert FrameRule.parse("stack:3").to_text() == "stack:3"
    with pytest.raises(FileRejected, match=r"^the image has 2 frames; --frames stack:3 needs multi-frame images with "
                                           r"at least 3; import single-frame images with --frames middle$"):
        FrameRule.parse("stack:3").groups(2)
    for bad in ("stack:1", "stack:17", "stack:x", "all", ""):
        with pytest.raises(ValueError, match="frames must be middle, each or stack:N"):
            FrameRule.parse(bad)
    with pytest.raises(ValueError, match="frames must be"):
        ImportOptions(fmt="dicom", frames="every")


def test_a_stack_is_the_picked_slices_as_channels_normalized_as_one_volume():
    (indices, pixels), = decode_dicom_records(_volume(10), 8, FrameRule.parse("stack:3"))
    assert indices == [2, 5, 7] and pixels.shape == (3, 8, 8)
    # Values 20, 50, 70 over the volume's own range 20..70: 0, 0.6, 1 (per-slice normalization would give zeros).
    assert [round(float(pixels[c].mean()), 2) for c in range(3)] == [0.0, 0.6, 1.0]
    each = decode_dicom_records(_volume(4), 8, FrameRule.parse("each"))
    assert [i for i, _p in each] == [[0], [1], [2], [3]] and all(p.shape == (1, 8, 8) for _i, p in each)


@pytest.fixture
def enhanced_ct(tmp_path: Path) -> Path:
    """pydicom-data's enhanced CT (2 frames of 512 x 512, Enhanced CT Image Storage), in a folder of its own."""
    import pydicom
    from pydicom.data import get_testdata_file

    source = Path(get_testdata_file("eCT_Supplemental.dcm"))
    ds = pydicom.dcmread(source, stop_before_pixels=True)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2.1" and int(ds.NumberOfFrames) == 2
    root = tmp_path / "ect"
    (root / "abnormal").mkdir(parents=True)
    shutil.copy2(source, root / "abnormal" / "ect.dcm")  # not a symbolic link: an import never follows one
    return root


def _import(root: Path, frames: str) -> tuple[object, list[AcceptedRecord]]:
    records: list[AcceptedRecord] = []
    report = run_import(root, ImportOptions(fmt="dicom", frames=frames, image_size=32), secret=SECRET,
                        split_seed="frames-seed", sink=records.append)
    return report, records


def test_an_enhanced_ct_imports_as_the_documented_records(enhanced_ct: Path):
    report, records = _import(enhanced_ct, "middle")
    assert report.buckets["imported"] == 1 and len(records) == 1
    pixels, dicom, meta = decode_image_payload(records[0].payload)
    assert pixels.shape == (1, 32, 32) and dicom is not None
    assert meta["frames"] == 2 and meta["frame_indices"] == [1] and meta["frame_rule"] == "middle"

    report, records = _import(enhanced_ct, "each")
    assert report.buckets["imported"] == 1 and report.files[0].imported == 2 and len(records) == 2
    decoded = [decode_image_payload(r.payload) for r in records]
    assert [m["frame_indices"] for _p, _d, m in decoded] == [[0], [1]]
    # The de-identified file is stored once, with the first frame; the other frame refers to it by SOP UID.
    assert decoded[0][1] is not None and decoded[1][1] is None
    assert decoded[0][2]["sop_uid"] == decoded[1][2]["sop_uid"]
    # One patient: one group, one split, one label, whatever the frame.
    assert {r.group_key for r in records} == {decoded[0][2]["pseudonym"]}
    assert len({r.split for r in records}) == 1 and {r.label for r in records} == {"abnormal"}
    assert report.changes["dicom_frame_records"] == 2

    report, records = _import(enhanced_ct, "stack:2")
    (record,) = records
    pixels, dicom, meta = decode_image_payload(record.payload)
    assert pixels.shape == (2, 32, 32) and meta["frame_indices"] == [0, 1] and dicom is not None

    report, records = _import(enhanced_ct, "stack:3")
    assert not records and report.buckets["rejected"] == 1
    assert report.files[0].reason.startswith("the image has 2 frames; --frames stack:3 needs")
