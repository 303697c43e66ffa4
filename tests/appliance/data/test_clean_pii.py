"""Cleaning (NFC, controls, HTML, whitespace, lengths; every change counted) and the PII scrub."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from appliance.data.clean import CleanOptions, clean_record, clean_text
from appliance.data.formats import TextRecord
from appliance.data.pii import scrub_text
from appliance.data.pipeline import AcceptedRecord, ImportOptions, run_import


def cleaned(text: str, **kwargs) -> tuple[str, dict[str, int]]:
    counts: Counter[str] = Counter()
    return clean_text(text, counts, **kwargs), dict(counts)


# --- clean_text ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("raw", "expected", "kinds"), [
    ("Cafe\u0301 au lait", "Café au lait", {"unicode_nfc"}),
    ("bell\x07 and\x00 nul\x1b", "bell and nul", {"control_chars"}),
    ("zero\u200bwidth \u202eevil\u202c bidi\ufeff", "zerowidth evil bidi", {"control_chars"}),
    ("<p>Valve <b>V2</b> replaced</p><br>Done &amp; tested &#8211; ok",
     "Valve V2 replaced\n\nDone & tested \u2013 ok", {"html"}),
    ("<script>alert(1)</script><style>p{}</style><!-- note -->Text", "Text", {"html"}),
    ("  too    many\t\tspaces\u00a0here  ", "too many spaces here", {"whitespace"}),
    ("one\r\ntwo\rthree", "one\ntwo\nthree", {"whitespace"}),
    ("page one\x0cpage two\u2028line", "page one\npage two\nline", {"whitespace"}),
    ("a\n\n\n\n\nb", "a\n\nb", {"whitespace"}),
])
def test_clean_text_changes_and_counts_each_kind(raw, expected, kinds):
    text, counts = cleaned(raw)
    assert text == expected
    assert set(counts) == kinds and all(n == 1 for n in counts.values())


@pytest.mark.parametrize("text", [
    "std::vector<int> v; Map<String, List<Integer>> m;",
    "def f(x):\n    if x:\n        return 1\n\treturn 2",
    "if a < b and c > d: pass",
    "AT&T and R&D are fine",
    "torque 35 Nm, line 2, 3 x 20 mg",
])
def test_clean_text_leaves_code_and_ordinary_text_alone(text):
    assert cleaned(text) == (text, {})


def test_clean_text_dedents_common_indentation_only():
    assert cleaned("    for x in y:\n        print(x)\n")[0] == "for x in y:\n    print(x)"


def test_html_stripping_can_be_turned_off():
    assert cleaned("<p>kept</p>", strip_html=False) == ("<p>kept</p>", {})


# --- clean_record --------------------------------------------------------------------------------

def record(*messages: tuple[str, str], shape: str = "messages") -> TextRecord:
    return TextRecord("line 1", shape, messages)


def test_changes_are_counted_once_per_record_however_many_messages_changed():
    counts: Counter[str] = Counter()
    out = clean_record(record(("system", "<b>s</b>"), ("user", "<i>u</i>"), ("assistant", "<i>a</i>  !")),
                       counts, CleanOptions())
    assert out.record.messages == (("system", "s"), ("user", "u"), ("assistant", "a !"))
    assert counts == {"html": 1, "whitespace": 1}


def test_empty_messages_are_dropped_and_counted():
    counts: Counter[str] = Counter()
    out = clean_record(record(("system", " \u200b "), ("user", "q"), ("assistant", "a")), counts, CleanOptions())
    assert out.record.messages == (("user", "q"), ("assistant", "a"))
    assert counts["empty_messages_dropped"] == 1


@pytest.mark.parametrize(("messages", "shape", "dropped"), [
    ((("text", " \n\t "),), "text", "empty"),
    ((("system", "only a system prompt"), ("user", "")), "messages", "empty"),
    ((("user", "a question"), ("assistant", "<br>")), "prompt_completion", "no_assistant"),
    ((("text", "ab"),), "text", "too_short"),
    ((("user", "x" * 30), ("assistant", "y" * 30)), "messages", "too_long"),
])
def test_records_that_cannot_train_are_dropped_with_the_reason(messages, shape, dropped):
    out = clean_record(record(*messages, shape=shape), Counter(), CleanOptions(min_chars=3, max_chars=50))
    assert out.record is None and out.dropped == dropped


def test_length_limits_apply_to_the_cleaned_text():
    options = CleanOptions(min_chars=5, max_chars=10)
    assert clean_record(record(("text", "<b>12345</b>"), shape="text"), Counter(), options).record is not None
    assert clean_record(record(("text", "   1234    "), shape="text"), Counter(), options).dropped == "too_short"


@pytest.mark.parametrize(("min_chars", "max_chars"), [(0, 10), (10, 9)])
def test_clean_options_are_validated(min_chars, max_chars):
    with pytest.raises(ValueError, match="min_chars"):
        CleanOptions(min_chars=min_chars, max_chars=max_chars)


# --- scrub_text ----------------------------------------------------------------------------------

def scrubbed(text: str) -> tuple[str, dict[str, int]]:
    counts: Counter[str] = Counter()
    return scrub_text(text, counts), dict(counts)


@pytest.mark.parametrize(("text", "expected", "kind"), [
    ("Ruf an: +49 30 1234567.", "Ruf an: [PHONE].", "pii_phone"),
    ("call (555) 123-4567 today", "call [PHONE] today", "pii_phone"),
    ("Tel. 030/1234567", "Tel. [PHONE]", "pii_phone"),
    ("mobile 0171 1234567", "mobile [PHONE]", "pii_phone"),
    ("+1-555-123-4567", "[PHONE]", "pii_phone"),
    ("ext 555-1234", "ext [PHONE]", "pii_phone"),
    ("write to dr.who@clinic.example.org please", "write to [EMAIL] please", "pii_email"),
    ("MRN: AB12345 admitted", "[ID] admitted", "pii_id_number"),
    ("Patient-ID 4711-22", "[ID]", "pii_id_number"),
    ("SSN 123-45-6789", "SSN [ID]", "pii_id_number"),
    ("insurance A123456789", "insurance [ID]", "pii_id_number"),
    ("seen 2024-03-05", "seen [DATE]", "pii_date"),
    ("seen 05.03.2024", "seen [DATE]", "pii_date"),
    ("seen 3/5/24", "seen [DATE]", "pii_date"),
    ("seen March 5, 2024", "seen [DATE]", "pii_date"),
    ("seen 5 Mar 2024", "seen [DATE]", "pii_date"),
    ("aufgenommen am 5. März 2024", "aufgenommen am [DATE]", "pii_date"),
    ("at 2024-03-05T10:15:00Z", "at [DATE]T10:15:00Z", "pii_date"),
])
def test_pii_true_positives_are_replaced_and_counted_by_kind(text, expected, kind):
    assert scrubbed(text) == (expected, {kind: 1})


@pytest.mark.parametrize("text", [
    "torque 35 Nm on line 2",
    "give 3 x 20 mg daily",
    "firmware 1.2.3 to 2.13.0, numpy 2.4.6",
    "pressure 2.5 bar at 1500 rpm",
    "decrease 10 1500 rpm then May 5",
    "readings 12.50 13.75 mm",
    "measured 10 20 30 40 mm",
    "the patient no longer needs oxygen",
    "PID controller tuning on case no further action",
    "valve V-2 at 3.5 bar, bolt M12, ISO 9001",
])
def test_pii_leaves_maintenance_and_dosage_text_alone(text):
    assert scrubbed(text) == (text, {})


def test_pii_counts_every_occurrence():
    text, counts = scrubbed("a@b.de, c@d.de on 2024-01-02 and 2024-01-03, call +49 30 1234567")
    assert text == "[EMAIL], [EMAIL] on [DATE] and [DATE], call [PHONE]"
    assert counts == {"pii_email": 2, "pii_date": 2, "pii_phone": 1}


# --- through the import: profiles ----------------------------------------------------------------

PII_RECORD = {"instruction": "Call the ward at +49 30 1234567 about MRN: AB12345",
              "output": "Done on 2024-03-05, mailed ward@clinic.example.org"}


def import_one(tmp_path: Path, obj: dict, **options) -> tuple[list[AcceptedRecord], dict[str, int]]:
    (tmp_path / "in").mkdir(exist_ok=True)
    (tmp_path / "in" / "r.jsonl").write_text(json.dumps(obj) + "\n", encoding="utf-8")
    records: list[AcceptedRecord] = []
    report = run_import(tmp_path / "in", ImportOptions(**options), secret=b"x" * 32, split_seed="seed",
                        sink=records.append)
    return records, report.changes


def test_general_profile_keeps_pii_and_medical_scrubs_it(tmp_path: Path):
    [general], changes = import_one(tmp_path, PII_RECORD)
    assert b"+49 30 1234567" in general.payload
    assert not any(k.startswith("pii_") for k in changes)

    [medical], changes = import_one(tmp_path, PII_RECORD, profile="medical")
    body = json.loads(medical.payload)
    assert body["messages"] == [{"role": "user", "content": "Call the ward at [PHONE] about [ID]"},
                                {"role": "assistant", "content": "Done on [DATE], mailed [EMAIL]"}]
    assert {k: v for k, v in changes.items() if k.startswith("pii_")} == {
        "pii_phone": 1, "pii_id_number": 1, "pii_date": 1, "pii_email": 1}
    assert medical.content_hash != general.content_hash  # the identity is that of what is stored


def test_scrub_can_be_forced_either_way(tmp_path: Path):
    [off], _ = import_one(tmp_path, PII_RECORD, profile="medical", scrub_pii=False)
    assert b"AB12345" in off.payload
    [on], _ = import_one(tmp_path, PII_RECORD, scrub_pii=True)
    assert b"AB12345" not in on.payload and b"[ID]" in on.payload


def test_cleaning_counts_reach_the_report(tmp_path: Path):
    [rec], changes = import_one(tmp_path, {"prompt": "<p>Cafe\u0301</p>", "completion": "  fine  "})
    assert json.loads(rec.payload)["messages"][0]["content"] == "Café"
    assert changes == {"html": 1, "unicode_nfc": 1, "whitespace": 1}
