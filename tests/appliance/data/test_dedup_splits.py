"""Exact and near-duplicate detection (within an import and against earlier versions), and splits."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from appliance.data.dedup import (
    NUM_PERM,
    NearDupIndex,
    minhash_text,
    record_hash,
    signature,
    signature_from_bytes,
    signature_to_bytes,
)
from appliance.data.pipeline import AcceptedRecord, ImportOptions, KnownRecords, run_import
from appliance.data.splits import SPLITS, SplitSpec, assign_split

BASE = ("Replace the check valve on line 2 after the pressure test. Torque the four flange bolts to 35 Nm "
        "in a cross pattern, then run the pump for ten minutes and record the outlet pressure in the log book. "
        "If the pressure drops by more than half a bar, stop the line and call the shift engineer.")


def changed_words(text: str, every: int) -> str:
    """`text` with every `every`-th word replaced: a controlled amount of difference."""
    return " ".join(f"w{i}" if i % every == 0 else w for i, w in enumerate(text.split(), start=1))


def similarity(a: str, b: str) -> float:
    return float(np.mean(signature(a) == signature(b)))


# --- hashes and signatures -----------------------------------------------------------------------

def test_record_hash_is_sha256_of_canonical_json_of_the_messages():
    messages = (("user", "Grüß Gott"), ("assistant", "a"))
    expected = hashlib.sha256('[["user","Grüß Gott"],["assistant","a"]]'.encode()).hexdigest()
    assert record_hash(messages) == expected
    assert record_hash((("assistant", "Grüß Gott"), ("assistant", "a"))) != expected


def _reference_signature(text: str) -> list[int]:
    """Scheme mh64-b7-v1 written out from dedup.py's docstring, in plain Python integers."""
    mask = 2**64 - 1
    rng = np.random.default_rng(0x41524C4B)
    a = [(int(x) * 2 + 1) & mask for x in rng.integers(1, 2**63, size=NUM_PERM, dtype=np.uint64)]
    b = [int(x) for x in rng.integers(0, 2**63, size=NUM_PERM, dtype=np.uint64)]
    data = text.encode("utf-8").ljust(7, b"\0")
    shingles = {int.from_bytes(data[i:i + 7], "big") for i in range(len(data) - 6)}

    def splitmix64(x: int) -> int:
        x = (x + 0x9E3779B97F4A7C15) & mask
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
        return x ^ (x >> 31)

    mixed = [splitmix64(s) for s in shingles]
    return [min(((m * a[k] + b[k]) & mask) >> 32 for m in mixed) for k in range(NUM_PERM)]


@pytest.mark.parametrize("text", ["hi", "exactly", minhash_text((("user", BASE), ("assistant", "ok")))])
def test_minhash_signature_follows_the_documented_scheme(text):
    # Signatures are stored in the catalog: the scheme must not drift under the same name.
    sig = signature(text)
    assert sig.dtype == np.uint32 and sig.shape == (NUM_PERM,)
    assert sig.tolist() == _reference_signature(text)


def test_minhash_signature_is_pinned():
    sig = signature("replace the check valve on line 2 and torque the bolts to 35 nm")
    assert hashlib.sha256(signature_to_bytes(sig)).hexdigest() == (
        "c17df1badd326ca329628ec7aa6cd345e1863c164e9118d4583b092903356fb9")
    assert np.array_equal(signature_from_bytes(signature_to_bytes(sig)), sig)


def test_minhash_text_ignores_case_roles_and_whitespace():
    assert minhash_text((("user", "Hello   World"), ("assistant", "X\n\nY"))) == "hello world x y"


# --- near-duplicate index ------------------------------------------------------------------------

def test_near_duplicate_with_one_word_changed_is_found_and_unrelated_text_is_not():
    index = NearDupIndex(0.85)
    index.add("base", signature(BASE))
    assert index.query(signature(BASE.replace("ten minutes", "five minutes"))) == "base"
    assert index.query(signature("A completely different maintenance note about conveyor belts.")) is None
    assert len(index) == 1


def test_threshold_decides_how_similar_is_similar_enough():
    variant = changed_words(BASE, 6)
    sim = similarity(BASE, variant)
    assert 0.4 < sim < 0.9  # a middling pair, so that the threshold matters
    loose, strict = NearDupIndex(sim - 0.05), NearDupIndex(min(sim + 0.05, 1.0))
    for index in (loose, strict):
        index.add("base", signature(BASE))
    assert loose.query(signature(variant)) == "base"
    assert strict.query(signature(variant)) is None


@pytest.mark.parametrize("threshold", [0.0, -0.1, 1.01])
def test_threshold_must_be_in_range(threshold):
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        NearDupIndex(threshold)


# --- dedup through the import --------------------------------------------------------------------

