"""De-identify one DICOM dataset: PS3.15 Annex E Basic Profile, driven by annex_e_actions.csv.

Two options of the profile are on by default (each a field of `DeidProfile`):

* Retain Patient Characteristics (code 113108): the table's K column keeps age, sex, size, weight,
  smoking and pregnancy status, ethnic group.
* Retain Longitudinal Temporal Information with Modified Dates (code 113107): every date (DA)
  and the date part of every date-time (DT) moves back by one secret offset per patient, from
  1 to 3650 days, derived from HMAC(site secret, original Patient ID). Intervals between a
  patient's studies survive; the calendar dates do not. Times stay: the shift is whole days.

Actions: X remove; Z empty; D replace with a dummy value of the element's VR (a sequence keeps
its items with every value in them dummied); K keep; U remap the UID; C (option columns)
shift dates and keep times. Every sequence is walked recursively and the table applies at
every depth. The top-level Patient's Name and Patient ID become the patient's pseudonym
("ANON-" + 12 hex digits of HMAC(site secret, original Patient ID)), so that a data steward
can see which images belong together without learning who the patient is.

Decisions the table leaves to the implementer, written down here so that a reviewer can find them:

* Combinations (X/Z, X/D, X/Z/D, Z/D, X/Z/U*) take the leftmost action (the most removal)
  unless the attribute is Type 1 in a common image IOD (`_NEEDS_VALUE`: D) or Type 2
  (`_MUST_BE_PRESENT`: Z, or D when Z is not offered), so that the file stays valid.
* The "C" (clean) entries of Retain Patient Characteristics are free text (Allergies, Patient
  State, Pre-Medication, Special Needs) that cannot be cleaned automatically: the basic action
  (remove) applies.
* With modified dates, a C entry on a VR other than DA/DT/TM (Frame Origin Timestamp, Timezone
  Offset From UTC) falls back to the basic action. Dates the table does not list (Instance
  Creation Date, Date of Secondary Capture, ...) are shifted too, so no real date sits beside a
  shifted one; without the option they get a dummy date. Registry versions (Context Group
  Version) are not dates of the patient and stay.
* Every UID (VR UI, at any depth, in the File Meta Information too) is remapped to
  "2.25." + the first 128 bits of HMAC-SHA256(site secret, UID) as a decimal integer: the same
  UID becomes the same UID in every file and every import under one site secret, and cannot be
  reversed without it. Registry UIDs stay (`keeps_uid`): SOP classes, transfer syntaxes, coding
  schemes, context groups, mapping resources, segmentation templates.
* Private elements (odd groups) are removed unless their Private Creator is listed in
  `private_creators_allowed`; kept private elements still get their UIDs remapped and dates shifted.
* Overlay (60xx) and curve (50xx) groups are removed whole: overlays are drawn text and graphics,
  and removing Overlay Data alone (as the table says) would leave a broken overlay.
* Group length elements (gggg,0000) are removed: they are optional and go stale when elements go.
* Public elements that the data dictionary does not know are removed: nobody has judged them.
* The File Meta Information is rebuilt from scratch (Source AE titles and private meta go) and
  the 128-byte preamble is zeroed (a dual-personality file can hide a TIFF image there).

Nothing here logs or returns original values; counts go to the `changes` Counter.
"""

from __future__ import annotations

import csv
import datetime
import hashlib
import hmac
from collections import Counter
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pydicom.dataelem import DataElement
    from pydicom.dataset import Dataset

ACTIONS_CSV = "annex_e_actions.csv"
PATIENT_NAME, PATIENT_ID = 0x00100010, 0x00100020
PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})

