"""One DICOM file through the import: read, check, decode, quarantine, dedup, de-identify, accept.

Order, cheapest and most telling first: a file that is not DICOM, a DICOMDIR index, or a file
without pixel data (structured reports, RT plans) is rejected before anything is decoded;
pixels are decoded before the burned-in check so that "quarantined" always means "a usable
image that a person has to look at"; the duplicate check comes before de-identification so
that duplicates cost no header work and no counts.

Burned-in text (the rule, and why it is not the product issue's literal wording): the issue says
"any image whose BurnedInAnnotation is not NO, or of high-risk modality, is quarantined". Read
literally that quarantines every CT and MR image, because Burned In Annotation is optional (Type 3)
for them and almost never present. The rule implemented is:

    quarantine when BurnedInAnnotation is YES, or RecognizableVisualFeatures is YES (a face), or
    when the modality is high-risk (US, SC, XA, OT, DOC; a missing Modality counts as high-risk)
    and BurnedInAnnotation is anything but NO (missing counts as not NO).

With `accept_burned_in` those images are imported and counted (`burned_in_accepted`); the caller
audits that choice.

pydicom's warnings and log messages can quote element values (a patient's name in an "invalid
value" warning), so they are silenced while a file is handled. Reasons never quote file contents.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from appliance.data.dicom_deid import DeidProfile, deidentify_dataset
from appliance.data.dicom_pixels import PIXEL_TAGS, FrameRule, decode_dicom_records
from appliance.data.errors import FileRejected
from appliance.data.images import encode_image_payload, pixel_content_hash
from appliance.data.labels import find_label
from appliance.data.report import FileOutcome
from appliance.data.splits import assign_split

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

    from appliance.data.pipeline import ImportContext
    from appliance.data.walk import InputFile

HIGH_RISK_MODALITIES = frozenset({"US", "SC", "XA", "OT", "DOC"})
DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
DUPLICATE_REASON = "the same image is already in this dataset or earlier in this import"


def import_dicom_file(number: int, item: InputFile, ctx: ImportContext) -> FileOutcome:
    """Import one DICOM file (see the module docstring); FileRejected for a file that cannot be used.

    The import's frame rule (`--frames`, see appliance/data/dicom_pixels.py) decides how many
    records one file gives. Every record of a file has the file's patient (so its split), label
    and metadata; the de-identified DICOM is stored with the file's first record only, so that a
    1 000-frame loop imported per frame does not store its file 1 000 times.
    """
    from appliance.data.pipeline import AcceptedRecord

    options = ctx.options
    with quiet_pydicom(), _malformed_is_rejected():
        ds = read_dicom(item)
        check_is_image(ds)
        rule, risk = FrameRule.parse(options.frames), burned_in_risk(ds)
        if risk and not options.accept_burned_in:
            # Decoded only to show that it is a usable image; `each` would decode every frame of a long loop.
            decode_dicom_records(ds, options.image_size, FrameRule() if rule.mode == "each" else rule)
            return FileOutcome(number, item.rel, item.size, "dicom", "quarantined", risk, records_read=1)
        decoded = decode_dicom_records(ds, options.image_size, rule)
        # RIS keys (accession number, patient ID) are read here, before de-identification removes them;
        # they are only compared with the labels file in memory and go nowhere else.
        label = find_label(ctx.labels, item.rel, sop_uid=_text(ds, "SOPInstanceUID"),
                           series_uid=_text(ds, "SeriesInstanceUID"), study_uid=_text(ds, "StudyInstanceUID"),
                           accession=_text(ds, "AccessionNumber"), patient_id=_text(ds, "PatientID"))
        frames = int(_text(ds, "NumberOfFrames") or 1)
        meta = {"source": "dicom", "modality": _text(ds, "Modality"), "rows": int(ds.Rows), "cols": int(ds.Columns),
                "frames": frames, "photometric": _text(ds, "PhotometricInterpretation"),
                "frame_rule": rule.to_text()}
        fresh = []
        for indices, pixels in decoded:
            content_hash = pixel_content_hash(pixels, "dicom")
            if not ctx.is_duplicate(content_hash) and content_hash not in {h for h, _i, _p in fresh}:
                fresh.append((content_hash, indices, pixels))
        duplicates = len(decoded) - len(fresh)
        ctx.changes["duplicate_exact"] += duplicates
        if not fresh:
            return FileOutcome(number, item.rel, item.size, "dicom", "duplicate", DUPLICATE_REASON,
                               records_read=len(decoded), duplicates=duplicates)
        profile = DeidProfile(options.retain_patient_characteristics, options.retain_modified_dates,
                              tuple(options.private_creators_allowed))
        result = deidentify_dataset(ds, ctx.secret, profile)
        dicom_bytes = write_part10(ds)
    meta.update(pseudonym=result.pseudonym, study_uid=result.study_uid, series_uid=result.series_uid,
                sop_uid=result.sop_uid)
    ctx.changes.update(result.changes)
    if risk:
        ctx.changes["burned_in_accepted"] += len(fresh)
    if label is None:
        ctx.changes["unlabelled"] += len(fresh)
    if len(decoded) > 1:
        ctx.changes["dicom_frame_records"] += len(fresh)
    split = assign_split(result.pseudonym, ctx.split_seed, options.splits)
    for position, (content_hash, indices, pixels) in enumerate(fresh):
        record_meta = {**meta, "frame_indices": indices} if frames > 1 else meta
        payload = encode_image_payload(pixels, record_meta, dicom_bytes if position == 0 else None)
        ctx.accept(AcceptedRecord(content_hash, split, number, "dicom", payload, group_key=result.pseudonym,
                                  label=label))
    return FileOutcome(number, item.rel, item.size, "dicom", "imported", records_read=len(decoded),
                       imported=len(fresh), duplicates=duplicates)


def read_dicom(item: InputFile) -> Dataset:
    """The parsed file (large values deferred); FileRejected when it is not a readable DICOM Part-10 file."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(item.path, defer_size="1 MB")
    except InvalidDicomError:
        raise FileRejected("not a DICOM file (no 'DICM' Part-10 header); export it from the PACS as a "
                           "DICOM file") from None
    except (PermissionError, FileNotFoundError, MemoryError):
        raise
    except Exception as exc:  # pydicom raises anything on a truncated or corrupt file
        raise FileRejected(f"the DICOM file is truncated or corrupt ({type(exc).__name__} while parsing it)") from None


