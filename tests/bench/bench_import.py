"""Data import speed, as ratios measured in one run (never fails on time).

    .venv/bin/python tests/bench/bench_import.py

1. Text: records/s and MB/s of `import_dataset` (walk, parse, clean, dedup incl. MinHash, split,
   encrypt into vault shards, commit), and the ratio of its time to the same pipeline writing the
   same shards as plaintext files (fsynced) and the same catalog rows. Goal: <= 1.10x.
2. DICOM: files/s importing synthetic studies (read, de-identify, decode, resize, encrypt).
"""

from __future__ import annotations

import json
import os
import random
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

RECORDS = 20_000
FILES = 20
DICOM_FILES = 200
ROUNDS = 3
REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def _corpus(folder: Path) -> int:
    rng = random.Random(7)
    words = [f"{w}{i}" for i in range(400) for w in ("valve", "seal", "pump", "press", "torque", "line")]
    size = 0
    for f in range(FILES):
        with (folder / f"part{f:02d}.jsonl").open("w") as fh:
            for i in range(RECORDS // FILES):
                n = int(min(600, rng.lognormvariate(4.2, 0.6)))  # words per answer: a long tail, like reports
                record = {"instruction": f"Case {f}-{i}: " + " ".join(rng.choices(words, k=12)),
                          "output": " ".join(rng.choices(words, k=n))}
                line = json.dumps(record) + "\n"
                size += len(line)
                fh.write(line)
    return size


def _vault(home: Path):
    os.environ["AIRLOCK_HOME"] = str(home)
    os.environ["AIRLOCK_KDF_PROFILE"] = "test"  # unlock cost is bench_vault's business, not this one's
    from appliance.catalog import open_catalog
    from appliance.vault.keys import LocalKeys
    from appliance.vault.keyslots import passphrase_kdf
    from appliance.vault.lifecycle import Credential, init_vault, open_root

    home.mkdir(mode=0o700)
    db = open_catalog(home)
    init_vault(db, "bench passphrase", passphrase_kdf())
    _, root = open_root(db, Credential.passphrase("bench passphrase"))
    return db, LocalKeys(root)


def _plain_import(src: Path, out: Path) -> int:
    """The same pipeline and shard framing, written as plaintext files plus the same catalog rows."""
    from appliance.data.pipeline import ImportOptions, run_import
    from appliance.data.store import _ShardWriter

    out.mkdir()

    def write(name: str, data: bytes) -> None:
        with open(out / name, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())

    writer = _ShardWriter(write, "plain", 1)
    report = run_import(src, ImportOptions(), secret=b"s" * 32, split_seed="seed", sink=writer.add)
    writer.flush()
    conn = sqlite3.connect(out / "rows.db", isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("CREATE TABLE r (h TEXT PRIMARY KEY, v INT, s TEXT, sh INT, p INT, g TEXT, l TEXT, m BLOB)")
    conn.execute("BEGIN")
    conn.executemany("INSERT INTO r VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                     [(r.content_hash, r.version, r.split, r.shard, r.position, r.group_key, r.label, r.minhash)
                      for r in writer.rows])
    conn.execute("COMMIT")
    conn.close()
    return report.records_imported


def main() -> None:
    from appliance.data.pipeline import ImportOptions
    from appliance.data.store import import_dataset

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        src = root / "src"
        src.mkdir()
        size = _corpus(src)
        db, keys = _vault(root / "home")
        vault_times, plain_times = [], []
        imported = 0
        for r in range(ROUNDS):
            started = time.perf_counter()
            imported = _plain_import(src, root / f"plain{r}")
            plain_times.append(time.perf_counter() - started)
            started = time.perf_counter()
            result = import_dataset(db, root / "home", keys, src, f"bench{r}", ImportOptions(), job_id=f"bench-{r}")
            vault_times.append(time.perf_counter() - started)
            assert result.report.records_imported == imported
        vault_s, plain_s = min(vault_times), min(plain_times)
        print(f"text import: {imported} records, {size / 2**20:.1f} MiB in {vault_s:.2f} s: "
              f"{imported / vault_s:,.0f} records/s, {size / 2**20 / vault_s:.1f} MiB/s")
        print(f"encrypted store vs plaintext files, same pipeline: {vault_s / plain_s:.3f}x (goal <= 1.10x)")
        _bench_dicom(root, db, keys)


def _bench_dicom(root: Path, db, keys) -> None:
    try:
        from tests.appliance.data.dicom_samples import write_phantom_studies
    except ImportError:
        print("dicom import: skipped (tests/appliance/data/dicom_samples.py has no write_phantom_studies)")
        return
    from appliance.data.pipeline import ImportOptions
    from appliance.data.store import import_dataset

    folder = root / "dicom"
    write_phantom_studies(folder, DICOM_FILES)
    files = sum(1 for p in folder.rglob("*") if p.is_file())
    started = time.perf_counter()
    result = import_dataset(db, root / "home", keys, folder, "bench-dicom", ImportOptions(fmt="dicom"),
                            job_id="bench-dicom")
    elapsed = time.perf_counter() - started
    print(f"dicom import: {files} files ({result.report.records_imported} imported) in {elapsed:.2f} s: "
          f"{files / elapsed:,.1f} files/s")


if __name__ == "__main__":
    main()
