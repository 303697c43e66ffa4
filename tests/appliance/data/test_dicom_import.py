"""DICOM through run_import: buckets, labels, splits, duplicates, and de-identification checked on
every dataset stored, for synthetic phantoms and for every file that ships with pydicom."""

from __future__ import annotations

import io
import logging
import os
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from appliance.data.dicom_deid import DeidProfile, effective_action, keeps_uid, load_action_table, remap_uid
from appliance.data.dicom_files import quiet_pydicom
from appliance.data.errors import DataError
from appliance.data.images import decode_image_payload, export_image_record
from appliance.data.pipeline import AcceptedRecord, ImportOptions, KnownRecords, run_import
from appliance.data.report import ImportReport
from tests.appliance.data.dicom_samples import PATIENTS, write_phantom, write_sample_tree, write_ultrasound

SECRET = b"site-secret-for-tests-0123456789"
SEED = "split-seed-1"
# Added by the de-identifier itself, so they have no original to compare with.
ADDED = {0x00100010, 0x00100020, 0x00120062, 0x00120063, 0x00120064, 0x00280303}


def _import(root: Path, **options) -> tuple[ImportReport, list[AcceptedRecord]]:
    records: list[AcceptedRecord] = []
    known = options.pop("known", None)
    report = run_import(root, ImportOptions(fmt="dicom", **options), secret=SECRET, split_seed=SEED,
                        sink=records.append, known=known)
    return report, records


def _dataset(data: bytes):
    import pydicom

    return pydicom.dcmread(io.BytesIO(data))


