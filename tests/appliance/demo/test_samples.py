"""The demo's sample data: the shipped text files are what their generator writes; the DICOM
phantoms carry fake PHI before import and their two classes can be told apart."""

from __future__ import annotations

import json
from pathlib import Path

from appliance.demo import text_samples
from appliance.demo.dicom_phantoms import CLASSES, PHI_KEYWORDS, phi_found, write_phantom_set


def test_shipped_text_files_equal_a_fresh_generation():
    for path, records in ((text_samples.FIRST_BATCH, text_samples.first_batch()),
                          (text_samples.NEW_BATCH, text_samples.new_batch())):
        assert path.read_text(encoding="utf-8") == text_samples.to_jsonl(records), \
            f"{path.name} differs: run `python -m appliance.demo.text_samples` and commit the result"


def test_text_records_are_chats_and_the_new_batch_is_new():
    first = [json.loads(line) for line in text_samples.FIRST_BATCH.read_text(encoding="utf-8").splitlines()]
    new = [json.loads(line) for line in text_samples.NEW_BATCH.read_text(encoding="utf-8").splitlines()]
    assert 200 <= len(first) <= 400 and 30 <= len(new) <= 120
    for record in first + new:
        assert [m["role"] for m in record["messages"]] == ["user", "assistant"]
        assert all(m["content"].strip() for m in record["messages"])
    assert not {json.dumps(r, sort_keys=True) for r in first} & {json.dumps(r, sort_keys=True) for r in new}
    # The new batch brings machines the first one never mentions: knowledge a retrain has to add.
    first_text = json.dumps(first)
    for machine in text_samples.NEW_MACHINES:
        assert machine not in first_text and machine in json.dumps(new)


def test_phantoms_carry_fake_phi_in_their_headers(tmp_path: Path):
    files = write_phantom_set(tmp_path, patients=3, images=2)
    assert len(files) == 6 and {f.label for f in files} == set(CLASSES)
    for f in files:
        assert f.path.parent.name == f.label
        assert phi_found(f.path, f.phi) == list(PHI_KEYWORDS)
    assert len({f.phi["PatientID"] for f in files}) == 3


def test_phantom_classes_are_visibly_separable(tmp_path: Path):
    """A nodule is a blob of pixels far brighter than water: counting them separates the classes."""
    import numpy as np
    from pydicom import dcmread

    files = write_phantom_set(tmp_path, patients=10, images=4)
    bright = {label: [int((dcmread(f.path).pixel_array > 400).sum()) for f in files if f.label == label]
              for label in CLASSES}
    assert max(bright["normal"]) == 0
    assert min(bright["abnormal"]) >= 20
    assert np.mean(bright["abnormal"]) > 50


def test_phantoms_are_deterministic(tmp_path: Path):
    a = write_phantom_set(tmp_path / "a", patients=2, images=2)
    b = write_phantom_set(tmp_path / "b", patients=2, images=2)
    for x, y in zip(a, b, strict=True):
        assert x.path.read_bytes() == y.path.read_bytes()
