"""Audit chain cost, as ratios measured in one run (never fails on time).

    .venv/bin/python tests/bench/bench_audit.py

1. append: audited rows (hash chain, one transaction each) vs plain INSERTs of the same rows
   in the same catalog settings (WAL, synchronous=FULL, one transaction each). Goal: >= 0.8x.
2. verify: walking and re-hashing the chain vs hashing the same rows' bytes with no SQLite.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from pathlib import Path

ROWS = 2000


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["AIRLOCK_HOME"] = str(Path(tmp) / "home")
        from appliance.audit import append_audit, canonical_json, verify_chain
        from appliance.catalog import open_catalog, transaction

        db = open_catalog()
        db.execute("CREATE TABLE plain_log (seq INTEGER PRIMARY KEY, action TEXT, object TEXT, details TEXT)")
        details = [{"run": f"run-{i}", "step": i, "loss": 1.0 / (i + 1)} for i in range(ROWS)]

        started = time.perf_counter()
        for i, d in enumerate(details):
            with transaction(db):
                db.execute("INSERT INTO plain_log VALUES (?, ?, ?, ?)", [i + 1, "bench.event", "x", canonical_json(d)])
        plain = time.perf_counter() - started

        started = time.perf_counter()
        for d in details:
            append_audit(db, "bench.event", "x", d)
        audited = time.perf_counter() - started

        started = time.perf_counter()
        report = verify_chain(db)
        verify = time.perf_counter() - started
        assert report.ok

        payloads = [row[0].encode() for row in db.execute("SELECT details FROM audit_log")]
        started = time.perf_counter()
        for payload in payloads:
            hashlib.sha256(payload).digest()
        raw_hash = time.perf_counter() - started

    print(f"append: {ROWS / audited:,.0f} audited rows/s vs {ROWS / plain:,.0f} plain rows/s "
          f"-> ratio {plain / audited:.2f}x (goal >= 0.80x)")
    print(f"verify: {ROWS / verify:,.0f} rows/s; raw sha256 of the same payloads {ROWS / raw_hash:,.0f} rows/s "
          f"-> ratio {raw_hash / verify:.3f}x (the rest is SQLite reads and JSON canonicalisation)")


if __name__ == "__main__":
    main()