@pytest.fixture(scope="module")
def sample_root(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("dicom-in")
    tree = write_sample_tree(root)
    write_ultrasound(root / "us.dcm")
    write_phantom(root / "burned.dcm", PATIENTS[3], study=7, burned_in="YES")
    return tree


def test_phantoms_import_with_folder_labels_one_split_per_patient_and_risky_files_quarantined(sample_root):
    report, records = _import(sample_root.root)
    assert report.buckets["imported"] == 24 and report.buckets["quarantined"] == 2
    assert sum(report.buckets.values()) == len(report.files) == 26
    quarantined = {f.rel: f.reason for f in report.files if f.bucket == "quarantined"}
    assert "BurnedInAnnotation is YES" in quarantined["burned.dcm"]
    assert "modality US" in quarantined["us.dcm"] and "--accept-burned-in" in quarantined["us.dcm"]
    assert Counter(r.label for r in records) == {"disc": 12, "square": 12}
    splits_per_patient = defaultdict(set)
    for record in records:
        splits_per_patient[record.group_key].add(record.split)
        assert record.kind == "dicom" and record.group_key.startswith("ANON-")
    assert len(splits_per_patient) == 3 and all(len(s) == 1 for s in splits_per_patient.values())
    by_rel = {f.rel: f.file_no for f in report.files}
    for sample in sample_root.files:
        record = next(r for r in records if r.file_no == by_rel[sample.path.relative_to(sample_root.root).as_posix()])
        pixels, dicom, meta = decode_image_payload(record.payload)
        assert pixels.shape == (1, 224, 224) and str(pixels.dtype) == "float16"
        assert 0.0 <= float(pixels.min()) and float(pixels.max()) <= 1.0
        assert float(pixels[0, 112, 112]) > 0.6 > float(pixels[0, 2, 2])  # the bright phantom sits in the middle
        assert meta["sop_uid"] == remap_uid(SECRET, sample.sop_uid) == _dataset(dicom).SOPInstanceUID
        assert meta["pseudonym"] == record.group_key and meta["modality"] == "CT"
        assert sample.patient.patient_id.encode() not in record.payload
        assert sample.patient.name.encode() not in record.payload
    changes = report.changes
    assert changes["deid_patient_pseudonymized"] == 24 and changes["deid_uids_remapped"] > 24 * 5
    assert changes["deid_private_removed"] == 24 * 7 and "burned_in_accepted" not in changes


def test_accepting_burned_in_imports_and_counts_them(sample_root):
    report, records = _import(sample_root.root, accept_burned_in=True, image_size=32)
    assert report.buckets["imported"] == 26 and report.changes["burned_in_accepted"] == 2
    us = next(r for r in records if r.file_no == next(f.file_no for f in report.files if f.rel == "us.dcm"))
    pixels, _dicom, meta = decode_image_payload(us.payload)
    assert pixels.shape == (3, 32, 32) and meta["modality"] == "US"
    assert us.label is None  # in the import root: no folder, no labels file


def test_reimport_is_an_exact_duplicate_and_gives_identical_bytes(sample_root):
    _report, first = _import(sample_root.root)
    _report, again = _import(sample_root.root)
    assert [r.payload for r in first] == [r.payload for r in again]  # UIDs, dates and pseudonyms are stable
    known = KnownRecords(hashes={r.content_hash for r in first})
    report, records = _import(sample_root.root, known=known)
    assert not records and report.buckets["duplicate"] == 24 and report.changes["duplicate_exact"] == 24
    assert report.buckets["quarantined"] == 2


def test_a_labels_csv_wins_over_folders_by_sop_then_study_then_name(sample_root, tmp_path: Path):
    by_sop, by_study, by_name = sample_root.files[0], sample_root.files[5], sample_root.files[-1]
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("key,label\n"
                        f"{by_sop.sop_uid},sop-label\n"
                        f"{by_study.study_uid},study-label\n"
                        f"{by_name.path.name},name-label\n")
    report, records = _import(sample_root.root, labels=csv_path)
    by_rel = {f.file_no: f.rel for f in report.files}
    labels = {by_rel[r.file_no]: r.label for r in records}
    rel = {s: s.path.relative_to(sample_root.root).as_posix() for s in (by_sop, by_study, by_name)}
    assert labels[rel[by_sop]] == "sop-label"
    assert labels[rel[by_name]] == "name-label"
    same_study = [s for s in sample_root.files if s.study_uid == by_study.study_uid and s is not by_sop]
    assert {labels[s.path.relative_to(sample_root.root).as_posix()] for s in same_study} == {"study-label"}
    unlabelled = sum(1 for r in records if r.label is None)
    assert unlabelled == report.changes["unlabelled"] > 0  # a labels file turns folder names off


def test_a_bad_labels_csv_stops_the_import_naming_the_line(sample_root, tmp_path: Path):
    bad = tmp_path / "labels.csv"
    bad.write_text("filename,label\na.dcm,disc\n\nb.dcm,square\na.dcm,square\n")
    with pytest.raises(DataError, match="line 5: the key on line 2 repeats here with a different label"):
        _import(sample_root.root, labels=bad)


def test_export_writes_the_deidentified_dicom(sample_root, tmp_path: Path):
    _report, records = _import(sample_root.root / "disc")
    path = export_image_record(records[0].payload, tmp_path, "r0")
    assert path.name == "r0.dcm"
    out = _dataset(path.read_bytes())
    assert out.PatientIdentityRemoved == "YES" and str(out.PatientName).startswith("ANON-")


# --- every file shipped with pydicom -------------------------------------------------------------------

def _pydicom_root(tmp_path: Path) -> Path:
    """test_files/*.dcm, charset_files/*.dcm and the dicomdirtests tree, hard-linked (or copied) under
    one root: an import never follows symbolic links."""
    import shutil

    from pydicom.data import get_testdata_file

    def link_or_copy(source: str, target: str) -> None:
        try:
            os.link(source, target)
        except OSError:  # another filesystem
            shutil.copy2(source, target)

    data = Path(get_testdata_file("CT_small.dcm")).parent.parent
    root = tmp_path / "pydicom"
    (root / "test_files").mkdir(parents=True)
    for source in sorted((data / "test_files").glob("*.dcm")):
        link_or_copy(str(source), str(root / "test_files" / source.name))
    (root / "charset_files").mkdir()
    for source in sorted((data / "charset_files").glob("*.dcm")):
        link_or_copy(str(source), str(root / "charset_files" / source.name))
    shutil.copytree(data / "test_files" / "dicomdirtests", root / "dicomdirtests", copy_function=link_or_copy)
    return root


def _walk(ds, prefix=()):
    """(path, element) for every element at every depth; path = (tag, item index, tag, ...)."""
    for elem in ds:
        path = (*prefix, int(elem.tag))
        yield path, elem
        if elem.VR == "SQ":
            for index, item in enumerate(elem.value):
                yield from _walk(item, (*path, index))


def _values(elem) -> list[str]:
    if elem.is_empty:
        return []
    return [str(v) for v in elem.value] if elem.VM > 1 else [str(elem.value)]


def _check_deidentified(original, out, profile: DeidProfile) -> set[str]:
    """Assert the table's actions hold for every element of `out`; return the original instance UIDs."""
    table = load_action_table()
    before = dict(_walk(original))
    original_uids = {v for _p, e in before.items() if e.VR == "UI" and not keeps_uid(e.keyword) for v in _values(e)}
    dummied_sequences = set()
    for path, elem in _walk(out):
        tag = path[-1]
        if path[0] in ADDED or path == (0x7FE00010,):
            continue
        where = f"{elem.keyword or hex(tag)} at depth {len(path) // 2}"
        assert not (tag >> 16) & 1, f"private element left: {where}"
        assert (tag >> 16) & 0xFF00 not in (0x5000, 0x6000), f"overlay/curve left: {where}"
        old = before.get(path)
        assert old is not None, f"an element appeared that the original did not have: {where}"
        inside_dummy = any(path[:i] in dummied_sequences for i in range(1, len(path)))
        row = table.row_for(tag)
        action = effective_action(row, elem.VR, profile) if row else "K"
        if action == "D" and elem.VR == "SQ":
            dummied_sequences.add(path)
        assert action != "X", f"an X element is present: {where}"
        values, old_values = _values(elem), _values(old)
        if elem.VR == "UI":
            expected = old_values if keeps_uid(elem.keyword) else [remap_uid(SECRET, v) for v in old_values]
            assert values == expected, f"UID not remapped as keyed: {where}"
        elif action == "Z":
            assert not values or inside_dummy, f"a Z element has a value: {where}"
        elif action in ("D", "C") and elem.VR != "SQ" and old_values and old_values != ["ANONYMIZED"]:
            assert values != old_values or elem.VR == "TM", f"original value kept: {where}"
        elif action == "K" and elem.VR not in ("SQ", "DA", "DT") and not inside_dummy:
            assert values == old_values, f"a kept element changed: {where}"
    return original_uids


def test_every_pydicom_file_lands_in_one_bucket_and_every_stored_dataset_is_deidentified(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, recwarn: pytest.WarningsRecorder):
    import pydicom

    root = _pydicom_root(tmp_path)
    files_read = sum(len(files) for _dir, _dirs, files in os.walk(root, followlinks=True))
    with caplog.at_level(logging.DEBUG):
        report, _records = _import(root)
    # pydicom's warnings and log records quote element values ("Invalid value for VR PN: ..."): none escape.
    assert not [r for r in caplog.records if r.name.startswith("pydicom")] and not len(recwarn)
    assert len(report.files) == files_read and sum(report.buckets.values()) == files_read
    outcome = {f.rel: f for f in report.files}

    def reason(rel: str) -> str:
        return outcome[rel].reason

    assert report.buckets == {"imported": 39, "duplicate": 12, "cleaned-empty": 0, "quarantined": 42, "rejected": 93}
    assert outcome["test_files/CT_small.dcm"].bucket == "imported"
    mr = [outcome[f"test_files/MR_small{s}.dcm"].bucket for s in ("", "_RLE", "_bigendian", "_expb", "_implicit",
                                                                    "_jp2klossless", "_padded")]
    assert mr.count("imported") == 1 and mr.count("duplicate") == 6
    for rel in ("dicomdirtests/DICOMDIR", "dicomdirtests/TINY_ALPHA/DICOMDIR"):
        assert reason(rel) == "DICOMDIR index, not an image; the images it lists are imported on their own"
    for rel in ("test_files/rtplan.dcm", "test_files/test-SR.dcm", "test_files/reportsi.dcm",
                "test_files/waveform_ecg.dcm", "test_files/rtplan_truncated.dcm"):
        assert reason(rel).startswith("no pixel data"), rel
    assert "pyjpegls" in reason("test_files/MR_small_jpeg_ls_lossless.dcm")
    assert "pylibjpeg-libjpeg" in reason("test_files/SC_rgb_jpeg_gdcm.dcm")
    assert "12-bit JPEG needs pylibjpeg-libjpeg or GDCM" in reason("test_files/JPGExtended.dcm")
    assert reason("test_files/no_meta.dcm").startswith("not a DICOM file")
    assert outcome["test_files/MR_truncated.dcm"].bucket == "rejected"
    assert outcome["test_files/badVR.dcm"].bucket == "rejected"
    assert "US" in reason("test_files/examples_rgb_color.dcm")
    assert all("\n" not in f.reason and len(f.reason) < 300 for f in report.files)

    # Every dataset that any option lets through: the table's actions hold at every depth.
    accepted_report, accepted = _import(root, accept_burned_in=True)
    assert accepted_report.buckets["imported"] == 56 and accepted_report.buckets["quarantined"] == 0
    rel_of = {f.file_no: f.rel for f in accepted_report.files}
    mapping: dict[str, set[str]] = defaultdict(set)
    stored = []
    for record in accepted:
        _pixels, dicom, meta = decode_image_payload(record.payload)
        with quiet_pydicom():  # the originals have invalid values that pydicom warns about, quoting them
            original, out = pydicom.dcmread(root / rel_of[record.file_no]), _dataset(dicom)
            for uid in _check_deidentified(original, out, DeidProfile()):
                mapping[uid].add(remap_uid(SECRET, uid))
        assert out.PatientName == out.PatientID == meta["pseudonym"] == record.group_key
        stored.append(record.payload)
    everything = b"".join(stored)
    leaked = [uid for uid in mapping if uid.encode() in everything]
    assert not leaked, f"{len(leaked)} original UIDs appear in the stored records"
    # Same secret, second run: byte-identical records, hence the same UIDs everywhere.
    _again_report, again = _import(root, accept_burned_in=True)
    assert [r.payload for r in again] == stored


# --- pixels --------------------------------------------------------------------------------------------

def _frames_dataset(frames, photometric: str = "MONOCHROME2", ts: str = "1.2.840.10008.1.2.1"):
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset

    stack = np.asarray(frames, dtype=np.uint16)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ts
    ds.Rows, ds.Columns = stack.shape[1:]
    ds.NumberOfFrames = len(stack)
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = stack.tobytes()
    return ds


def test_a_multiframe_image_gives_its_middle_frame_and_monochrome1_is_inverted():
    import numpy as np

    from appliance.data.dicom_pixels import decode_dicom_pixels

    ramp = np.tile(np.arange(16, dtype=np.uint16) * 100, (16, 1))
    flat = np.full((16, 16), 7, dtype=np.uint16)
    pixels = decode_dicom_pixels(_frames_dataset([flat, flat, ramp, flat, flat]), 16)
    assert pixels.shape == (1, 16, 16) and str(pixels.dtype) == "float16"
    assert float(pixels[0, 0, 0]) == 0.0 and float(pixels[0, 0, 15]) == 1.0  # the ramp, not a flat frame
    inverted = decode_dicom_pixels(_frames_dataset([ramp], "MONOCHROME1"), 16)
    assert float(inverted[0, 0, 0]) == 1.0 and float(inverted[0, 0, 15]) == 0.0


def test_pixels_the_bundle_cannot_decode_are_rejected_naming_the_plugin():
    from appliance.data.dicom_pixels import decode_dicom_pixels
    from appliance.data.errors import FileRejected

    frame = [[0, 1], [2, 3]]
    with pytest.raises(FileRejected, match="HTJ2K needs pylibjpeg-openjpeg"):
        decode_dicom_pixels(_frames_dataset([frame], ts="1.2.840.10008.1.2.4.201"), 8)
    with pytest.raises(FileRejected, match=r"unsupported transfer syntax 1\.2\.3\.4; export the images uncompressed"):
        decode_dicom_pixels(_frames_dataset([frame], ts="1.2.3.4"), 8)
    with quiet_pydicom(), pytest.raises(FileRejected, match=r"transfer syntax \(not a valid UID\)"):
        decode_dicom_pixels(_frames_dataset([frame], ts="Doe^Jane"), 8)  # pydicom warns, quoting the value
