"""DICOM through the whole CLI: import with folder labels, show, export, and no PHI in plaintext anywhere
(catalog, audit, vault files, job logs, temp dirs)."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from tests.appliance.data.dicom_samples import PATIENTS, write_sample_tree, write_ultrasound
from tests.conftest import all_pytest_folders, files_holding, run_cli


def _plaintext_hits(roots: Path | list[Path], markers: list[bytes], tmp_path: Path | None = None,
                    since: float = 0.0) -> list[tuple[str, bytes]]:
    """Files under `roots` that hold a marker; with `tmp_path`, pytest's folders are not entered (they hold the
    inputs; the test searches its own output and home by themselves)."""
    return files_holding(roots, *markers, since=since, skip=[all_pytest_folders(tmp_path)] if tmp_path else [])


def test_dicom_import_show_export_and_no_phi_at_rest(vault_init, unlock, airlock_home: Path, tmp_path: Path) -> None:
    started = time.time()
    src = tmp_path / "usb"
    tree = write_sample_tree(src, patients=2, studies=1, images=2)
    write_ultrasound(src / "us" / "scan.dcm")  # no BurnedInAnnotation on an ultrasound: quarantined
    vault_init()
    unlock()
    done = run_cli("data", "import", str(src), "--name", "chest", "--format", "dicom", "--profile", "medical")
    assert done.returncode == 0, done.stderr
    assert "quarantined" in done.stdout and "us/scan.dcm" in done.stdout

    show = json.loads(run_cli("data", "show", "chest", "--json").stdout)
    assert show["dataset"]["kind"] == "dicom"
    assert sum(show["split_counts"].values()) == len(tree.files)
    assert set(show["labels"]) == {"disc", "square"}
    assert show["versions"][0]["summary"]["buckets"]["quarantined"] == 1

    out = tmp_path / "review"
    exported = run_cli("data", "export", "chest", "--out", str(out))
    assert exported.returncode == 0, exported.stderr
    dcm = sorted(out.rglob("*.dcm"))
    assert len(dcm) == len(tree.files)
    assert {p.parent.name for p in dcm} == {"disc", "square"}

    import pydicom

    for path in dcm:
        ds = pydicom.dcmread(path)
        assert ds.PatientIdentityRemoved == "YES"
        assert str(ds.PatientName).startswith("ANON-")
    originals = {f.sop_uid for f in tree.files} | {f.study_uid for f in tree.files}
    markers = [m.encode() for p in PATIENTS[:2] for m in (p.name, p.patient_id)] + [u.encode() for u in originals]
    assert _plaintext_hits(out, markers) == []
    # At rest: the catalog (incl. audit and job rows), vault files and job logs hold none of it.
    assert _plaintext_hits(airlock_home, markers) == []
    # Temp dirs: nothing written there while the appliance ran (pytest's own folders hold the inputs).
    assert _plaintext_hits(Path(tempfile.gettempdir()), markers, tmp_path, since=started) == []

    again = run_cli("data", "import", str(src), "--name", "chest", "--format", "dicom", "--profile", "medical",
                    "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["records_added"] == 0


def test_labels_file_for_text_is_refused(vault_init, tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.jsonl").write_text('{"text": "press 4 hydraulic leak"}\n')
    labels = tmp_path / "labels.csv"
    labels.write_text("key,label\na.jsonl,x\n")
    vault_init()
    result = run_cli("data", "import", str(src), "--name", "t", "--labels", str(labels), "--dry-run")
    assert result.returncode == 2
    assert "--labels is for DICOM and image imports" in result.stderr


def test_ris_labels_keyed_by_accession_number_label_the_images_and_the_keys_stay_out_of_the_home(
        vault_init, unlock, airlock_home: Path, tmp_path: Path) -> None:
    started = time.time()
    src = tmp_path / "pacs-export"
    tree = write_sample_tree(src, patients=2, studies=1, images=1)
    accessions = {"PID-1001": "ACC100101", "PID-1002": "ACC100201"}  # dicom_samples: ACC<patient><study>
    ris = tmp_path / "ris-export.csv"
    ris.write_text("AccessionNumber,label\nACC100101,pneumonia\nACC100201,normal\nACC999999,unused\n")
    vault_init()
    unlock()
    done = run_cli("data", "import", str(src), "--name", "cxr", "--format", "dicom", "--labels", str(ris), "--json")
    assert done.returncode == 0, done.stderr
    show = json.loads(run_cli("data", "show", "cxr", "--json").stdout)
    # Labels come from the RIS file, not from the folders (disc/, square/) the files sit in.
    assert {label: sum(splits.values()) for label, splits in show["labels"].items()} == {"pneumonia": 2, "normal": 2}
    out = tmp_path / "review"
    assert run_cli("data", "export", "cxr", "--out", str(out)).returncode == 0
    import pydicom

    by_label = {path.parent.name: pydicom.dcmread(path) for path in out.rglob("*.dcm")}
    assert set(by_label) == {"pneumonia", "normal"}
    assert all(not ds.AccessionNumber for ds in by_label.values())  # Annex E: emptied (Z)
    report = run_cli("data", "report", "cxr", "--json")
    assert report.returncode == 0, report.stderr
    markers = [a.encode() for a in accessions.values()] + [b"ACC999999"]
    outputs = (done.stdout + done.stderr + report.stdout + report.stderr).encode()
    assert not [m for m in markers if m in outputs]
    # Byte search over every file under AIRLOCK_HOME (catalog, audit, job rows and logs, vault files).
    assert _plaintext_hits(airlock_home, markers) == []
    assert _plaintext_hits(out, markers) == []
    assert _plaintext_hits(Path(tempfile.gettempdir()), markers, tmp_path, since=started) == []
    assert len(tree.files) == 4
