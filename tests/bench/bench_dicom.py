"""DICOM conformance bench: pydicom's test corpus through the import, per transfer syntax.

    .venv/bin/python tests/bench/bench_dicom.py [--accept-burned-in] [--frames middle|each|stack:N]

Imports every file of `pydicom.data.get_testdata_files()` (pydicom's own files and the
`pydicom-data` package, a dev dependency) with `run_import` (read, check, decode, quarantine,
dedup, de-identify; nothing stored) and prints, per transfer syntax: files, imported, duplicate,
quarantined, rejected, then every distinct rejection reason with its count, and files/s and MB/s
of the whole run. Exits 1 when a rejection says a decoder is missing (the acceptance criterion of
the decoder stack); never fails on time.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accept-burned-in", action="store_true", help="import what would be quarantined")
    parser.add_argument("--frames", default="middle", help="the import's frame rule (default: middle)")
    args = parser.parse_args(argv)

    from appliance.data.dicom_files import quiet_pydicom
    from appliance.data.dicom_pixels import MISSING_DECODER
    from appliance.data.pipeline import ImportOptions, run_import
    from tests.appliance.data.dicom_corpus import link_corpus, transfer_syntax

    with tempfile.TemporaryDirectory(prefix="bench-dicom-") as tmp:
        root = Path(tmp) / "corpus"
        files = link_corpus(root)
        size = sum(path.stat().st_size for path in files.values())
        options = ImportOptions(fmt="dicom", accept_burned_in=args.accept_burned_in, frames=args.frames)
        records = [0]

        def sink(_record) -> None:
            records[0] += 1

        started = time.perf_counter()
        report = run_import(root, options, secret=b"bench-dicom-site-secret-0123456", split_seed="bench", sink=sink)
        elapsed = time.perf_counter() - started
        with quiet_pydicom():
            syntax = {rel: transfer_syntax(path, keyword=True) for rel, path in files.items()}

    rows: dict[str, Counter[str]] = defaultdict(Counter)
    reasons: dict[str, Counter[str]] = defaultdict(Counter)
    for outcome in report.files:
        name = syntax[outcome.rel]
        rows[name]["files"] += 1
        rows[name][outcome.bucket] += 1
        if outcome.bucket == "rejected":
            reasons[name][outcome.reason] += 1
    columns = ("files", "imported", "duplicate", "quarantined", "rejected")
    width = max(len(name) for name in rows)
    print(f"pydicom test corpus: {len(files)} files, {size / 1e6:.1f} MB; frames={options.frames}, "
          f"accept_burned_in={options.accept_burned_in}")
    print(f"{'transfer syntax':<{width}}  " + "  ".join(f"{c:>11}" for c in columns))
    for name in sorted(rows, key=lambda n: (-rows[n]["files"], n)):
        print(f"{name:<{width}}  " + "  ".join(f"{rows[name][c]:>11}" for c in columns))
    total = Counter()
    for row in rows.values():
        total.update(row)
    print(f"{'total':<{width}}  " + "  ".join(f"{total[c]:>11}" for c in columns))
    print(f"records: {records[0]}")
    print("\nrejections, per transfer syntax and reason:")
    for name in sorted(reasons):
        for reason, count in reasons[name].most_common():
            print(f"  {name}: {count} x {reason}")
    print(f"\n{len(files) / elapsed:.1f} files/s, {size / 1e6 / elapsed:.1f} MB/s ({elapsed:.1f} s)")
    missing = sum(count for by_reason in reasons.values() for reason, count in by_reason.items()
                  if MISSING_DECODER in reason)
    if missing:
        print(f"FAIL: {missing} files rejected for a missing decoder")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
