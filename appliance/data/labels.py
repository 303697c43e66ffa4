"""Labels for image and DICOM records: from a labels CSV, or from the name of the file's folder.

The CSV has a header row, at least one key column and one label column:

    key,label                      (or filename/file/path, SOPInstanceUID, SeriesInstanceUID,
    1.2.840.99.1.2.3,pneumonia      StudyInstanceUID for the key; label/class for the label)
    scans/p01/img7.png,normal

A RIS export keys on the accession number or the patient ID instead: a column named
AccessionNumber (or Accession) or PatientID (or MRN) holds those, and only those (a value there is
never compared with a file name or UID: accession "12345" and a file named 12345 are different keys).

    AccessionNumber,label
    A20240117-0042,pneumonia

Keys are original UIDs, accession numbers, patient IDs or file names, so the loaded mapping is PHI:
it lives in memory for the import, is compared with each file's header before de-identification
removes those values, and is never stored, logged or reported; errors name the line, never the key
or label. The stored record carries only the label.

A record's label is looked up in this order: SOPInstanceUID, SeriesInstanceUID, StudyInstanceUID,
AccessionNumber, PatientID, path relative to the import root, base name, name of the parent folder.
Without a labels file the label is the parent folder's name (None for files directly in the import
root).
"""

from __future__ import annotations

import csv
from pathlib import Path

from appliance.data.errors import DataError

KEY_COLUMNS = ("key", "sopinstanceuid", "seriesinstanceuid", "studyinstanceuid", "path", "filename", "file")
RIS_COLUMNS = {"accessionnumber": "accession", "accession": "accession", "accessionno": "accession",
               "patientid": "patient", "mrn": "patient"}
"""RIS key columns -> the namespace their keys live in (so they never match a file name or UID)."""
LABEL_COLUMNS = ("label", "class")
MAX_LABEL_CHARS = 200

_HINT = "the labels file needs a header row such as 'key,label' (keys: file name, relative path, " \
        "StudyInstanceUID, SOPInstanceUID, AccessionNumber or PatientID), one row per key, and the same label " \
        "wherever a key repeats"


def load_labels(path: Path) -> dict[str, str]:
    """key -> label from a CSV; DataError naming the file and line for anything it cannot use."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise DataError(f"labels file not found: {path}", hint="check the --labels path") from None
    except IsADirectoryError:
        raise DataError(f"labels file {path} is a folder", hint="pass the CSV file itself to --labels") from None
    except OSError as exc:
        raise DataError(f"cannot read labels file {path} ({(exc.strerror or type(exc).__name__).lower()})",
                        hint="check the file's permissions") from None
    except UnicodeDecodeError:
        raise DataError(f"labels file {path} is not UTF-8 text", hint="save it as CSV (UTF-8)") from None
    lines = text.splitlines()
    if not any(line.strip() for line in lines):
        raise DataError(f"labels file {path} is empty", hint=_HINT)
    reader = csv.reader(lines, delimiter=_delimiter(lines[0]))
    header = [_column_name(cell) for cell in next(reader)]
    label_col = next((header.index(name) for name in LABEL_COLUMNS if name in header), None)
    if label_col is None:
        raise DataError(f"labels file {path} line 1: no label column (expected 'label' or 'class')", hint=_HINT)
    key_cols = [(i, "") for i, name in enumerate(header) if name in KEY_COLUMNS]
    key_cols += [(i, RIS_COLUMNS[name]) for i, name in enumerate(header) if name in RIS_COLUMNS]
    if not key_cols:
        raise DataError(f"labels file {path} line 1: no key column (expected key, filename, file, path, "
                        "StudyInstanceUID, SOPInstanceUID, AccessionNumber or PatientID)", hint=_HINT)
    labels: dict[str, str] = {}
    first_line: dict[str, int] = {}
    for row in reader:
        line = reader.line_num
        if not any(cell.strip() for cell in row):
            continue
        label = row[label_col].strip() if label_col < len(row) else ""
        if not label:
            raise DataError(f"labels file {path} line {line}: the label is empty", hint=_HINT)
        if len(label) > MAX_LABEL_CHARS:
            raise DataError(f"labels file {path} line {line}: the label is longer than {MAX_LABEL_CHARS} characters",
                            hint=_HINT)
        keys = [_namespaced(space, row[i]) for i, space in key_cols if i < len(row) and row[i].strip()]
        if not keys:
            raise DataError(f"labels file {path} line {line}: the key is empty", hint=_HINT)
        for key in keys:
            if key in labels and labels[key] != label:
                raise DataError(f"labels file {path} line {line}: the key on line {first_line[key]} repeats here "
                                "with a different label", hint=_HINT)
            labels[key] = label
            first_line.setdefault(key, line)
    if not labels:
        raise DataError(f"labels file {path} has a header but no rows", hint=_HINT)
    return labels


def find_label(labels: dict[str, str] | None, rel: str, *, sop_uid: str = "", series_uid: str = "",
               study_uid: str = "", accession: str = "", patient_id: str = "") -> str | None:
    """The label of one input file (see the module docstring for the lookup order)."""
    rel = _normalize_key(rel)
    folder = rel.rsplit("/", 2)[-2] if "/" in rel else ""
    if labels is None:
        return folder or None
    base = rel.rsplit("/", 1)[-1]
    ris = (_namespaced("accession", accession) if accession.strip() else "",
           _namespaced("patient", patient_id) if patient_id.strip() else "")
    for key in (sop_uid, series_uid, study_uid, *ris, rel, base, folder):
        if key and key in labels:
            return labels[key]
    return None


def _delimiter(header: str) -> str:
    # Spreadsheet exports in many locales use ';' (the decimal comma), some use tabs.
    counts = {sep: header.count(sep) for sep in (",", ";", "\t")}
    best = max(counts, key=lambda sep: counts[sep])
    return best if counts[best] else ","


def _column_name(cell: str) -> str:
    return "".join(ch for ch in cell.strip().lower() if ch.isalnum())


def _namespaced(space: str, key: str) -> str:
    # A path or UID never holds "\0", so a namespaced RIS key never equals a file key or UID.
    return f"{space}\0{key.strip()}" if space else _normalize_key(key)


def _normalize_key(key: str) -> str:
    key = key.strip().replace("\\", "/")
    while key.startswith("./"):
        key = key[2:]
    return key