def write_jsonl(path: Path, *texts: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")


def run(root: Path, known: KnownRecords | None = None, **options) -> tuple[list[AcceptedRecord], object]:
    records: list[AcceptedRecord] = []
    report = run_import(root, ImportOptions(**options), secret=b"x" * 32, split_seed="seed", known=known,
                        sink=records.append)
    return records, report


def test_exact_duplicates_after_cleaning_and_near_duplicates_are_dropped(tmp_path: Path):
    write_jsonl(tmp_path / "in" / "a.jsonl", BASE, "Second, unrelated note on the compressor filter.")
    write_jsonl(tmp_path / "in" / "b.jsonl", "  " + BASE.replace(" ", "   ") + "  <br>")  # same after cleaning
    write_jsonl(tmp_path / "in" / "c.jsonl", BASE.replace("ten minutes", "five minutes"))
    records, report = run(tmp_path / "in")
    assert len(records) == 2
    assert [f.bucket for f in report.files] == ["imported", "duplicate", "duplicate"]
    assert report.changes["duplicate_exact"] == 1 and report.changes["duplicate_near"] == 1
    assert all(len(r.minhash) == NUM_PERM * 4 for r in records)

    records, report = run(tmp_path / "in", near_dup_threshold=None)
    assert len(records) == 3 and "duplicate_near" not in report.changes
    assert all(r.minhash == b"" for r in records)


def test_records_of_earlier_versions_are_not_imported_again(tmp_path: Path):
    write_jsonl(tmp_path / "v1" / "a.jsonl", BASE, "Old note on the compressor filter.")
    first, _ = run(tmp_path / "v1")
    known = KnownRecords(hashes={r.content_hash for r in first}, near=NearDupIndex(0.85))
    for r in first:
        known.near.add(r.content_hash, signature_from_bytes(r.minhash))

    write_jsonl(tmp_path / "v2" / "a.jsonl", "Old note on the compressor filter.")           # exact
    write_jsonl(tmp_path / "v2" / "b.jsonl", BASE.replace("ten minutes", "five minutes"))    # near
    write_jsonl(tmp_path / "v2" / "c.jsonl", "A genuinely new note about the cooling loop.")  # new
    second, report = run(tmp_path / "v2", known=known)
    assert [json.loads(r.payload)["text"] for r in second] == ["A genuinely new note about the cooling loop."]
    assert report.buckets["duplicate"] == 2
    assert report.changes["duplicate_exact"] == 1 and report.changes["duplicate_near"] == 1


def test_exact_hashes_alone_dedup_against_earlier_versions(tmp_path: Path):
    write_jsonl(tmp_path / "in" / "a.jsonl", BASE)
    [old], _ = run(tmp_path / "in")
    records, report = run(tmp_path / "in", known=KnownRecords(hashes={old.content_hash}))
    assert records == [] and report.buckets["duplicate"] == 1


def test_a_dry_run_does_not_change_the_known_records(tmp_path: Path):
    write_jsonl(tmp_path / "in" / "a.jsonl", BASE)
    known = KnownRecords(near=NearDupIndex(0.85))
    run(tmp_path / "in", known=known)
    records, _ = run(tmp_path / "in", known=known)
    assert len(records) == 1


# --- splits --------------------------------------------------------------------------------------

KEYS = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(10_000)]


def test_split_is_a_pure_function_of_key_seed_and_ratios():
    spec = SplitSpec()
    first = [assign_split(k, "seed", spec) for k in KEYS[:500]]
    assert first == [assign_split(k, "seed", SplitSpec.parse("80/10/10")) for k in KEYS[:500]]
    assert set(first) <= set(SPLITS)
    other_seed = [assign_split(k, "other", spec) for k in KEYS[:500]]
    assert sum(a != b for a, b in zip(first, other_seed, strict=True)) > 50


@pytest.mark.parametrize("ratios", ["80/10/10", "70/15/15", "0.5,0.25,0.25", "90/0/10"])
def test_ratios_are_honoured_on_10k_keys(ratios):
    spec = SplitSpec.parse(ratios)
    counts = Counter(assign_split(k, "seed", spec) for k in KEYS)
    for name, share in zip(SPLITS, (spec.train, spec.val, spec.test), strict=True):
        # 10k draws: one standard deviation is at most 0.5 %; allow four.
        assert abs(counts[name] / len(KEYS) - share) < 0.02, (name, counts)


def test_all_train_puts_every_key_in_train():
    assert {assign_split(k, "s", SplitSpec(1.0, 0.0, 0.0)) for k in KEYS[:1000]} == {"train"}


def test_splits_are_stable_across_reimports_and_appends(tmp_path: Path):
    texts = [f"Maintenance note {i}: replaced filter {i * 7} on press {i % 13}." for i in range(60)]
    write_jsonl(tmp_path / "in" / "a.jsonl", *texts)
    before, _ = run(tmp_path / "in")
    write_jsonl(tmp_path / "in" / "0-new.jsonl", *(f"Appended note {i} about pump {i}." for i in range(40)))
    after, _ = run(tmp_path / "in")
    split_before = {r.content_hash: r.split for r in before}
    split_after = {r.content_hash: r.split for r in after}
    assert len(split_after) == 100
    assert {h: split_after[h] for h in split_before} == split_before
    assert all(r.split == assign_split(r.content_hash, "seed", SplitSpec()) for r in after)


@pytest.mark.parametrize(("text", "expected"), [
    ("80/10/10", SplitSpec(0.8, 0.1, 0.1)), ("8,1,1", SplitSpec(0.8, 0.1, 0.1)), ("1/0/0", SplitSpec(1, 0, 0))])
def test_split_spec_parse_and_text_round_trip(text, expected):
    spec = SplitSpec.parse(text)
    assert (spec.train, spec.val, spec.test) == pytest.approx((expected.train, expected.val, expected.test))
    assert SplitSpec.parse(spec.to_text()).to_text() == spec.to_text()


@pytest.mark.parametrize(("text", "message"), [
    ("80/20", "three numbers"), ("0/0/0", "more than 0"), ("-10/60/50", ">= 0"), ("nan,1,1", "more than 0"),
    ("inf,1,1", "add up to 1"), ("a/b/c", "could not convert"),
])
def test_split_spec_refuses_bad_ratios(text, message):
    with pytest.raises(ValueError, match=message):
        SplitSpec.parse(text)


def test_split_spec_refuses_nan_directly():
    with pytest.raises(ValueError, match="add up to 1"):
        SplitSpec(float("nan"), 0.5, 0.5)