# Combination actions: attributes that a common image IOD requires (Type 1: a value, so D) or
# requires present (Type 2: Z). Everything else in a combination is removed (X, the leftmost).
_NEEDS_VALUE = frozenset({
    0x0008002A,  # Acquisition DateTime: Type 1 in the enhanced CT/MR/XA image modules
    0x00080023,  # Content Date: Type 1 in enhanced images, 2C in the General Image module
    0x00080033,  # Content Time: as Content Date
    0x00181000,  # Device Serial Number: Type 1 in Enhanced General Equipment
})
_MUST_BE_PRESENT = frozenset({
    0x00180010,  # Contrast/Bolus Agent: Type 2 in the Contrast/Bolus module
    0x00700084,  # Content Creator's Name: Type 2 in presentation states
    0x00400555,  # Acquisition Context Sequence: Type 2 in the Acquisition Context module
    0x00102203,  # Patient's Sex Neutered: Type 2C for animals
    0x300A0006, 0x300A0007,  # RT Plan Date/Time: Type 2 in RT General Plan
    0x30080250, 0x30080251,  # Treatment Date/Time: Type 2 in RT treatment records
})

_KEEP_UID_KEYWORDS = frozenset({
    "CodingSchemeUID", "ContextUID", "MappingResourceUID", "SegmentationTemplateUID",
    "SOPClassesInStudy", "SOPClassesSupported", "PertinentSOPClassesInStudy", "PertinentSOPClassesInSeries",
})
_REGISTRY_DATETIMES = frozenset({"ContextGroupVersion", "ContextGroupLocalVersion"})
_BYTES_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
_DUMMY: dict[str, Any] = {
    "AE": "ANONYMIZED", "AS": "000Y", "CS": "ANONYMIZED", "DA": "19000101", "DT": "19000101000000",
    "DS": "0", "IS": "0", "LO": "ANONYMIZED", "LT": "ANONYMIZED", "PN": "ANONYMIZED", "SH": "ANONYMIZED",
    "ST": "ANONYMIZED", "TM": "000000", "UC": "ANONYMIZED", "UR": "ANONYMIZED", "UT": "ANONYMIZED",
    "AT": 0, "FD": 0.0, "FL": 0.0, "SL": 0, "SS": 0, "SV": 0, "UL": 0, "US": 0, "UV": 0,
}
DEID_METHOD_CODES = {
    "basic": ("113100", "Basic Application Confidentiality Profile"),
    "dates": ("113107", "Retain Longitudinal Temporal Information Modified Dates Option"),
    "patient": ("113108", "Retain Patient Characteristics Option"),
}


@dataclass(frozen=True)
class DeidProfile:
    """Which options of the Basic Profile apply (the import options of the same names)."""

    retain_patient_characteristics: bool = True
    retain_modified_dates: bool = True
    private_creators_allowed: tuple[str, ...] = ()


@dataclass(frozen=True)
class ActionRow:
    """One row of Table E.1-1: `action` is the basic action resolved to one of X, Z, D, U."""

    tag: str
    name: str
    basic: str
    rtn_pat_chars: str
    rtn_long_modif_dates: str
    action: str


@dataclass(frozen=True)
class ActionTable:
    """The table by exact tag, plus the repeating-group rows (50xx, 60xx) as mask/value pairs."""

    exact: dict[int, ActionRow]
    patterns: tuple[tuple[int, int, ActionRow], ...] = ()

    def row_for(self, tag: int) -> ActionRow | None:
        row = self.exact.get(tag)
        if row is None:
            row = next((r for mask, value, r in self.patterns if tag & mask == value), None)
        return row


@dataclass(frozen=True)
class DeidResult:
    """What the importer needs after de-identification; none of it is an original value."""

    pseudonym: str
    date_offset_days: int
    study_uid: str
    series_uid: str
    sop_uid: str
    changes: Counter[str] = field(default_factory=Counter)


@cache
def load_action_table() -> ActionTable:
    """Parse annex_e_actions.csv (shipped beside this module); '#' lines are comments."""
    text = resources.files(__package__).joinpath(ACTIONS_CSV).read_text(encoding="utf-8")
    reader = csv.DictReader(line for line in text.splitlines() if line.strip() and not line.startswith("#"))
    exact: dict[int, ActionRow] = {}
    patterns: list[tuple[int, int, ActionRow]] = []
    for rec in reader:
        tag_text = rec["tag"].strip().lower()
        tag_for_resolve = int(tag_text.replace("x", "0"), 16)
        basic = rec["basic"].strip()
        row = ActionRow(tag_text, rec["name"].strip(), basic, rec["rtn_pat_chars"].strip(),
                        rec["rtn_long_modif_dates"].strip(), resolve_combination(tag_for_resolve, basic))
        if "x" in tag_text:
            mask = int("".join("0" if ch == "x" else "f" for ch in tag_text), 16)
            patterns.append((mask, int(tag_text.replace("x", "0"), 16), row))
        else:
            exact[int(tag_text, 16)] = row
    return ActionTable(exact, tuple(patterns))


