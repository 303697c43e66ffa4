"""Synthetic DICOM for the demo: phantom CT slices in two classes, with fake PHI in every header.

    files = write_phantom_set(Path("dicom"), patients=24, images=4)   # dicom/normal/*.dcm, dicom/abnormal/*.dcm
    phi_values(files[0])                                              # the identifiers de-identification must remove

A slice is an elliptical water-density body on air with Gaussian noise; "abnormal" slices add a
bright round nodule somewhere inside the body, which a small CNN learns to see in a few dozen
steps. Labels come from the folder names. Every name, ID, address and date is invented, but they
sit where real ones do (patient module, institution, physicians, accession number, a private
block), so an import that failed to de-identify would leave them in the stored files.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CLASSES = ("normal", "abnormal")
UID_ROOT = "1.2.826.0.1.3680043.8.498.91."  # a demo root: never a real site's
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
PRIVATE_CREATOR = "PLANT NORTH PACS 1.0"
FIRST_NAMES = ("Jane", "Omar", "Li", "Greta", "Kofi", "Marta", "Ivan", "Aiko", "Pedro", "Nia", "Tomas", "Sara")
LAST_NAMES = ("Example", "Sample", "Fictive", "Madeup", "Placeholder", "Testperson")
INSTITUTION = "St. Example General Hospital"
REFERRING = "Welby^Marcus"

# Header fields that carry PHI in the generated files (keyword -> what the demo reports).
PHI_KEYWORDS = ("PatientName", "PatientID", "PatientBirthDate", "PatientAddress", "OtherPatientIDs",
                "AccessionNumber", "InstitutionName", "ReferringPhysicianName", "StudyInstanceUID")


@dataclass(frozen=True)
class PhantomFile:
    """One written file: where, its class, and the identifying values in its header."""

    path: Path
    label: str
    phi: dict[str, str]


def fake_patient(number: int) -> dict[str, str]:
    first, last = FIRST_NAMES[number % len(FIRST_NAMES)], LAST_NAMES[number % len(LAST_NAMES)]
    return {"PatientName": f"{last}^{first}", "PatientID": f"MRN-{400100 + number * 37}",
            "PatientBirthDate": f"19{40 + number % 50:02d}{1 + number % 12:02d}{1 + number % 28:02d}",
            "PatientAddress": f"{number + 3} Invented Road, Exampleton",
            "OtherPatientIDs": f"OLD-{9100 + number}"}


def phantom_pixels(label: str, size: int, rng: Any) -> Any:
    """int16 Hounsfield-like values: air, a water-density ellipse, and for "abnormal" a bright nodule."""
    import numpy as np

    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cy, cx = size / 2 + rng.uniform(-size / 16, size / 16, 2)
    ry, rx = size * rng.uniform(0.32, 0.42), size * rng.uniform(0.36, 0.46)
    body = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    values = np.where(body, 40.0, -1000.0) + rng.normal(0, 25, (size, size))
    if label == "abnormal":
        radius = size * rng.uniform(0.08, 0.12)
        angle, distance = rng.uniform(0, 2 * np.pi), rng.uniform(0, 0.5)
        ny, nx = cy + np.sin(angle) * ry * distance, cx + np.cos(angle) * rx * distance
        values += (np.hypot(yy - ny, xx - nx) <= radius) * 700.0
    return values.astype(np.int16)


def write_phantom(path: Path, *, label: str, patient_number: int, image: int, size: int = 64,
                  seed: int = 0) -> PhantomFile:
    import numpy as np
    from pydicom import dcmwrite
    from pydicom.dataset import Dataset, FileMetaDataset

    rng = np.random.default_rng([seed, patient_number, image, CLASSES.index(label)])
    patient = fake_patient(patient_number)
    study_uid = f"{UID_ROOT}{patient_number}.1"
    series_uid = f"{study_uid}.{CLASSES.index(label) + 1}"
    sop_uid = f"{series_uid}.{image}"
    study_date = f"2025{1 + patient_number % 12:02d}{1 + image % 28:02d}"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CT_IMAGE_STORAGE, sop_uid
    meta.TransferSyntaxUID = EXPLICIT_VR_LITTLE_ENDIAN
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID, ds.SOPInstanceUID = CT_IMAGE_STORAGE, sop_uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = study_date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "093000"
    ds.Modality, ds.Manufacturer = "CT", "Phantom Medical"
    ds.BurnedInAnnotation = "NO"
    ds.InstitutionName, ds.ReferringPhysicianName = INSTITUTION, REFERRING
    ds.AccessionNumber = f"ACC{patient_number:04d}{image:02d}"
    ds.StudyDescription = f"Chest CT for {patient['PatientName'].replace('^', ' ')}"
    for keyword, value in patient.items():
        setattr(ds, keyword, value)
    ds.PatientSex = "F" if patient_number % 2 else "M"
    block = ds.private_block(0x0009, PRIVATE_CREATOR, create=True)
    block.add_new(0x01, "LO", f"worklist copy: {patient['PatientName']} {patient['PatientID']}")
    pixels = phantom_pixels(label, size, rng)
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope = "0", "1"
    ds.WindowCenter, ds.WindowWidth = "40", "400"
    ds.PixelData = pixels.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    dcmwrite(path, ds, enforce_file_format=True)
    phi = {**patient, "AccessionNumber": ds.AccessionNumber, "InstitutionName": INSTITUTION,
           "ReferringPhysicianName": REFERRING, "StudyInstanceUID": study_uid}
    return PhantomFile(path, label, phi)


def write_phantom_set(root: Path, *, patients: int = 24, images: int = 4, size: int = 64, seed: int = 0,
                      first_patient: int = 1) -> list[PhantomFile]:
    """root/<class>/<patient>_<n>.dcm: each patient gets `images` slices, alternating normal and abnormal."""
    files = []
    for number in range(first_patient, first_patient + patients):
        for image in range(1, images + 1):
            label = CLASSES[(number + image) % 2]
            path = root / label / f"patient{number:03d}_{image}.dcm"
            files.append(write_phantom(path, label=label, patient_number=number, image=image, size=size,
                                       seed=seed))
    return files


def phi_found(path: Path, phi: dict[str, str]) -> list[str]:
    """Header keywords of `phi` whose original value is still in the file (header or anywhere in its bytes)."""
    from pydicom import dcmread

    ds = dcmread(path)
    raw = path.read_bytes()
    return [keyword for keyword, value in phi.items() if str(ds.get(keyword, "")) == value or value_in(raw, value)]


def value_in(raw: bytes, value: str) -> bool:
    """Whether an identifying value is anywhere in a file's bytes (person names in both spellings).

    A value of digits only (a birth date) counts where it stands alone, not inside a longer run of
    digits: a remapped UID is 39 random decimal digits per study, series and image, and one of them
    holding "19410202" somewhere is chance, not a leak (a simulation puts it at one demo run in 700).
    """
    for spelling in {value, value.replace("^", " ")}:
        data = spelling.encode("latin-1")
        if spelling.isdigit():
            if re.search(rb"(?<![0-9])" + re.escape(data) + rb"(?![0-9])", raw):
                return True
        elif data in raw:
            return True
    return False
