"""The text import end to end, without storage: every file in exactly one bucket, counts that add
up, bad inputs rejected with one line that names the place and never the contents."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import tracemalloc
from pathlib import Path

import pytest

from appliance.data.clean import CleanOptions
from appliance.data.errors import DataError
from appliance.data.formats import ParseOptions, parse_csv_columns
from appliance.data.pipeline import AcceptedRecord, ImportOptions, Progress, plan_inputs, run_import
from appliance.data.report import MAX_ISSUES_PER_FILE, ImportReport
from appliance.data.walk import SYMLINK_REASON, walk_inputs

MiB = 1024 * 1024


def run(root: Path, **options) -> tuple[ImportReport, list[AcceptedRecord]]:
    records: list[AcceptedRecord] = []
    report = run_import(root, ImportOptions(**options), secret=b"x" * 32, split_seed="seed", sink=records.append)
    assert_accounted(root, report, records)
    return report, records


def assert_accounted(root: Path, report: ImportReport, records: list[AcceptedRecord]) -> None:
    """Every listed file is in the report once, in one bucket; every record read has one fate."""
    assert [f.rel for f in report.files] == [f.rel for f in walk_inputs(root)]
    assert sum(report.buckets.values()) == len(report.files) == report.summary()["files_read"]
    for f in report.files:
        assert f.records_read == f.imported + f.duplicates + f.cleaned_empty + f.rejected, f
        assert (f.bucket == "imported") == (f.imported > 0), f
        assert f.bucket == "imported" or f.reason, f
    assert report.records_imported == len(records) == sum(report.splits.values())


def by_name(report: ImportReport) -> dict[str, object]:
    return {f.rel: f for f in report.files}


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def jsonl(*objects: object) -> str:
    return "".join(json.dumps(o, ensure_ascii=False) + "\n" for o in objects)


# --- a realistic folder --------------------------------------------------------------------------

def test_a_mixed_folder_lands_every_file_in_one_bucket(tmp_path: Path):
    root = tmp_path / "stick"
    write(root / "alpaca.jsonl", jsonl({"instruction": "Torque for M8?", "input": "", "output": "25 Nm"},
                                       {"instruction": "Torque for M10?", "output": "49 Nm"}))
    write(root / "chat/sharegpt.json", json.dumps([{"conversations": [
        {"from": "human", "value": "Which line?"}, {"from": "gpt", "value": "Line 2"}]}]))
    write(root / "chat/openai.jsonl", jsonl({"messages": [{"role": "user", "content": "Pump noise?"},
                                                          {"role": "assistant", "content": "Check bearing."}]}))
    write(root / "pc.jsonl", jsonl({"prompt": "Filter change interval?", "completion": "500 h"}))
    write(root / "faq.csv", "Question;Answer\nOil grade?;ISO VG 46\n")
    write(root / "notes/shift.txt", "Shift log: replaced seal on press 4.\n")
    write(root / "z-again.jsonl", jsonl({"prompt": "Filter change interval?", "completion": "500 h"}))
    write(root / "blank.jsonl", "\n\n  \n")
    write(root / "html-only.jsonl", jsonl({"text": "<br><p></p>"}))
    write(root / "empty.txt", "")
    write(root / "manual.docx", b"PK\x03\x04")
    write(root / ".DS_Store", b"\0\0\0\1Bud1")
    write(root / "__MACOSX/._faq.csv", b"\0\5\26\7")
    os.symlink("nowhere.jsonl", root / "dangling.jsonl")

    report, records = run(root)
    files = by_name(report)
    assert {rel: f.bucket for rel, f in files.items()} == {
        ".DS_Store": "rejected", "__MACOSX/._faq.csv": "rejected", "z-again.jsonl": "duplicate",
        "alpaca.jsonl": "imported", "blank.jsonl": "cleaned-empty", "chat/openai.jsonl": "imported",
        "chat/sharegpt.json": "imported", "dangling.jsonl": "rejected", "empty.txt": "rejected",
        "faq.csv": "imported", "html-only.jsonl": "cleaned-empty", "manual.docx": "rejected",
        "notes/shift.txt": "imported", "pc.jsonl": "imported"}
    assert report.buckets == {"imported": 6, "duplicate": 1, "cleaned-empty": 2, "quarantined": 0, "rejected": 5}
    assert files["empty.txt"].reason == "the file is empty"
    assert files["manual.docx"].reason.startswith("unsupported file type '.docx'")
    assert files[".DS_Store"].reason == "operating-system metadata, not data"
    assert files["dangling.jsonl"].reason == SYMLINK_REASON

    payloads = [json.loads(r.payload) for r in records]
    assert len(records) == 7 and {r.kind for r in records} == {"text"} and report.kind == "text"
    assert {"text": "Shift log: replaced seal on press 4.", "source_format": "text"} in payloads
    assert {"messages": [{"role": "user", "content": "Oil grade?"}, {"role": "assistant", "content": "ISO VG 46"}],
            "source_format": "prompt_completion"} in payloads
    assert sorted(p["source_format"] for p in payloads) == [
        "alpaca", "alpaca", "messages", "prompt_completion", "prompt_completion", "sharegpt", "text"]
    assert [r.file_no for r in records] == sorted(r.file_no for r in records)


def test_invalid_json_lines_are_rejected_by_line_number_and_the_rest_imports(tmp_path: Path):
    good = [json.dumps({"text": f"valid record {i}"}) for i in range(3)]
    write(tmp_path / "in/data.jsonl", f"{good[0]}\n{{broken\n{good[1]}\n[1, 2]\n{good[2]}\n")
    write(tmp_path / "in/all-bad.jsonl", "{nope\n{still nope\n")
    report, records = run(tmp_path / "in")
    data, bad = by_name(report)["data.jsonl"], by_name(report)["all-bad.jsonl"]
    assert (data.bucket, data.imported, data.rejected) == ("imported", 3, 2)
    assert [i.where for i in data.issues] == ["line 2", "line 4"]
    assert data.issues[0].reason.startswith("invalid JSON (")
    assert data.issues[1].reason.startswith("not a JSON object; expected one of: instruction+output (alpaca)")
    assert bad.bucket == "rejected"
    assert bad.reason.startswith("no record imported: 2 rejected (first: line 1: invalid JSON")
    assert len(records) == 3


def test_issues_per_file_are_capped_but_all_counted(tmp_path: Path):
    write(tmp_path / "in/many.jsonl", "{x\n" * 30 + jsonl({"text": "one good record"}))
    report, _ = run(tmp_path / "in")
    [f] = report.files
    assert f.rejected == 30 and f.imported == 1 and len(f.issues) == MAX_ISSUES_PER_FILE


def test_mostly_invalid_file_is_rejected_not_reported_as_empty(tmp_path: Path):
    write(tmp_path / "in/a.jsonl", jsonl({"text": "   "}) + "{bad\n{bad\n{bad\n")
    report, _ = run(tmp_path / "in")
    [f] = report.files
    assert f.bucket == "rejected" and f.cleaned_empty == 1 and f.rejected == 3
    assert "3 rejected (first: line 2" in f.reason and "1 empty after cleaning" in f.reason


# --- encodings -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("encoding", "text"), [("gbk", "更换二号线的止回阀"), ("latin-1", "Rückschlagventil prüfen")])
def test_wrong_encoding_is_rejected_with_a_hint_and_imports_when_named(tmp_path: Path, encoding, text):
    write(tmp_path / "in/notes.jsonl", jsonl({"prompt": "Was tun?", "completion": text}).encode(encoding))
    write(tmp_path / "in/notes.txt", text.encode(encoding))
    report, records = run(tmp_path / "in")
    assert report.buckets["rejected"] == 2 and not records
    for f in report.files:
        assert "not valid utf-8" in f.reason and "--encoding gbk / latin-1" in f.reason

    report, records = run(tmp_path / "in", parse=ParseOptions(encoding=encoding))
    assert report.buckets["imported"] == 2
    contents = sorted(json.loads(r.payload).get("text") or json.loads(r.payload)["messages"][1]["content"]
                      for r in records)
    assert contents == [text, text]


# --- a 200 MB single line ------------------------------------------------------------------------

def write_huge(path: Path, head: bytes, tail: bytes, size: int = 200 * MiB) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    chunk = b"a" * MiB
    with path.open("wb") as fh:
        fh.write(head)
        for _ in range(size // MiB):
            fh.write(chunk)
        fh.write(tail)
    return path


@pytest.mark.parametrize(("name", "head", "tail", "txt_split", "bucket", "expected"), [
    ("huge.jsonl", b'{"text": "before"}\n{"text": "', b'"}\n{"text": "after"}\n', "file", "imported",
     ("line 2", "longer than the 16 MiB record limit")),
    ("huge.csv", b"text\nbefore\n", b"\nafter\n", "file", "imported", ("row 3", "longer than the 16 MiB record limit")),
    ("huge.txt", b"before\n\n", b"\n\nafter\n", "blocks", "imported",
     ("block 2 (line 3)", "longer than the 16 MiB record limit")),
    ("huge.txt", b"", b"", "file", "rejected", "larger than the 16 MiB document limit"),
    ("huge.json", b'[{"text": "', b'"}]', "file", "rejected", "too big to load whole; convert it to JSONL"),
])
def test_a_200_mb_line_is_rejected_as_too_long_in_flat_memory(tmp_path: Path, name, head, tail, txt_split, bucket,
                                                               expected):
    root = tmp_path / "in"
    huge = write_huge(root / name, head, tail)
    try:
        tracemalloc.start()
        report, records = run(root, parse=ParseOptions(txt_split=txt_split))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        huge.unlink()
    assert peak < 64 * MiB, f"peak {peak / MiB:.0f} MiB for a {huge.name}"
    [f] = report.files
    assert f.bucket == bucket
    if bucket == "imported":
        assert f.imported == 2 and f.rejected == 1
        assert (f.issues[0].where, f.issues[0].reason.split(";")[0]) == expected
        assert sorted(json.loads(r.payload)["text"] for r in records) == ["after", "before"]
    else:
        assert expected in f.reason


# --- CSV -----------------------------------------------------------------------------------------

def test_csv_column_mapping_and_missing_columns(tmp_path: Path):
    write(tmp_path / "in/ok.csv", "Frage;Antwort\nWie fest?;35 Nm\n")
    write(tmp_path / "in/wrong.csv", "Question;Reply\nWie fest?;35 Nm\n")
    options = ParseOptions(csv_columns=parse_csv_columns("prompt=Frage,completion=Antwort"))
    report, records = run(tmp_path / "in", parse=options)
    ok, wrong = by_name(report)["ok.csv"], by_name(report)["wrong.csv"]
    assert ok.bucket == "imported"
    assert json.loads(records[0].payload)["messages"] == [{"role": "user", "content": "Wie fest?"},
                                                          {"role": "assistant", "content": "35 Nm"}]
    assert wrong.bucket == "rejected"
    assert wrong.reason == ("--columns expects the column(s) 'Frage', 'Antwort', which the header row (2 columns) "
                            "does not have; check the names and the delimiter")


def test_csv_without_a_known_header_asks_for_columns(tmp_path: Path):
    write(tmp_path / "in/data.csv", "a,b,c\n1,2,3\n")
    report, _ = run(tmp_path / "in")
    assert report.files[0].bucket == "rejected"
    assert "pass --columns prompt=COL,completion=COL" in report.files[0].reason


# --- files that cannot be read -------------------------------------------------------------------

def test_symlink_loops_and_dangling_links_are_rejected_and_counted(tmp_path: Path):
    root = tmp_path / "in"
    write(root / "sub/a.jsonl", jsonl({"text": "a record"}))
    os.symlink("..", root / "sub" / "parent")
    os.symlink("missing.txt", root / "gone.txt")
    os.symlink("self.txt", root / "self.txt")
    report, records = run(root)
    files = by_name(report)
    assert files["sub/a.jsonl"].bucket == "imported" and len(records) == 1
    assert files["sub/parent"].reason == files["gone.txt"].reason == files["self.txt"].reason == SYMLINK_REASON


def test_a_file_replaced_by_a_link_after_listing_is_not_followed(tmp_path: Path):
    root = tmp_path / "in"
    write(root / "a.jsonl", jsonl({"text": "kept"}))
    write(root / "b.jsonl", jsonl({"text": "listed as a file"}))
    outside = write(tmp_path / "outside.jsonl", jsonl({"text": "SECRET-OUTSIDE-THE-ROOT"}))
    plan = plan_inputs(root, "auto")
    (root / "b.jsonl").unlink()
    os.symlink(outside, root / "b.jsonl")  # swapped in between listing and reading
    records: list[AcceptedRecord] = []
    report = run_import(root, ImportOptions(), secret=b"x" * 32, split_seed="seed", plan=plan, sink=records.append)
    assert (report.files[1].bucket, report.files[1].reason) == ("rejected", SYMLINK_REASON)
    assert b"SECRET-OUTSIDE" not in b"".join(r.payload.encode() if isinstance(r.payload, str) else r.payload
                                             for r in records)


def test_a_file_gone_between_listing_and_reading_is_rejected(tmp_path: Path):
    root = tmp_path / "in"
    write(root / "a.jsonl", jsonl({"text": "kept"}))
    write(root / "b.jsonl", jsonl({"text": "pulled out"}))
    plan = plan_inputs(root, "auto")
    (root / "b.jsonl").unlink()  # the USB stick was pulled, or another program moved it
    report = run_import(root, ImportOptions(), secret=b"x" * 32, split_seed="seed", plan=plan)
    assert report.files[1].bucket == "rejected"
    assert report.files[1].reason == "cannot read (no such file or directory)"
    assert report.files[0].bucket == "imported"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode (test_walk drops privileges)")
def test_unreadable_files_are_rejected(tmp_path: Path):
    path = write(tmp_path / "in/locked.jsonl", jsonl({"text": "x"}))
    path.chmod(0)
    report, _ = run(tmp_path / "in")
    assert report.files[0].bucket == "rejected" and "permission denied" in report.files[0].reason


def test_missing_import_path_and_mixed_kinds_stop_before_reading(tmp_path: Path):
    with pytest.raises(DataError, match="import path does not exist") as info:
        run_import(tmp_path / "nope", ImportOptions(), secret=b"x" * 32, split_seed="seed")
    assert "USB stick is mounted" in info.value.hint
    write(tmp_path / "mixed/a.jsonl", jsonl({"text": "x"}))
    write(tmp_path / "mixed/b.png", b"\x89PNG\r\n\x1a\n")
    with pytest.raises(DataError, match=r"mixes kinds of data \(1 images, 1 text\)"):
        plan_inputs(tmp_path / "mixed", "auto")


def test_a_forced_format_reads_every_file_with_it(tmp_path: Path):
    write(tmp_path / "in/records.log", jsonl({"text": "log line as JSON"}))
    report, records = run(tmp_path / "in", fmt="jsonl")
    assert report.files[0].fmt == "jsonl" and json.loads(records[0].payload)["text"] == "log line as JSON"


# --- scale and progress --------------------------------------------------------------------------

def test_ten_thousand_small_files_are_all_accounted_for_with_progress(tmp_path: Path):
    root = tmp_path / "many"
    for folder in range(10):
        (root / f"d{folder}").mkdir(parents=True)
    for i in range(10_000):
        digest = hashlib.sha256(str(i).encode()).hexdigest()
        (root / f"d{i % 10}" / f"{i:05}.jsonl").write_text(f'{{"text": "record {i} {digest}"}}\n', encoding="utf-8")
    seen: list[Progress] = []
    records: list[AcceptedRecord] = []
    report = run_import(root, ImportOptions(), secret=b"x" * 32, split_seed="seed", sink=records.append,
                        progress=seen.append)
    assert_accounted(root, report, records)
    assert report.buckets["imported"] == 10_000 and len(records) == 10_000
    assert [p.files_done for p in seen] == list(range(1, 10_001))
    assert {p.files_total for p in seen} == {10_000}
    assert all(a.bytes_done <= b.bytes_done and a.records_imported <= b.records_imported
               for a, b in itertools.pairwise(seen))
    assert seen[-1].bytes_done == seen[-1].bytes_total and seen[-1].records_imported == 10_000
    assert seen[-1].eta_s == 0.0


# --- no record contents in any message -----------------------------------------------------------

MARKER = "ZZ-SECRET-7f3a"


def test_no_message_ever_quotes_record_contents(tmp_path: Path):
    root = tmp_path / "in"
    write(root / "bad.jsonl", "\n".join([
        f'{{"text": "{MARKER}',                                                          # invalid JSON
        json.dumps(f"{MARKER}"),                                                         # not an object
        json.dumps({MARKER: 1}),                                                         # no known field
        json.dumps({"text": MARKER, "instruction": MARKER, "output": MARKER}),           # ambiguous
        json.dumps({"text": [MARKER]}),                                                  # wrong type
        json.dumps({"messages": [{"role": MARKER, "content": MARKER}]}),                 # unknown role
        json.dumps({"messages": [{"role": "user", "content": MARKER}]}),                 # no assistant
        json.dumps({"conversations": [{"from": MARKER, "value": MARKER}]}),              # unknown from
        json.dumps({"conversations": [{"from": "human", "value": {MARKER: MARKER}}]}),   # value not text
        json.dumps({"text": MARKER * 400}),                                              # over --max-record-mb
        json.dumps({"text": MARKER * 40}),                                               # over --max-chars
        json.dumps({"text": f"a good record that mentions {MARKER}"}),
    ]) + "\n")
    write(root / "bad.json", f'[{{"text": "{MARKER}"')
    write(root / "noheader.csv", f"{MARKER},{MARKER}\n{MARKER},{MARKER}\n")
    write(root / "short.csv", f"prompt,completion\n{MARKER}\n")
    write(root / "latin.txt", f"{MARKER} Prüfung".encode("latin-1"))
    write(root / "blocks.txt", f"{MARKER}\n\n" + MARKER * 400 + "\n")
    options = {"parse": ParseOptions(max_record_bytes=4096, txt_split="blocks"), "clean": CleanOptions(max_chars=500)}
    report, records = run(root, **options)
    assert sum(f.rejected for f in report.files) == 13  # each bad record above was really read and refused
    assert report.buckets["rejected"] == 4 and len(records) == 2
    assert MARKER not in json.dumps(report.to_dict(), ensure_ascii=False)
    assert all(MARKER.encode() in r.payload for r in records)  # the marker was there to leak

    write(root / "mapped.csv", f"{MARKER},x\n1,2\n")
    mapped, _ = run(root, parse=ParseOptions(csv_columns=parse_csv_columns("prompt=Frage,completion=Antwort")))
    assert by_name(mapped)["mapped.csv"].bucket == "rejected"
    assert MARKER not in json.dumps(mapped.to_dict(), ensure_ascii=False)