def resolve_combination(tag: int, basic: str) -> str:
    """One of X, Z, D, U for a basic action such as 'X/Z/D' (see the module docstring)."""
    options = [opt.rstrip("*") for opt in basic.split("/")]
    if len(options) == 1:
        return options[0]
    if tag in _NEEDS_VALUE and "D" in options:
        return "D"
    if tag in _MUST_BE_PRESENT:
        return "Z" if "Z" in options else "D"
    return options[0]


def effective_action(row: ActionRow, vr: str, profile: DeidProfile) -> str:
    """X, Z, D, K, U or C for one element, after the profile's options."""
    if profile.retain_patient_characteristics and row.rtn_pat_chars == "K":
        return "K"
    if profile.retain_modified_dates and row.rtn_long_modif_dates == "C" and vr in ("DA", "DT", "TM"):
        return "C"
    return row.action


def keeps_uid(keyword: str) -> bool:
    """True for registry UIDs that identify no instance (SOP classes, transfer syntaxes, coding schemes)."""
    return "ClassUID" in keyword or "TransferSyntaxUID" in keyword or keyword in _KEEP_UID_KEYWORDS


def remap_uid(secret: bytes, uid: str) -> str:
    """'2.25.' + 128 bits of HMAC-SHA256(secret, uid): stable per site, not reversible without the secret."""
    digest = hmac.new(secret, uid.strip("\0 ").encode("utf-8"), hashlib.sha256).digest()
    return "2.25." + str(int.from_bytes(digest[:16], "big"))


def patient_key(ds: Dataset) -> str:
    """What identifies the patient: Patient ID, else the study, else the instance (never shown)."""
    for keyword, prefix in (("PatientID", ""), ("StudyInstanceUID", "study:"), ("SOPInstanceUID", "instance:")):
        value = str(ds.get(keyword, "") or "").strip("\0 ")
        if value:
            return prefix + value
    return "unknown"


def pseudonym_for(secret: bytes, key: str) -> str:
    return "ANON-" + _keyed_hex(secret, "dicom-patient", key)[:12].upper()


def date_offset_for(secret: bytes, key: str) -> int:
    """Days to add to every date of this patient: -1 .. -3650."""
    return -(int(_keyed_hex(secret, "dicom-date-offset", key)[:8], 16) % 3650 + 1)


def shift_date(value: str, days: int) -> str | None:
    """A DA value moved by `days`; None when it is not a full date (YYYYMMDD, or YYYY.MM.DD)."""
    text = value.strip().replace(".", "")
    if len(text) != 8 or not text.isdigit():
        return None
    try:
        moved = datetime.date(int(text[:4]), int(text[4:6]), int(text[6:8])) + datetime.timedelta(days=days)
    except (ValueError, OverflowError):
        return None
    return f"{moved.year:04d}{moved.month:02d}{moved.day:02d}"


def shift_datetime(value: str, days: int) -> str | None:
    """A DT value with its date part moved by `days` (time and UTC offset kept); None below day precision."""
    text = value.strip()
    date = shift_date(text[:8], days) if len(text) >= 8 else None
    return None if date is None else date + text[8:]