def check_is_image(ds: Dataset) -> None:
    """FileRejected for a DICOMDIR index or a file without pixel data."""
    meta = getattr(ds, "file_meta", None)
    sop_class = str((meta.get("MediaStorageSOPClassUID", "") if meta is not None else "") or "")
    if sop_class == DICOMDIR_SOP_CLASS or "DirectoryRecordSequence" in ds:
        raise FileRejected("DICOMDIR index, not an image; the images it lists are imported on their own")
    if not len(ds):
        raise FileRejected("the file ends after its file meta information: no data set (a truncated copy?); "
                           "copy or re-export it from the PACS")
    if not any(tag in ds for tag in PIXEL_TAGS):
        raise FileRejected("no pixel data (e.g. a structured report or RT plan); only images are imported")


def burned_in_risk(ds: Dataset) -> str | None:
    """Why this image may show patient text in its pixels (see the module docstring), or None."""
    burned = _text(ds, "BurnedInAnnotation").upper()
    if burned == "YES":
        return "BurnedInAnnotation is YES: the pixels show text; review it, then import with --accept-burned-in"
    if _text(ds, "RecognizableVisualFeatures").upper() == "YES":
        return ("RecognizableVisualFeatures is YES: the image may show a face; review it, then import with "
                "--accept-burned-in")
    modality = _text(ds, "Modality").upper()
    if burned != "NO" and (not modality or modality in HIGH_RISK_MODALITIES):
        return (f"modality {modality or '(missing)'} often carries burned-in text and BurnedInAnnotation is "
                f"{'missing' if not burned else 'not NO'}; review it, then import with --accept-burned-in")
    return None


def write_part10(ds: Dataset) -> bytes:
    """The dataset as a DICOM Part-10 file (preamble, validated file meta), in memory only."""
    import io

    import pydicom

    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


@contextmanager
def quiet_pydicom() -> Iterator[None]:
    """Silence pydicom's warnings and log records, which may quote element values, for one file."""
    # The level of the "pydicom" logger is the effective level of all its children (decoders
    # log there); propagate=False also stops records from a child that set a level of its own.
    logger = logging.getLogger("pydicom")
    level, propagate = logger.level, logger.propagate
    logger.setLevel(logging.CRITICAL + 1)
    logger.propagate = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)
        logger.propagate = propagate


@contextmanager
def _malformed_is_rejected() -> Iterator[None]:
    """pydicom converts values lazily, so a malformed element can raise anywhere: one line, the type only."""
    try:
        yield
    except (FileRejected, MemoryError, PermissionError, FileNotFoundError):
        raise
    except Exception as exc:  # the exception's message may quote the value, so it is not shown
        raise FileRejected(f"the DICOM header has a malformed element ({type(exc).__name__}); fix or re-export "
                           "the file") from None


def _text(ds: Dataset, keyword: str) -> str:
    try:
        value = ds.get(keyword, "")
    except Exception:  # a malformed value of an element that only steers the import
        return ""
    return str(value or "").strip("\0 ")
