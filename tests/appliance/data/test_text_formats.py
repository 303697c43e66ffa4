"""Text formats: shape detection, JSONL/JSON/CSV/TXT parsing, encodings, bounded line reading."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from appliance.data.errors import FileRejected
from appliance.data.formats import (
    ParseOptions,
    RecordProblem,
    TextRecord,
    check_encoding,
    detect_format,
    iter_text_records,
    parse_csv_columns,
    record_from_object,
)


def parse(path: Path, fmt: str, **options) -> list[TextRecord | RecordProblem]:
    return list(iter_text_records(path, fmt, ParseOptions(**options)))


def write_jsonl(path: Path, *objects: object) -> Path:
    path.write_text("".join(json.dumps(o, ensure_ascii=False) + "\n" for o in objects), encoding="utf-8")
    return path


# --- record shapes -------------------------------------------------------------------------------

@pytest.mark.parametrize(("obj", "shape", "messages"), [
    ({"instruction": "Sum 2 and 3", "input": "", "output": "5"}, "alpaca",
     (("user", "Sum 2 and 3"), ("assistant", "5"))),
    ({"instruction": "Translate", "input": "Hallo", "output": "Hello"}, "alpaca",
     (("user", "Translate\n\nHallo"), ("assistant", "Hello"))),
    ({"instruction": "Q", "output": "A", "system": "Be brief"}, "alpaca",
     (("system", "Be brief"), ("user", "Q"), ("assistant", "A"))),
    ({"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Hi"},
                        {"from": "gpt", "value": "Hello"}]}, "sharegpt",
     (("system", "S"), ("user", "Hi"), ("assistant", "Hello"))),
    ({"messages": [{"role": "developer", "content": "D"}, {"role": "user", "content": "Hi"},
                   {"role": "assistant", "content": [{"type": "text", "text": "a"}, {"type": "image_url"},
                                                     {"type": "text", "text": "b"}]}]}, "messages",
     (("system", "D"), ("user", "Hi"), ("assistant", "a\nb"))),
    ({"prompt": "torque?", "completion": 35}, "prompt_completion", (("user", "torque?"), ("assistant", "35"))),
    ({"text": "free text", "meta": {"source": "x"}}, "text", (("text", "free text"),)),
])
def test_each_record_shape_becomes_role_content_messages(obj, shape, messages):
    record = record_from_object(obj, "line 1")
    assert record == TextRecord("line 1", shape, messages)


def test_a_record_with_two_shapes_is_ambiguous_and_names_both():
    problem = record_from_object({"instruction": "a", "output": "b", "text": "c"}, "line 4")
    assert isinstance(problem, RecordProblem)
    assert problem.where == "line 4"
    assert "ambiguous" in problem.reason and "alpaca" in problem.reason and "text" in problem.reason


@pytest.mark.parametrize(("obj", "expected"), [
    (["a", "list"], "not a JSON object"),
    ({"question": "q"}, "no known fields"),
    ({"text": None}, "'text' is null"),
    ({"prompt": "p", "completion": True}, "'completion' is a boolean"),
    ({"instruction": {"x": 1}, "output": "o"}, "'instruction' is an object"),
    ({"messages": []}, "non-empty list"),
    ({"messages": [{"role": "user"}]}, "message 1 needs 'role' and 'content'"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "unknown role"),
    ({"messages": [{"role": "user", "content": "only a question"}]}, "no assistant turn"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": None}]},
                   {"role": "assistant", "content": "x"}]}, "messages[1].content.text"),
    ({"conversations": [{"from": "alien", "value": "x"}]}, "unknown 'from'"),
    ({"conversations": [{"from": "human", "value": "x"}]}, "no assistant turn"),
])
def test_malformed_records_become_problems_with_a_reason(obj, expected):
    problem = record_from_object(obj, "item 2")
    assert isinstance(problem, RecordProblem)
    assert problem.where == "item 2"
    assert expected in problem.reason


# --- JSONL and JSON ------------------------------------------------------------------------------

def test_jsonl_invalid_lines_are_named_by_number_and_the_others_still_parse(tmp_path: Path):
    path = tmp_path / "mixed.jsonl"
    path.write_text('{"text": "one"}\n{"text": "two"\n\n   \n{"text": "five"}\nnot json\n', encoding="utf-8")
    out = parse(path, "jsonl")
    assert [type(o).__name__ for o in out] == ["TextRecord", "RecordProblem", "TextRecord", "RecordProblem"]
    assert out[1].where == "line 2" and out[1].reason.startswith("invalid JSON")
    assert out[2].where == "line 5" and out[2].messages == (("text", "five"),)
    assert out[3].where == "line 6"


def test_jsonl_with_bom_and_crlf_line_endings(tmp_path: Path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "a"}\r\n{"text": "b"}\r\n')
    assert [r.messages[0][1] for r in parse(path, "jsonl")] == ["a", "b"]


def test_jsonl_line_over_the_record_limit_is_skipped_and_reading_goes_on(tmp_path: Path):
    path = tmp_path / "long.jsonl"
    path.write_text('{"text": "' + "x" * 5000 + '"}\n{"text": "short"}\n', encoding="utf-8")
    out = parse(path, "jsonl", max_record_bytes=1024)
    assert out[0] == RecordProblem("line 1", out[0].reason)
    assert "longer than the 1024 bytes record limit" in out[0].reason
    assert out[1].messages == (("text", "short"),)


def test_jsonl_deeply_nested_line_is_a_problem_not_a_crash(tmp_path: Path):
    path = tmp_path / "deep.jsonl"
    path.write_text("[" * 100_000 + "]" * 100_000 + "\n", encoding="utf-8")
    [problem] = parse(path, "jsonl")
    assert isinstance(problem, RecordProblem) and "nested too deeply" in problem.reason


def test_json_array_wrapper_and_single_object(tmp_path: Path):
    array = tmp_path / "a.json"
    array.write_text(json.dumps([{"text": "one"}, 7, {"prompt": "p", "completion": "c"}]), encoding="utf-8")
    out = parse(array, "json")
    assert [o.where for o in out] == ["item 1", "item 2", "item 3"]
    assert isinstance(out[1], RecordProblem)

    wrapped = tmp_path / "w.json"
    wrapped.write_text(json.dumps({"version": 2, "data": [{"text": "x"}]}), encoding="utf-8")
    assert parse(wrapped, "json") == [TextRecord("data item 1", "text", (("text", "x"),))]

    single = tmp_path / "s.json"
    single.write_text(json.dumps({"text": "solo"}, indent=2), encoding="utf-8")
    assert parse(single, "json") == [TextRecord("record 1", "text", (("text", "solo"),))]


def test_json_lines_saved_as_dot_json_are_read_as_lines(tmp_path: Path):
    path = write_jsonl(tmp_path / "export.json", {"text": "a"}, {"text": "b"})
    assert [o.where for o in parse(path, "json")] == ["line 1", "line 2"]


def test_invalid_and_oversized_json_files_are_rejected_whole(tmp_path: Path):
    broken = tmp_path / "broken.json"
    broken.write_text('[{"text": "a"},', encoding="utf-8")
    with pytest.raises(FileRejected, match=r"invalid JSON \(.* at line 1 column"):
        parse(broken, "json")
    big = write_jsonl(tmp_path / "big.json", *({"text": "x" * 100} for _ in range(20)))
    with pytest.raises(FileRejected, match="convert it to JSONL"):
        parse(big, "json", max_json_file_bytes=1000)


# --- CSV -----------------------------------------------------------------------------------------

def test_csv_with_a_column_mapping_and_semicolons(tmp_path: Path):
    path = tmp_path / "faq.csv"
    path.write_text("Nr;Frage;Antwort\n1;Wie fest?;35 Nm\n2;Welche Linie?;Linie 2\n", encoding="utf-8")
    columns = parse_csv_columns("prompt=Frage, completion=Antwort")
    assert columns == (("prompt", "Frage"), ("completion", "Antwort"))
    out = parse(path, "csv", csv_columns=columns)
    assert out == [TextRecord("row 2", "prompt_completion", (("user", "Wie fest?"), ("assistant", "35 Nm"))),
                   TextRecord("row 3", "prompt_completion", (("user", "Welche Linie?"), ("assistant", "Linie 2")))]


@pytest.mark.parametrize(("header", "row", "messages"), [
    ("Instruction,Input,Output", "do,it,done", (("user", "do\n\nit"), ("assistant", "done"))),
    ("instruction,output,system", "do,done,sys", (("system", "sys"), ("user", "do"), ("assistant", "done"))),
    ("id,prompt,completion", "1,p,c", (("user", "p"), ("assistant", "c"))),
    ("Question,Answer", "q,a", (("user", "q"), ("assistant", "a"))),
    ("text", "just text", (("text", "just text"),)),
])
def test_csv_auto_detects_known_headers(tmp_path: Path, header, row, messages):
    path = tmp_path / "auto.csv"
    path.write_text(f"\ufeff{header}\n{row}\n", encoding="utf-8")
    [record] = parse(path, "csv")
    assert record.messages == messages


def test_tsv_multiline_quoted_fields_and_blank_rows(tmp_path: Path):
    path = tmp_path / "t.tsv"
    path.write_text('prompt\tcompletion\n"line one\nline two"\tok\n\t\nq\ta\n', encoding="utf-8")
    out = parse(path, "csv")
    assert [o.messages[0][1] for o in out] == ["line one\nline two", "q"]


def test_csv_mapping_to_missing_columns_names_the_expected_column_only(tmp_path: Path):
    path = tmp_path / "faq.csv"
    path.write_text("Frage,SECRET-HEADER\nx,y\n", encoding="utf-8")
    with pytest.raises(FileRejected) as info:
        parse(path, "csv", csv_columns=parse_csv_columns("prompt=Frage,completion=Antwort"))
    reason = info.value.reason
    assert "'Antwort'" in reason and "2 columns" in reason
    assert "SECRET-HEADER" not in reason


def test_csv_without_known_headers_asks_for_columns_and_does_not_echo_the_first_row(tmp_path: Path):
    path = tmp_path / "noheader.csv"
    path.write_text("Jane SECRET Doe,1970-01-01\nJohn,1980-02-02\n", encoding="utf-8")
    with pytest.raises(FileRejected, match="--columns") as info:
        parse(path, "csv")
    assert "SECRET" not in info.value.reason


def test_csv_mapping_that_forms_no_record_shape_is_rejected(tmp_path: Path):
    path = tmp_path / "half.csv"
    path.write_text("Frage,Antwort\nx,y\n", encoding="utf-8")
    with pytest.raises(FileRejected, match="must map instruction\\+output, prompt\\+completion or text"):
        parse(path, "csv", csv_columns=parse_csv_columns("prompt=Frage"))


def test_csv_rows_with_missing_cells_are_problems(tmp_path: Path):
    path = tmp_path / "short.csv"
    path.write_text("prompt,completion\nonly-a-prompt\np,c\n", encoding="utf-8")
    out = parse(path, "csv")
    assert isinstance(out[0], RecordProblem) and out[0].where == "row 2"
    assert "1 fields, the header has 2" in out[0].reason
    assert isinstance(out[1], TextRecord)


def test_csv_row_over_the_record_limit_is_skipped_and_later_rows_are_read(tmp_path: Path):
    path = tmp_path / "long.csv"
    path.write_text("text\n" + "y" * 5000 + "\nafter\n", encoding="utf-8")
    out = parse(path, "csv", max_record_bytes=1024)
    assert out[0].where == "row 2" and "record limit" in out[0].reason
    assert out[1] == TextRecord("row 3", "text", (("text", "after"),))


def test_csv_header_over_the_limit_or_missing_rejects_the_file(tmp_path: Path):
    long_header = tmp_path / "h.csv"
    long_header.write_text("h" * 5000 + "\nx\n", encoding="utf-8")
    with pytest.raises(FileRejected, match="header row is longer"):
        parse(long_header, "csv", max_record_bytes=1024)
    blank = tmp_path / "blank.csv"
    blank.write_text("\n\n", encoding="utf-8")
    with pytest.raises(FileRejected, match="no header row"):
        parse(blank, "csv")


@pytest.mark.parametrize("spec", ["prompt", "prompt=", "=Frage"])
def test_parse_csv_columns_refuses_malformed_pairs(spec):
    with pytest.raises(ValueError, match="FIELD=COLUMN"):
        parse_csv_columns(spec)


# --- TXT -----------------------------------------------------------------------------------------

def test_txt_one_document_per_file(tmp_path: Path):
    path = tmp_path / "doc.txt"
    path.write_text("\ufeffPara one.\n\nPara two.\n", encoding="utf-8")
    assert parse(path, "txt") == [TextRecord("file", "text", (("text", "Para one.\n\nPara two.\n"),))]


def test_txt_blocks_are_separated_by_blank_lines_and_located(tmp_path: Path):
    path = tmp_path / "log.txt"
    path.write_text("first a\nfirst b\n\n  \nsecond\n\n\nthird\n", encoding="utf-8")
    out = parse(path, "txt", txt_split="blocks")
    assert [(o.where, o.messages[0][1]) for o in out] == [
        ("block 1 (line 1)", "first a\nfirst b"), ("block 2 (line 5)", "second"), ("block 3 (line 8)", "third")]


def test_txt_oversized_document_and_block(tmp_path: Path):
    path = tmp_path / "big.txt"
    path.write_text("small\n\n" + "z" * 3000 + "\n\nlast\n", encoding="utf-8")
    with pytest.raises(FileRejected, match="--txt-split blocks"):
        parse(path, "txt", max_record_bytes=1024)
    out = parse(path, "txt", txt_split="blocks", max_record_bytes=1024)
    assert isinstance(out[1], RecordProblem) and out[1].where == "block 2 (line 3)"
    assert [o.messages[0][1] for o in (out[0], out[2])] == ["small", "last"]


# --- encodings -----------------------------------------------------------------------------------

CHINESE = "扭矩三十五牛米"
GERMAN = "Prüfung der Rückschlagklappe, Größe 3"


@pytest.mark.parametrize(("encoding", "text"), [("gbk", CHINESE), ("latin-1", GERMAN)])
def test_wrong_encoding_is_rejected_with_a_hint_and_reads_with_the_right_one(tmp_path: Path, encoding, text):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"text": "ascii first"}\n' + json.dumps({"text": text}, ensure_ascii=False).encode(encoding))
    with pytest.raises(FileRejected) as info:
        check_encoding(path, "utf-8")
    assert "not valid utf-8 at line 2" in info.value.reason
    assert "--encoding" in info.value.reason
    out = parse(path, "jsonl", encoding=encoding)
    assert [o.messages[0][1] for o in out] == ["ascii first", text]


def test_encoding_error_offset_is_exact_across_chunk_boundaries(tmp_path: Path):
    # A two-byte UTF-8 character split by the 1 MiB read boundary, then an invalid byte after it.
    head = b"a" * (1024 * 1024 - 1) + "é".encode()  # the é straddles the boundary
    path = tmp_path / "x.txt"
    path.write_bytes(head + b"bc\xff")
    with pytest.raises(FileRejected, match=f"byte 0xff at offset {len(head) + 2}"):
        check_encoding(path, "utf-8")


def test_file_ending_inside_a_character_is_rejected(tmp_path: Path):
    path = tmp_path / "cut.txt"
    path.write_bytes("ok é".encode()[:-1])
    with pytest.raises(FileRejected, match="ends in the middle of a character"):
        check_encoding(path, "utf-8")


def test_gbk_csv_with_mapping(tmp_path: Path):
    path = tmp_path / "faq.csv"
    path.write_bytes("问题,答案\n扭矩是多少,三十五牛米\n".encode("gbk"))
    [record] = parse(path, "csv", encoding="gbk", csv_columns=parse_csv_columns("prompt=问题,completion=答案"))
    assert record.messages == (("user", "扭矩是多少"), ("assistant", "三十五牛米"))


# --- options and detection -----------------------------------------------------------------------

@pytest.mark.parametrize(("options", "message"), [
    ({"encoding": "klingon"}, "unknown text encoding"),
    ({"encoding": "utf-16"}, "not supported; convert the files to UTF-8"),
    ({"txt_split": "lines"}, "txt_split"),
    ({"csv_columns": (("answer", "A"),)}, "unknown CSV field 'answer'"),
])
def test_parse_options_are_validated(options, message):
    with pytest.raises(ValueError, match=message):
        ParseOptions(**options)


@pytest.mark.parametrize(("name", "content", "fmt"), [
    ("a.JSONL", b"", "jsonl"), ("a.ndjson", b"", "jsonl"), ("a.json", b"", "json"), ("a.tsv", b"", "csv"),
    ("a.md", b"", "txt"), ("a.log", b"", "txt"), ("a.dcm", b"", "dicom"), ("a.JPG", b"", "image"),
    ("IM000001", b"\0" * 128 + b"DICM" + b"\0" * 10, "dicom"), ("notes.docx", b"PK", ""), ("README", b"hi", ""),
])
def test_detect_format_by_extension_or_dicom_magic(tmp_path: Path, name, content, fmt):
    path = tmp_path / name
    path.write_bytes(content)
    assert detect_format(path) == fmt


def test_unknown_format_is_rejected(tmp_path: Path):
    path = tmp_path / "a.txt"
    path.write_text("x", encoding="utf-8")
    with pytest.raises(FileRejected, match="not a text format"):
        parse(path, "dicom")