def deidentify_dataset(ds: Dataset, secret: bytes, profile: DeidProfile | None = None) -> DeidResult:
    """De-identify `ds` in place (header, sequences, file meta, preamble); pixel data is left as it is."""
    from pydicom.dataset import Dataset as PydicomDataset
    from pydicom.dataset import FileMetaDataset

    profile = profile or DeidProfile()
    key = patient_key(ds)
    pseudonym, offset = pseudonym_for(secret, key), date_offset_for(secret, key)
    walker = _Walker(load_action_table(), profile, secret, offset)
    walker.dataset(ds, top=True)

    ds.PatientName = pseudonym
    ds.PatientID = pseudonym
    walker.changes["deid_patient_pseudonymized"] += 1
    ds.PatientIdentityRemoved = "YES"
    methods = ["PS3.15 Annex E Basic Application Confidentiality Profile"]
    codes = [DEID_METHOD_CODES["basic"]]
    if profile.retain_modified_dates:
        methods.append("Retain Longitudinal Temporal Information Modified Dates")
        codes.append(DEID_METHOD_CODES["dates"])
    if profile.retain_patient_characteristics:
        methods.append("Retain Patient Characteristics")
        codes.append(DEID_METHOD_CODES["patient"])
    ds.DeidentificationMethod = methods
    items = []
    for value, meaning in codes:
        item = PydicomDataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "DCM", meaning
        items.append(item)
    ds.DeidentificationMethodCodeSequence = items
    ds.LongitudinalTemporalInformationModified = "MODIFIED" if profile.retain_modified_dates else "REMOVED"

    old_meta = getattr(ds, "file_meta", None) or FileMetaDataset()
    meta = FileMetaDataset()
    sop_class = ds.get("SOPClassUID") or old_meta.get("MediaStorageSOPClassUID")
    if sop_class:
        meta.MediaStorageSOPClassUID = sop_class
    sop_uid = str(ds.get("SOPInstanceUID", "") or "")
    if not sop_uid and old_meta.get("MediaStorageSOPInstanceUID"):
        sop_uid = walker.uid(str(old_meta.MediaStorageSOPInstanceUID))
    if sop_uid:
        meta.MediaStorageSOPInstanceUID = sop_uid
    if old_meta.get("TransferSyntaxUID"):
        meta.TransferSyntaxUID = old_meta.TransferSyntaxUID
    ds.file_meta = meta
    ds.preamble = b"\0" * 128
    return DeidResult(pseudonym, offset, str(ds.get("StudyInstanceUID", "") or ""),
                      str(ds.get("SeriesInstanceUID", "") or ""), sop_uid, walker.changes)


def _keyed_hex(secret: bytes, purpose: str, value: str) -> str:
    # The same construction as ImportContext.keyed_hash, so a pseudonym is reproducible from the secret.
    return hmac.new(secret, f"{purpose}\0{value}".encode(), hashlib.sha256).hexdigest()


