"""Datasets in the vault: all-or-nothing imports, versions, stable splits, export, crypto-shredding,
recovery after SIGKILL. Real SQLite, real encryption, real subprocesses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from appliance.data import datasets
from appliance.data.errors import DataError
from appliance.data.pipeline import ImportOptions
from appliance.data.splits import SplitSpec
from appliance.data.store import (
    ImportCancelled,
    delete_dataset,
    export_dataset,
    import_dataset,
    iter_records,
    load_report,
    recover_imports,
)
from tests.conftest import BIN, REPO, files_holding, run_cli


def _qa(i: int) -> dict:
    return {"instruction": f"Pump {i} on line {i % 5} reports pressure drop code E{i:04d}. What do we check?",
            "output": f"Inspect seal kit {i * 7919 % 10007}, then valve block {i * 104729 % 10009}; log torque."}


def write_jsonl(path: Path, start: int, stop: int, *, bad_lines: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        for i in range(start, stop):
            fh.write(json.dumps(_qa(i)) + "\n")
        for _ in range(bad_lines):
            fh.write("{not json\n")
    return path


def _import(vault, root: Path, name: str = "logs", job: str = "job-1", **options):
    db, keys, home = vault
    return import_dataset(db, home, keys, root, name, ImportOptions(**options), job_id=job)


def _dataset_files(home: Path, ds_id: str) -> list[str]:
    folder = home / "vault" / "objects" / ds_id
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def test_import_then_reimport_adds_nothing_and_records_round_trip(vault, tmp_path: Path) -> None:
    db, keys, home = vault
    src = write_jsonl(tmp_path / "in" / "qa.jsonl", 0, 60, bad_lines=2)
    first = _import(vault, src.parent)
    assert first.created and first.version == 1 and first.report.records_imported == 60
    ds = datasets.get(db, "logs")
    assert sum(datasets.split_counts(db, ds.id).values()) == 60

    stored = list(iter_records(db, keys, home, ds))
    assert len(stored) == 60
    questions = {r.json()["messages"][0]["content"] for r in stored}
    assert questions == {_qa(i)["instruction"] for i in range(60)}
    # Ciphertext at rest: no record text in any file under the vault.
    assert files_holding(home / "vault", b"pressure drop") == []

    again = _import(vault, src.parent, job="job-2")
    assert again.version == 2 and again.report.records_imported == 0
    assert again.report.buckets["duplicate"] == 1
    assert sum(datasets.split_counts(db, ds.id).values()) == 60
    version, report = load_report(db, keys, home, ds, 1)
    assert version.records_added == 60 and report["files"][0]["rel"] == "qa.jsonl"
    assert report["files"][0]["rejected"] == 2


def test_appending_keeps_old_records_in_their_splits(vault, tmp_path: Path) -> None:
    db, keys, home = vault
    write_jsonl(tmp_path / "v1" / "a.jsonl", 0, 200)
    _import(vault, tmp_path / "v1")
    ds = datasets.get(db, "logs")
    before = {r.content_hash: r.split for r in datasets.records(db, ds.id)}

    write_jsonl(tmp_path / "v2" / "a.jsonl", 0, 200)       # the same records again ...
    write_jsonl(tmp_path / "v2" / "b.jsonl", 200, 320)     # ... and new ones
    result = _import(vault, tmp_path / "v2", job="job-2")
    assert result.report.records_imported == 120
    after = {r.content_hash: (r.split, r.version) for r in datasets.records(db, ds.id)}
    assert all(after[h] == (split, 1) for h, split in before.items())
    assert sum(1 for _, v in after.values() if v == 2) == 120
    assert {s for s, _ in after.values()} == {"train", "val", "test"}
    assert len(list(iter_records(db, keys, home, ds, min_version=2))) == 120


def test_near_duplicates_of_earlier_versions_are_dropped(vault, tmp_path: Path) -> None:
    write_jsonl(tmp_path / "v1" / "a.jsonl", 0, 20)
    _import(vault, tmp_path / "v1")
    near = tmp_path / "v2" / "b.jsonl"
    near.parent.mkdir()
    record = _qa(3)
    record["output"] += " Done."                       # one small edit: a near duplicate
    near.write_text(json.dumps(record) + "\n")
    result = _import(vault, near.parent, job="job-2")
    assert result.report.records_imported == 0 and result.report.changes["duplicate_near"] == 1


def test_a_cancelled_import_keeps_nothing(vault, tmp_path: Path) -> None:
    db, keys, home = vault
    write_jsonl(tmp_path / "v1" / "a.jsonl", 0, 30)
    _import(vault, tmp_path / "v1")
    ds = datasets.get(db, "logs")
    files_before = _dataset_files(home, ds.id)
    for i in range(30):
        write_jsonl(tmp_path / "v2" / f"f{i:02d}.jsonl", 1000 + i * 50, 1000 + (i + 1) * 50)
    calls = []

    def stop_after_ten() -> bool:
        calls.append(1)
        return len(calls) > 10

    with pytest.raises(ImportCancelled):
        import_dataset(db, home, keys, tmp_path / "v2", "logs", ImportOptions(), job_id="job-2",
                       should_stop=stop_after_ten)
    assert [v.version for v in datasets.versions(db, ds.id)] == [1]
    assert sum(datasets.split_counts(db, ds.id).values()) == 30
    assert _dataset_files(home, ds.id) == files_before

    # A new dataset whose import fails is removed entirely: no row, its key shredded.
    with pytest.raises(ImportCancelled):
        import_dataset(db, home, keys, tmp_path / "v2", "fresh", ImportOptions(), job_id="job-3",
                       should_stop=lambda: True)
    assert datasets.find(db, "fresh", include_importing=True) is None
    shredded = db.execute("SELECT state FROM vault_deks WHERE object_id LIKE 'ds-fresh-%'").fetchall()
    assert shredded == [("shredded",)]


def test_nothing_importable_creates_no_dataset(vault, tmp_path: Path) -> None:
    db, _, _ = vault
    folder = tmp_path / "junk"
    folder.mkdir()
    (folder / "a.jsonl").write_text("{broken\n[1, 2]\n")
    (folder / "empty.txt").write_text("")
    with pytest.raises(DataError, match=r"nothing to import into new dataset 'junk': 2 files read \(2 rejected\)"):
        _import(vault, folder, name="junk")
    assert datasets.find(db, "junk", include_importing=True) is None


def test_appends_must_match_the_dataset(vault, tmp_path: Path) -> None:
    write_jsonl(tmp_path / "v1" / "a.jsonl", 0, 10)
    _import(vault, tmp_path / "v1")
    with pytest.raises(DataError, match="created with --profile general"):
        _import(vault, tmp_path / "v1", job="j2", profile="medical")
    with pytest.raises(DataError, match="would move old records"):
        _import(vault, tmp_path / "v1", job="j3", splits=SplitSpec(0.5, 0.25, 0.25))
    with pytest.raises(DataError, match="is not allowed"):
        _import(vault, tmp_path / "v1", name="../etc")


def test_export_writes_what_is_stored_and_is_audited(vault, tmp_path: Path) -> None:
    db, keys, home = vault
    write_jsonl(tmp_path / "in" / "a.jsonl", 0, 50)
    _import(vault, tmp_path / "in")
    out = tmp_path / "review"
    counts = export_dataset(db, keys, home, "logs", out)
    assert sum(counts.values()) == 50
    lines = [json.loads(line) for f in sorted(out.glob("*.jsonl")) for line in f.read_text().splitlines()]
    assert len(lines) == 50 and all(r["messages"][1]["role"] == "assistant" for r in lines)
    row = db.execute("SELECT details FROM audit_log WHERE action = 'data.export'").fetchone()
    assert json.loads(row[0])["records"] == counts
    with pytest.raises(DataError, match="not empty"):
        export_dataset(db, keys, home, "logs", out)


def test_delete_shreds_the_key_and_frees_the_name(vault, tmp_path: Path) -> None:
    from appliance.vault.errors import ObjectError
    from appliance.vault.store import read_bytes

    db, keys, home = vault
    write_jsonl(tmp_path / "in" / "a.jsonl", 0, 20)
    _import(vault, tmp_path / "in")
    ds = datasets.get(db, "logs")
    shard = datasets.versions(db, ds.id)[0].shard_prefix + "-00000"
    assert delete_dataset(db, home, "logs") == 20
    assert _dataset_files(home, ds.id) == []
    assert db.execute("SELECT state, wrapped_dek FROM vault_deks WHERE object_id = ?", [ds.id]).fetchone() == \
        ("shredded", None)
    assert db.execute("SELECT COUNT(*) FROM dataset_records WHERE dataset_id = ?", [ds.id]).fetchone()[0] == 0
    with pytest.raises(ObjectError, match="was deleted"):
        read_bytes(db, keys, home, ds.id, shard)
    with pytest.raises(DataError, match="no dataset named"):
        datasets.get(db, "logs")
    assert _import(vault, tmp_path / "in", job="again").created  # the name is free again


def test_recovery_removes_orphan_shards_but_not_a_running_import(vault, tmp_path: Path) -> None:
    from appliance.data.store import dataset_lock

    db, keys, home = vault
    write_jsonl(tmp_path / "in" / "a.jsonl", 0, 10)
    _import(vault, tmp_path / "in")
    ds = datasets.get(db, "logs")
    from appliance.vault.store import write_bytes

    write_bytes(db, keys, home, ds.id, "dead-job-00000", b"half an import")
    with dataset_lock(home, "logs"):
        assert recover_imports(db, home) == []  # the lock says an import is running: leave it alone
    assert "dead-job-00000.alv" in _dataset_files(home, ds.id)
    assert recover_imports(db, home) == ["removed 1 files of an unfinished import into logs"]
    assert "dead-job-00000.alv" not in _dataset_files(home, ds.id)
    assert len(list(iter_records(db, keys, home, ds))) == 10


# --- the CLI, with a real key agent and real processes --------------------------------------------------------------

def _big_folder(root: Path, files: int) -> Path:
    for i in range(files):
        sub = root / f"d{i // 500:02d}"
        sub.mkdir(parents=True, exist_ok=True)
        # ~5 KB per record, words of its own: no record is a near-duplicate of another (one filler for all made
        # every record after the first a duplicate, and the only shard came after the whole folder was read).
        filler = " ".join(f"w{i}x{j}" for j in range(600))
        (sub / f"r{i:05d}.jsonl").write_text(json.dumps({"text": f"record {i} {filler}"}) + "\n")
    return root


def _kill_once_a_shard_exists(args: list[str], home: Path) -> subprocess.CompletedProcess | None:
    proc = subprocess.Popen([str(BIN / "airlock"), *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=os.environ.copy())
    objects = home / "vault" / "objects"
    deadline = time.monotonic() + 120
    existing = {p for p in objects.glob("ds-*/*.alv")} if objects.is_dir() else set()
    while time.monotonic() < deadline and proc.poll() is None:
        if objects.is_dir() and any(p not in existing for p in objects.glob("ds-*/*.alv")):
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return None
        time.sleep(0.02)
    proc.wait()
    return subprocess.CompletedProcess(args, proc.returncode)


@pytest.mark.skipif(sys.platform != "linux", reason="uses /proc and flock semantics of Linux")
def test_sigkill_midway_leaves_no_version_and_no_orphans(vault_init, unlock, airlock_home: Path,
                                                         tmp_path: Path) -> None:
    vault_init()
    unlock()
    small = write_jsonl(tmp_path / "small" / "a.jsonl", 0, 20).parent
    assert run_cli("data", "import", str(small), "--name", "logs").returncode == 0
    big = _big_folder(tmp_path / "big", 3000)

    for name in ("logs", "fresh"):
        finished = _kill_once_a_shard_exists(["data", "import", str(big), "--name", name], airlock_home)
        assert finished is None, "the import finished before it could be killed; make the folder bigger"

    listing = run_cli("data", "list", "--json")
    assert listing.returncode == 0, listing.stderr
    assert "unfinished" in listing.stderr
    found = {d["name"]: d for d in json.loads(listing.stdout)["datasets"]}
    assert set(found) == {"logs"} and found["logs"]["versions"] == 1 and found["logs"]["records"] == 20
    from appliance.catalog import open_catalog

    db = open_catalog()
    ds = datasets.get(db, "logs")
    version = datasets.versions(db, ds.id)[0]
    assert all(name.startswith(version.shard_prefix) for name in _dataset_files(airlock_home, ds.id))
    assert not list((airlock_home / "vault" / "objects").glob("ds-fresh-*/*"))
    states = [j["state"] for j in json.loads(run_cli("jobs", "list", "--json").stdout)["jobs"]]
    assert states.count("interrupted") == 2


def test_cli_import_report_export_delete(vault_init, unlock, airlock_home: Path, tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in" / "qa.jsonl", 0, 40, bad_lines=1).parent
    vault_init()
    locked = run_cli("data", "import", str(src), "--name", "qa")
    assert locked.returncode == 2 and "vault is locked" in locked.stderr and "Traceback" not in locked.stderr

    dry = run_cli("data", "import", str(src), "--name", "qa", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    assert json.loads(dry.stdout)["report"]["records"]["imported"] == 40
    assert json.loads(run_cli("data", "list", "--json").stdout)["datasets"] == []

    unlock()
    done = run_cli("data", "import", str(src), "--name", "qa")
    assert done.returncode == 0, done.stderr
    assert "created dataset 'qa': version 1, 40 new records" in done.stdout
    assert "line 41: invalid JSON" in done.stdout

    report = json.loads(run_cli("data", "report", "qa", "--json").stdout)
    assert report["version"] == 1 and report["report"]["files"][0]["rejected"] == 1
    show = json.loads(run_cli("data", "show", "qa", "--json").stdout)
    assert sum(show["split_counts"].values()) == 40 and show["versions"][0]["records_added"] == 40

    out = tmp_path / "export"
    exported = run_cli("data", "export", "qa", "--out", str(out), "--split", "train")
    assert exported.returncode == 0, exported.stderr
    assert [p.name for p in out.iterdir()] == ["train.jsonl"]

    refused = run_cli("data", "delete", "qa")  # no terminal to type the name into: nothing is deleted
    assert refused.returncode != 0
    assert run_cli("data", "delete", "qa", "--yes").returncode == 0
    assert json.loads(run_cli("data", "list", "--json").stdout)["datasets"] == []
    actions = [e["action"] for e in json.loads(run_cli("audit", "show", "--action", "data.", "--json").stdout)
               ["entries"]]
    assert actions == ["data.delete", "data.export", "data.import", "data.create"]


def test_a_link_to_a_secret_outside_the_root_never_reaches_the_store(vault, tmp_path: Path) -> None:
    """Attack (issue 20, item 6): a stick carries `x.txt -> a file outside the import root`."""
    db, keys, home = vault
    secret = b"SECRET-TLS-KEY-7f3a9c outside the import root"
    outside = tmp_path / "etc-ssl-private" / "tls.key"
    outside.parent.mkdir()
    outside.write_bytes(secret + b"\n")
    src = write_jsonl(tmp_path / "stick" / "qa.jsonl", 0, 5)
    os.symlink(outside, src.parent / "x.txt")
    os.symlink(outside.parent, src.parent / "more")
    result = _import(vault, src.parent)
    files = {f.rel: f for f in result.report.files}
    assert (files["x.txt"].bucket, files["more"].bucket) == ("rejected", "rejected")
    assert "symbolic link, not followed" in files["x.txt"].reason
    assert result.report.records_imported == 5
    stored = list(iter_records(db, keys, home, datasets.get(db, "logs")))
    assert all(b"SECRET-TLS-KEY" not in json.dumps(r.json()).encode() for r in stored) and len(stored) == 5
    assert files_holding(home, b"SECRET-TLS-KEY") == []  # nor in the catalog, the report or any file under the home
