"""De-identification of single datasets: the action table, options, UIDs, dates, private blocks."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from appliance.data.dicom_deid import (
    DeidProfile,
    deidentify_dataset,
    effective_action,
    keeps_uid,
    load_action_table,
    remap_uid,
    shift_date,
    shift_datetime,
)
from appliance.data.dicom_files import write_part10
from tests.appliance.data.dicom_samples import (
    CT_IMAGE_STORAGE,
    PATIENTS,
    PRIVATE_CREATOR_KEEP,
    write_phantom,
)

SECRET = b"site-secret-for-tests-0123456789"
FAKE_PHI = ["Doe", "Jane", "PID-1001", "19700101", "St. Example", "Example Street", "Welby", "Tech^Terry",
            "ACC101", "OLD-PID", "Nested^", "Sched^", "copy of", "Private Lane", "EXAMPLE-HOSPITAL", "ACME_PACS",
            "CT-ROOM-3", "Head scan"]


def _read(path: Path):
    import pydicom

    return pydicom.dcmread(path)


def _roundtrip(ds):
    import pydicom

    data = write_part10(ds)
    return data, pydicom.dcmread(io.BytesIO(data))


def _tag(keyword: str) -> int:
    from pydicom.datadict import tag_for_keyword

    return int(tag_for_keyword(keyword))


@pytest.fixture
def phantom(tmp_path: Path):
    return write_phantom(tmp_path / "a.dcm", PATIENTS[0], study_date="20240105")


def test_the_action_table_loads_every_row_and_resolves_combinations():
    table = load_action_table()
    assert len(table.exact) + len(table.patterns) == 459
    assert {row.action for row in table.exact.values()} <= {"X", "Z", "D", "U"}
    action = {kw: table.row_for(_tag(kw)).action for kw in (
        "InstitutionName", "ContentDate", "ContrastBolusAgent", "ReferencedImageSequence", "PatientName",
        "StudyInstanceUID", "PersonName", "AccessionNumber", "DeviceSerialNumber", "StationName")}
    assert action == {"InstitutionName": "X", "ContentDate": "D", "ContrastBolusAgent": "Z",
                      "ReferencedImageSequence": "X", "PatientName": "Z", "StudyInstanceUID": "U",
                      "PersonName": "D", "AccessionNumber": "Z", "DeviceSerialNumber": "D", "StationName": "X"}
    assert table.row_for(0x60023000).name == "Overlay Data"  # the 60xx repeating group
    assert table.row_for(0x00280010) is None  # Rows: not in the table, kept


def test_options_change_the_effective_action():
    table = load_action_table()
    both, neither = DeidProfile(), DeidProfile(retain_patient_characteristics=False, retain_modified_dates=False)
    age, study_date = table.row_for(_tag("PatientAge")), table.row_for(_tag("StudyDate"))
    assert (effective_action(age, "AS", both), effective_action(age, "AS", neither)) == ("K", "X")
    assert (effective_action(study_date, "DA", both), effective_action(study_date, "DA", neither)) == ("C", "Z")
    # "C" in the patient-characteristics column is free text nobody can clean automatically: removed.
    assert effective_action(table.row_for(_tag("Allergies")), "LO", both) == "X"
    # A C for dates on a VR that is no date falls back to the basic action.
    assert effective_action(table.row_for(_tag("TimezoneOffsetFromUTC")), "SH", both) == "X"


def test_a_phantom_loses_every_identifier_and_keeps_what_training_needs(phantom):
    ds = _read(phantom.path)
    result = deidentify_dataset(ds, SECRET)
    data, out = _roundtrip(ds)
    for text in FAKE_PHI:
        assert text.encode() not in data, text
    for original in (phantom.study_uid, phantom.series_uid, phantom.sop_uid):
        assert original.encode() not in data
    assert out.PatientName == out.PatientID == result.pseudonym
    assert result.pseudonym.startswith("ANON-") and len(result.pseudonym) == 17
    assert out.StudyInstanceUID == remap_uid(SECRET, phantom.study_uid) == result.study_uid
    assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID == remap_uid(SECRET, phantom.sop_uid)
    assert "SourceApplicationEntityTitle" not in out.file_meta
    assert out.preamble == b"\0" * 128
    assert out.SOPClassUID == CT_IMAGE_STORAGE and out.file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID
    # Z empties, X removes, K keeps (Retain Patient Characteristics).
    assert out.PatientBirthDate == "" and out.AccessionNumber == "" and out.ReferringPhysicianName == ""
    for keyword in ("InstitutionName", "OtherPatientIDs", "PatientAddress", "RequestAttributesSequence",
                    "StudyDescription", "IssuerOfPatientID", "OperatorsName", "StationName"):
        assert keyword not in out, keyword
    assert (out.PatientSex, out.PatientAge, str(out.PatientWeight)) == ("F", "054Y", "71.5")
    # Sequences are walked: the table applies two levels down, UIDs inside are remapped.
    ref = out.ReferencedSeriesSequence[0]
    assert ref.ReferringPhysicianName == "" and ref.SeriesInstanceUID == out.SeriesInstanceUID
    deep = ref.ReferencedSOPSequence[0]
    assert deep.PersonName == "ANONYMIZED" and deep.ReferencedSOPClassUID == CT_IMAGE_STORAGE
    assert deep.ReferencedSOPInstanceUID.startswith("2.25.")
    # Private blocks (none allowed) and the overlay group are gone; the pixels are untouched.
    assert not [e for e in out if e.tag.group % 2 == 1 or 0x6000 <= e.tag.group <= 0x60FF]
    assert out.PixelData == _read(phantom.path).PixelData
    assert out.PatientIdentityRemoved == "YES" and out.LongitudinalTemporalInformationModified == "MODIFIED"
    codes = [(item.CodeValue, item.CodingSchemeDesignator) for item in out.DeidentificationMethodCodeSequence]
    assert codes == [("113100", "DCM"), ("113107", "DCM"), ("113108", "DCM")]
    assert result.changes["deid_private_removed"] == 7 and result.changes["deid_removed"] >= 10


def test_dates_move_by_one_secret_offset_per_patient(tmp_path: Path):
    first = write_phantom(tmp_path / "1.dcm", PATIENTS[0], study=1, study_date="20240105")
    later = write_phantom(tmp_path / "2.dcm", PATIENTS[0], study=2, study_date="20240320")
    other = write_phantom(tmp_path / "3.dcm", PATIENTS[1], study=1, study_date="20240105")
    outs = []
    for sample in (first, later, other):
        ds = _read(sample.path)
        result = deidentify_dataset(ds, SECRET)
        outs.append((result, _roundtrip(ds)[1]))
    (r1, a), (r2, b), (r3, c) = outs
    assert r1.date_offset_days == r2.date_offset_days and -3650 <= r1.date_offset_days <= -1
    assert r1.pseudonym == r2.pseudonym != r3.pseudonym
    assert a.StudyDate == shift_date("20240105", r1.date_offset_days) != "20240105"
    assert b.StudyDate == shift_date("20240320", r1.date_offset_days)
    # Every date moves, listed (Study, Content) or not (Instance Creation); times stay; DT keeps time and zone.
    assert a.InstanceCreationDate == a.ContentDate == a.SeriesDate == a.StudyDate
    assert a.StudyTime == "101500" and a.AcquisitionDateTime == a.StudyDate + "101730.000000+0100"
    assert c.StudyDate == shift_date("20240105", r3.date_offset_days)


def test_without_the_options_dates_go_and_characteristics_go(phantom):
    ds = _read(phantom.path)
    deidentify_dataset(ds, SECRET, DeidProfile(retain_patient_characteristics=False, retain_modified_dates=False))
    data, out = _roundtrip(ds)
    assert b"20240105" not in data
    assert out.StudyDate == "" and "SeriesDate" not in out and "AcquisitionDate" not in out
    assert out.ContentDate == "19000101" and out.InstanceCreationDate == "19000101"
    assert "PatientAge" not in out and "PatientWeight" not in out and out.PatientSex == ""
    assert out.LongitudinalTemporalInformationModified == "REMOVED"
    assert [item.CodeValue for item in out.DeidentificationMethodCodeSequence] == ["113100"]


def test_an_allowed_private_creator_keeps_its_block_with_uids_and_dates_handled(phantom):
    ds = _read(phantom.path)
    original_uid = ds.private_block(0x0011, PRIVATE_CREATOR_KEEP)[0x02].value
    result = deidentify_dataset(ds, SECRET, DeidProfile(private_creators_allowed=(PRIVATE_CREATOR_KEEP,)))
    out = _roundtrip(ds)[1]
    block = out.private_block(0x0011, PRIVATE_CREATOR_KEEP)
    assert block[0x01].value == "vendor setting 7"
    assert block[0x02].value == remap_uid(SECRET, original_uid)
    assert block[0x03].value == shift_date("20240105", result.date_offset_days)
    assert not [e for e in out if e.tag.group == 0x0009]


def test_uids_remap_consistently_under_one_secret_and_registry_uids_stay():
    original = "1.2.826.0.1.3680043.8.498.77.1001.1"
    mapped = remap_uid(SECRET, original)
    assert mapped == remap_uid(SECRET, original + "\0") != remap_uid(b"another-site-secret", original)
    assert mapped.startswith("2.25.") and mapped[5:].isdigit() and len(mapped) <= 64
    assert int(mapped[5:]) < 2**128
    for keyword in ("SOPClassUID", "ReferencedSOPClassUID", "TransferSyntaxUID", "CodingSchemeUID",
                    "ImplementationClassUID", "ReferencedSOPClassUIDInFile"):
        assert keeps_uid(keyword), keyword
    for keyword in ("SOPInstanceUID", "StudyInstanceUID", "FrameOfReferenceUID", "ReferencedSOPInstanceUID"):
        assert not keeps_uid(keyword), keyword


def test_a_dummied_sequence_keeps_its_items_but_no_value_and_unknown_elements_go():
    from pydicom.datadict import get_entry
    from pydicom.dataset import Dataset

    item = Dataset()
    item.UnformattedTextValue = "Doe^Jane said hello"
    item.PatientAddress = "22 Private Lane"
    item.ReferencedSOPInstanceUID = "1.2.3.4.5"
    ds = Dataset()
    ds.PatientID = "PID-1001"
    ds.GraphicAnnotationSequence = [item]
    ds.add_new(0x00080000, "UL", 42)  # a group length: stale after editing
    unknown = 0x00089F99
    with pytest.raises(KeyError):
        get_entry(unknown)
    ds.add_new(unknown, "LO", "Doe^Jane")
    result = deidentify_dataset(ds, SECRET)
    kept = ds.GraphicAnnotationSequence[0]
    assert kept.UnformattedTextValue == "ANONYMIZED" and "PatientAddress" not in kept
    assert kept.ReferencedSOPInstanceUID == remap_uid(SECRET, "1.2.3.4.5")
    assert 0x00080000 not in ds and unknown not in ds
    assert result.changes["deid_unknown_removed"] == 1


def test_date_shifting_edge_cases():
    assert shift_date("20240301", -1) == "20240229"
    assert shift_date("2024.03.01", -1) == "20240229"  # ACR-NEMA style
    assert shift_date("202403", -1) is None and shift_date("20241340", -1) is None
    assert shift_datetime("20240301000000.5-0500", -1) == "20240229000000.5-0500"
    assert shift_datetime("2024", -1) is None
    assert shift_date("00010101", -1) is None  # before year 1: nothing sane to write