class _Walker:
    """Applies the table to one dataset and every sequence in it; counts what it did."""

    def __init__(self, table: ActionTable, profile: DeidProfile, secret: bytes, offset: int) -> None:
        self.table, self.profile, self.secret, self.offset = table, profile, secret, offset
        self.allowed = frozenset(c.strip() for c in profile.private_creators_allowed)
        self.changes: Counter[str] = Counter()
        self._uids: dict[str, str] = {}

    def uid(self, value: str) -> str:
        if value not in self._uids:
            self._uids[value] = remap_uid(self.secret, value)
        self.changes["deid_uids_remapped"] += 1
        return self._uids[value]

    def dataset(self, ds: Dataset, *, top: bool = False) -> None:
        self._remove_private(ds)
        for tag in list(ds.keys()):
            if tag in ds and not (top and int(tag) in PIXEL_TAGS):
                self._element(ds, int(tag), top)

    def _element(self, ds: Dataset, tag: int, top: bool) -> None:
        group, number = tag >> 16, tag & 0xFFFF
        if number == 0 or (not group & 1 and group & 0xFF00 in (0x5000, 0x6000)):
            del ds[tag]  # group length, or an overlay/curve group (see the module docstring)
            self.changes["deid_removed"] += 1
            return
        row = None if group & 1 else self.table.row_for(tag)
        if row is None:
            if not group & 1 and not _in_dictionary(tag):
                del ds[tag]
                self.changes["deid_unknown_removed"] += 1
                return
            self._keep(ds[tag])
            return
        elem = ds[tag]
        action = effective_action(row, elem.VR, self.profile)
        if action == "X":
            del ds[tag]
            self.changes["deid_removed"] += 1
        elif action == "Z":
            if elem.VR == "SQ":
                elem.value = []
            else:
                elem.clear()
            self.changes["deid_emptied"] += 1
        elif action == "D":
            if elem.VR == "SQ":
                for item in elem.value:
                    self.dataset(item)
                    self._dummy_leaves(item)
            else:
                self._set_dummy(elem)
            self.changes["deid_dummied"] += 1
        elif action == "C":
            if elem.VR in ("DA", "DT"):
                self._shift(elem)
        elif action == "U" and elem.VR not in ("SQ", "UI"):
            self._set_dummy(elem)
            self.changes["deid_dummied"] += 1
        else:  # K, or U on a UI element or a sequence (U*: remap the UIDs inside)
            self._keep(elem)

    def _keep(self, elem: DataElement) -> None:
        """A retained element: sequences are walked, UIDs remapped, dates shifted (or dummied)."""
        if elem.VR == "SQ":
            for item in elem.value:
                self.dataset(item)
        elif elem.VR == "UI":
            if not keeps_uid(elem.keyword):
                self._remap(elem)
        elif elem.VR in ("DA", "DT") and elem.keyword not in _REGISTRY_DATETIMES and not elem.is_empty:
            if self.profile.retain_modified_dates:
                self._shift(elem)
            else:
                self._set_dummy(elem)
                self.changes["deid_dummied"] += 1

    def _remove_private(self, ds: Dataset) -> None:
        private = [int(t) for t in ds.keys() if int(t) >> 16 & 1]
        if not private:
            return
        creators: dict[tuple[int, int], str] = {}
        if self.allowed:
            for tag in private:
                if 0x10 <= tag & 0xFFFF <= 0xFF:
                    value = ds[tag].value
                    text = value.decode("latin-1") if isinstance(value, bytes) else str(value or "")
                    creators[(tag >> 16, tag & 0xFFFF)] = text.strip("\0 ")
        for tag in private:
            group, number = tag >> 16, tag & 0xFFFF
            if number < 0x10:
                creator = ""
            elif number <= 0xFF:
                creator = creators.get((group, number), "")
            else:
                creator = creators.get((group, number >> 8), "")
            if creator not in self.allowed:
                del ds[tag]
                self.changes["deid_private_removed"] += 1

    def _dummy_leaves(self, ds: Dataset) -> None:
        """Inside a D sequence: every value that is left after the table's actions becomes a dummy."""
        for elem in ds:
            if elem.VR == "SQ":
                for item in elem.value:
                    self._dummy_leaves(item)
            elif elem.VR != "UI" and not elem.is_empty:
                self._set_dummy(elem)

    def _set_dummy(self, elem: DataElement) -> None:
        vr = elem.VR
        if vr == "UI":
            if not keeps_uid(elem.keyword):
                self._remap(elem)
        elif vr in _BYTES_VRS:
            size = len(elem.value) if isinstance(elem.value, bytes | bytearray) else 0
            elem.value = b"\0" * max(2, size + size % 2)
        elif vr in _DUMMY:
            elem.value = _DUMMY[vr]
        else:
            elem.clear()

    def _remap(self, elem: DataElement) -> None:
        if elem.is_empty:
            return
        if elem.VM > 1:
            elem.value = [self.uid(str(v)) if str(v).strip("\0 ") else "" for v in elem.value]
        else:
            elem.value = self.uid(str(elem.value))

    def _shift(self, elem: DataElement) -> None:
        if elem.is_empty:
            return
        shift = shift_date if elem.VR == "DA" else shift_datetime
        values = list(elem.value) if elem.VM > 1 else [elem.value]
        moved = [shift(str(v), self.offset) if str(v).strip() else "" for v in values]
        if any(m is None for m in moved):
            # Not a full date (a range, YYYYMM, garbage): nothing safe to shift, so it goes.
            elem.clear()
            self.changes["deid_dates_unparseable"] += 1
            return
        elem.value = moved if elem.VM > 1 else moved[0]
        self.changes["deid_dates_shifted"] += len(moved)


def _in_dictionary(tag: int) -> bool:
    from pydicom.datadict import get_entry

    try:
        get_entry(tag)
    except KeyError:
        return False
    return True
