"""Synthetic DICOM files for tests and the demo: phantom images with fake PHI everywhere it hides.

Every name, ID, date and UID here is invented. Two classes of phantom (a bright disc, a bright
square on a noisy background) make a small classification task; each patient has two studies on
different dates with a series of each class, so labels come from folder names (disc/, square/)
and de-identification can be checked for consistency across studies. The PHI sits in the usual
places and in the awkward ones: nested sequences two levels deep, a private block, an overlay.

    tree = write_sample_tree(tmp_path / "in")          # 3 patients x 2 studies x 2 series x 2 images
    write_ultrasound(tmp_path / "in" / "us.dcm")       # US without BurnedInAnnotation: quarantined
    write_phantom(tmp_path / "in" / "b.dcm", ..., burned_in="YES")
    write_phantom_studies(tmp_path / "bench", 200)     # any number of files, for benchmarks
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

UID_ROOT = "1.2.826.0.1.3680043.8.498.77."
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
US_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.6.1"
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
PRIVATE_CREATOR_PHI = "ACME PHI 1.0"
PRIVATE_CREATOR_KEEP = "AIRLOCK TEST KEEP"
CLASSES = ("disc", "square")


@dataclass(frozen=True)
class FakePatient:
    patient_id: str
    name: str
    birth_date: str
    sex: str
    age: str


PATIENTS = (
    FakePatient("PID-1001", "Doe^Jane", "19700101", "F", "054Y"),
    FakePatient("PID-1002", "Roe^Richard", "19551212", "M", "068Y"),
    FakePatient("PID-1003", "Poe^Edgarina", "19880606", "F", "035Y"),
    FakePatient("PID-1004", "Moe^Maxwell", "19421130", "M", "081Y"),
)


@dataclass(frozen=True)
class SampleFile:
    """One written file and the original values a test checks against."""

    path: Path
    patient: FakePatient
    label: str
    study_uid: str
    series_uid: str
    sop_uid: str
    study_date: str


@dataclass(frozen=True)
class SampleTree:
    root: Path
    files: tuple[SampleFile, ...]


def uid(*parts: int) -> str:
    return UID_ROOT + ".".join(str(p) for p in parts)


def phantom_pixels(shape: str, size: int = 64, seed: int = 0) -> Any:
    """int16 CT-like values: a bright disc or square (jittered by `seed`) on a noisy background."""
    import numpy as np

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    cy, cx = size / 2 + rng.uniform(-size / 8, size / 8, 2)
    radius = size * rng.uniform(0.18, 0.28)
    inside = (np.hypot(yy - cy, xx - cx) <= radius) if shape == "disc" else \
        ((np.abs(yy - cy) <= radius) & (np.abs(xx - cx) <= radius))
    values = 1024 + rng.normal(0, 30, (size, size)) + inside * 800
    return values.astype(np.int16)


def write_phantom(path: Path, patient: FakePatient, *, shape: str = "disc", study: int = 1, series: int = 1,
                  instance: int = 1, study_date: str = "20240105", modality: str = "CT",
                  burned_in: str | None = None, size: int = 64, seed: int | None = None) -> SampleFile:
    """Write one phantom CT-like image with fake PHI in the header; returns what was written."""
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence

    number = int(patient.patient_id.split("-")[-1])
    study_uid, series_uid = uid(number, study), uid(number, study, series)
    sop_uid = uid(number, study, series, instance)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = EXPLICIT_VR_LITTLE_ENDIAN
    meta.SourceApplicationEntityTitle = "ACME_PACS_01"
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID, ds.SOPInstanceUID = CT_IMAGE_STORAGE, sop_uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.FrameOfReferenceUID = uid(number, study, 9)
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = ds.InstanceCreationDate = study_date
    ds.StudyTime, ds.SeriesTime, ds.ContentTime = "101500", "101700", "101733.250"
    ds.AcquisitionDateTime = study_date + "101730.000000+0100"
    ds.AccessionNumber = f"ACC{number}{study:02d}"
    ds.Modality = modality
    ds.Manufacturer = "Phantom Medical"
    ds.InstitutionName = "St. Example General Hospital"
    ds.InstitutionAddress = "1 Example Street, Exampleton"
    ds.StationName = "CT-ROOM-3"
    ds.ReferringPhysicianName = "Welby^Marcus"
    ds.OperatorsName = "Tech^Terry"
    ds.StudyDescription = f"Head scan for {patient.name}"
    ds.StudyID = f"S{number}{study}"
    ds.PatientName = patient.name
    ds.PatientID = patient.patient_id
    ds.IssuerOfPatientID = "EXAMPLE-HOSPITAL"
    ds.OtherPatientIDs = "OLD-" + patient.patient_id
    ds.PatientBirthDate = patient.birth_date
    ds.PatientSex, ds.PatientAge, ds.PatientWeight = patient.sex, patient.age, "71.5"
    ds.PatientAddress = "22 Private Lane, Exampleton"
    if burned_in is not None:
        ds.BurnedInAnnotation = burned_in
    # A kept sequence (the table does not list it) holding PHI two levels deep.
    deep = Dataset()
    deep.ReferencedSOPClassUID = CT_IMAGE_STORAGE
    deep.ReferencedSOPInstanceUID = uid(number, study, series, 900 + instance)
    deep.PersonName = "Nested^Person^Deep"
    ref = Dataset()
    ref.SeriesInstanceUID = series_uid
    ref.ReferringPhysicianName = "Nested^Doctor"
    ref.ReferencedSOPSequence = Sequence([deep])
    ds.ReferencedSeriesSequence = Sequence([ref])
    # A sequence the table removes (X), with a name and a UID inside.
    request = Dataset()
    request.RequestedProcedureID = f"RP{number}"
    request.StudyInstanceUID = study_uid
    request.ScheduledPerformingPhysicianName = "Sched^Sam"
    ds.RequestAttributesSequence = Sequence([request])
    # Private blocks: one whose creator nobody allowed, one a site may allow.
    phi_block = ds.private_block(0x0009, PRIVATE_CREATOR_PHI, create=True)
    phi_block.add_new(0x01, "LO", f"copy of {patient.name}")
    phi_block.add_new(0x02, "DA", study_date)
    keep_block = ds.private_block(0x0011, PRIVATE_CREATOR_KEEP, create=True)
    keep_block.add_new(0x01, "LO", "vendor setting 7")
    keep_block.add_new(0x02, "UI", uid(number, study, 8))
    keep_block.add_new(0x03, "DA", study_date)

    pixels = phantom_pixels(shape, size, seed if seed is not None else number * 1000 + study * 100 + series * 10
                            + instance)
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope = "-1024", "1"
    ds.WindowCenter, ds.WindowWidth = "400", "1200"
    ds.PixelData = pixels.tobytes()
    # An overlay plane carrying (pretend) text: the whole 60xx group has to go.
    ds.add_new(0x60000010, "US", size)
    ds.add_new(0x60000011, "US", size)
    ds.add_new(0x60000040, "CS", "G")
    ds.add_new(0x60000050, "SS", [1, 1])
    ds.add_new(0x60000100, "US", 1)
    ds.add_new(0x60000102, "US", 0)
    ds.add_new(0x60003000, "OW", np.packbits(np.eye(size, dtype=np.uint8), bitorder="little").tobytes())
    _write(ds, path)
    return SampleFile(path, patient, shape, study_uid, series_uid, sop_uid, study_date)


def write_ultrasound(path: Path, patient: FakePatient = PATIENTS[3], *, burned_in: str | None = None) -> Path:
    """An 8-bit RGB ultrasound frame with (pretend) text in the corner and no BurnedInAnnotation."""
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset

    number = int(patient.patient_id.split("-")[-1])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = US_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = uid(number, 50, 1, 1)
    meta.TransferSyntaxUID = EXPLICIT_VR_LITTLE_ENDIAN
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = US_IMAGE_STORAGE, uid(number, 50, 1, 1)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = uid(number, 50), uid(number, 50, 1)
    ds.Modality, ds.StudyDate = "US", "20240301"
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = patient.name, patient.patient_id, patient.birth_date
    if burned_in is not None:
        ds.BurnedInAnnotation = burned_in
    rng = np.random.default_rng(number)
    pixels = rng.integers(0, 60, (48, 64, 3), dtype=np.uint8)
    pixels[2:8, 2:30] = 255  # where the scanner prints the patient's name
    ds.Rows, ds.Columns = 48, 64
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = pixels.tobytes()
    _write(ds, path)
    return path


def write_sample_tree(root: Path, *, patients: int = 3, studies: int = 2, images: int = 2,
                      size: int = 64) -> SampleTree:
    """root/<class>/<patient>_<study>_<n>.dcm for `patients` x `studies` x both classes x `images`."""
    files = []
    for patient in PATIENTS[:patients]:
        for study in range(1, studies + 1):
            study_date = f"2024{study * 2:02d}1{study}"  # studies weeks apart: intervals must survive
            for series, shape in enumerate(CLASSES, start=1):
                folder = root / shape
                for instance in range(1, images + 1):
                    path = folder / f"{patient.patient_id}_{study}_{series}_{instance}.dcm"
                    files.append(write_phantom(path, patient, shape=shape, study=study, series=series,
                                               instance=instance, study_date=study_date, size=size))
    return SampleTree(root, tuple(files))


def write_phantom_studies(root: Path, count: int, *, size: int = 64) -> SampleTree:
    """`count` phantoms spread over the fake patients (a study per patient, both classes): for benchmarks."""
    files = []
    for n in range(count):
        patient = PATIENTS[n % len(PATIENTS)]
        shape = CLASSES[(n // len(PATIENTS)) % 2]
        path = root / shape / f"{patient.patient_id}_{n:05d}.dcm"
        files.append(write_phantom(path, patient, shape=shape, series=CLASSES.index(shape) + 1, instance=n + 1,
                                   size=size))
    return SampleTree(root, tuple(files))


def _write(ds: Any, path: Path) -> None:
    from pydicom import dcmwrite

    path.parent.mkdir(parents=True, exist_ok=True)
    dcmwrite(path, ds, enforce_file_format=True)
