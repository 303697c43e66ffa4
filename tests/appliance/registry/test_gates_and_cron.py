"""The pure parts: which records a retrain reads (new + seeded replay), the gate verdicts and their
reasons, cron and interval schedules. No catalog, no model."""

from __future__ import annotations

from datetime import datetime

import pytest

from appliance.registry import gates
from appliance.registry.cron import ScheduleSpecError, next_cron_time, parse_cron, parse_every


def _rows(versions: dict[int, dict[str, int]]) -> list[tuple[str, int, str, dict]]:
    """(hash, version, split, record) rows: versions -> {split: count}."""
    rows = []
    for version, splits in versions.items():
        for split, count in splits.items():
            rows += [(f"{version}{split}{i:04d}".ljust(64, "0"), version, split, {"text": f"v{version} {split} {i}"})
                     for i in range(count)]
    return rows


def test_replay_is_its_share_of_the_mix_capped_by_what_exists():
    assert gates.replay_count(80, 1000, 0.2) == 20       # 20 of 100 records in the mix are earlier ones
    assert gates.replay_count(80, 1000, 0.5) == 80
    assert gates.replay_count(80, 5, 0.5) == 5
    assert gates.replay_count(80, 1000, 0.0) == 0
    assert gates.replay_count(0, 1000, 0.2) == 0


def test_replay_sample_is_seeded_and_independent_of_input_order():
    hashes = [f"{i:064x}" for i in range(200)]
    first = gates.replay_sample(hashes, 30, seed=7)
    assert len(first) == 30
    assert gates.replay_sample(list(reversed(hashes)), 30, seed=7) == first
    assert gates.replay_sample(hashes, 30, seed=8) != first


def test_select_records_reads_new_data_replay_and_every_frozen_test_split():
    rows = _rows({1: {"train": 40, "val": 5, "test": 6}, 2: {"train": 20, "val": 2, "test": 0},
                  3: {"train": 16, "val": 4, "test": 3}})
    data = gates.select_records(rows, dataset="maint", since=2, last=3, replay=0.2, seed=3)
    assert data.counts == {"new_train": 16, "replay_train": 4, "earlier_train": 60, "new_val": 4, "replay_val": 1,
                           "earlier_val": 7, "new_test": 3}
    assert len(data.train) == 20 and sum(r["text"].startswith("v3 train") for r in data.train) == 16
    assert list(data.frozen_tests) == ["maint@v1/test", "maint@v2/test"]
    assert [len(v) for v in data.frozen_tests.values()] == [6, 0]
    assert data.new_test_name == "maint@v3/test" and len(data.new_test) == 3
    again = gates.select_records(list(reversed(rows)), dataset="maint", since=2, last=3, replay=0.2, seed=3)
    assert sorted(r["text"] for r in again.train) == sorted(r["text"] for r in data.train)
    assert gates.split_name("maint", 2, 4) == "maint@v2-v4/test"


def test_gates_pass_fail_and_not_applicable_with_reasons():
    held = gates.SplitLoss("maint@v1/test", 20, 0.80, 0.82)      # +2.5%
    forgot = gates.SplitLoss("maint@v2/test", 10, 0.50, 0.60)    # +20%
    empty = gates.SplitLoss("maint@v3/test", 0, None, None)
    better = gates.SplitLoss("maint@v4/test", 12, 0.40, 0.30)
    passed = gates.decide([held, empty], better, max_forgetting=0.05, new_data_tolerance=0.0, deploys_engines=False)
    assert passed.passed and passed.reasons == []
    assert [s["status"] for s in passed.gates["forgetting"]["splits"]] == ["pass", "not_applicable"]
    assert passed.gates["new_data"]["status"] == "pass"
    assert passed.gates["engine_parity"] == {"status": "not_applicable",
                                             "reason": "the task does not deploy QAT/TensorRT engines"}
    assert passed.gates["forgetting"]["splits"][0]["relative_change"] == pytest.approx(0.025)

    failed = gates.decide([held, forgot], gates.SplitLoss("maint@v4/test", 12, 0.40, 0.41), max_forgetting=0.05,
                          new_data_tolerance=0.0, deploys_engines=True)
    assert not failed.passed
    assert failed.reasons == [
        "forgetting: maint@v2/test test loss 0.5000 -> 0.6000 (+20.0%, limit +5.0%)",
        "new data: maint@v4/test test loss 0.4000 -> 0.4100 (+2.5%, must not rise more than +0.0%)"]
    assert failed.gates["forgetting"]["status"] == "fail" and failed.gates["new_data"]["status"] == "fail"
    assert failed.gates["engine_parity"] == {"status": "not_evaluated",
                                             "reason": "measured by the retrain job once the other gates pass"}
    # A looser threshold is a per-task policy: the same numbers pass at 25% / 5%.
    assert gates.decide([held, forgot], gates.SplitLoss("x", 12, 0.40, 0.41), max_forgetting=0.25,
                        new_data_tolerance=0.05, deploys_engines=False).passed

    nothing = gates.decide([empty], gates.SplitLoss("maint@v4/test", 0, None, None), max_forgetting=0.05,
                           new_data_tolerance=0.0, deploys_engines=False)
    assert nothing.passed and nothing.gates["forgetting"]["status"] == "not_applicable"
    assert "no test split" in nothing.gates["new_data"]["reason"]


def test_intervals():
    assert parse_every("7d") == 7 * 86400 and parse_every("30m") == 1800 and parse_every("2w") == 14 * 86400
    for bad in ("7", "0d", "1y", "d", "-1h"):
        with pytest.raises(ScheduleSpecError, match="is not an interval"):
            parse_every(bad)


def test_cron_next_times():
    monday_0230 = parse_cron("30 2 * * 1")
    assert next_cron_time(monday_0230, datetime(2026, 11, 23, 2, 30)) == datetime(2026, 11, 30, 2, 30)  # a Monday
    assert next_cron_time(monday_0230, datetime(2026, 11, 22, 23, 59)) == datetime(2026, 11, 23, 2, 30)
    every_15 = parse_cron("*/15 8-9 * * *")
    assert next_cron_time(every_15, datetime(2026, 1, 1, 9, 50)) == datetime(2026, 1, 2, 8, 0)
    assert next_cron_time(every_15, datetime(2026, 1, 1, 8, 14, 59)) == datetime(2026, 1, 1, 8, 15)
    # Both day fields restricted: either matches (the 1st, or any Sunday); 7 is Sunday too.
    either = parse_cron("0 0 1 * 7")
    assert next_cron_time(either, datetime(2026, 11, 23)) == datetime(2026, 11, 29)
    assert next_cron_time(either, datetime(2026, 11, 29)) == datetime(2026, 12, 1)
    leap = parse_cron("0 12 29 2 *")
    assert next_cron_time(leap, datetime(2026, 3, 1)) == datetime(2028, 2, 29, 12, 0)


@pytest.mark.parametrize(("text", "message"), [
    ("30 2 * *", "has 4 fields, not 5"), ("61 * * * *", "outside 0-59"), ("* * * * mon", "not understood"),
    ("*/0 * * * *", "outside 0-59"), ("0 0 30 2 *", "never matches a real date"), ("5-1 * * * *", "outside 0-59")])
def test_bad_cron_expressions_say_why(text, message):
    with pytest.raises(ScheduleSpecError, match=message) as caught:
        parse_cron(text)
    assert caught.value.hint


def test_classifier_gates_on_auc_and_accuracy():
    held = gates.SplitScores("x@v1/test", 20, {"roc_auc": 0.98, "accuracy": 0.95}, {"roc_auc": 0.97, "accuracy": 0.95})
    dropped = gates.SplitScores("x@v2/test", 20, {"roc_auc": 0.90, "accuracy": 0.90},
                                {"roc_auc": 0.91, "accuracy": 0.80})  # accuracy -11.1%
    one_class = gates.SplitScores("x@v3/test", 3, {"roc_auc": float("nan"), "accuracy": 1.0},
                                  {"roc_auc": float("nan"), "accuracy": 1.0})
    new = gates.SplitScores("x@v4/test", 12, {"roc_auc": 0.60, "accuracy": 0.5}, {"roc_auc": 0.95, "accuracy": 0.9})
    passed = gates.decide_classifier([held, one_class], new, max_forgetting=0.05, new_data_tolerance=0.01,
                                     deploys_engines=False)
    assert passed.passed and [s["status"] for s in passed.gates["forgetting"]["splits"]] == ["pass", "pass"]
    assert passed.gates["forgetting"]["splits"][1]["roc_auc_change"] is None  # AUC undefined on one class
    failed = gates.decide_classifier([held, dropped], gates.SplitScores("x@v4/test", 0, None, None),
                                     max_forgetting=0.05, new_data_tolerance=0.01, deploys_engines=True)
    assert failed.reasons == ["forgetting: x@v2/test accuracy 0.9000 -> 0.8000 (-11.1%, limit -5.0%)"]
    assert failed.gates["new_data"]["status"] == "not_applicable"
    assert failed.gates["engine_parity"]["status"] == "not_evaluated"


def test_engine_parity_judged_on_measured_numbers_and_task_thresholds():
    from types import SimpleNamespace

    from appliance.registry import engine_gate

    validation = {"variant": "int8", "ok": True, "failures": [], "sha256": "ab", "bytes": 10,
                  "parity": {"samples": 16, "max_abs_diff": 0.01, "max_rel_diff": 0.004, "top1_agreement": 1.0}}
    defaults = SimpleNamespace(engine_max_rel_diff=None, engine_min_top1=None, deploys_engines=True)
    gate = engine_gate.judge(validation, defaults)
    assert gate["status"] == "pass" and gate["thresholds"] == {"max_rel_diff": 0.05, "min_top1_agreement": 0.95,
                                                               "source": "optimize stage defaults"}
    tight = SimpleNamespace(engine_max_rel_diff=0.001, engine_min_top1=None, deploys_engines=True)
    failed = engine_gate.judge(validation, tight)
    assert failed["status"] == "fail" and failed["thresholds"]["max_rel_diff"] == 0.001
    assert engine_gate.reasons_of(failed) == [
        "engine parity: int8 export on ONNX Runtime (CPU): max relative difference 0.004 > 0.001 (task policy)"]
    loose = SimpleNamespace(engine_max_rel_diff=0.5, engine_min_top1=0.5, deploys_engines=True)
    broken = {**validation, "ok": False, "failures": ["top-1 agreement 0.900 < 0.95"],
              "parity": {**validation["parity"], "top1_agreement": 0.9}}
    assert engine_gate.judge(broken, loose)["failures"] == ["optimize validation: top-1 agreement 0.900 < 0.95"]
    assert engine_gate.judge(broken, loose)["thresholds"]["min_top1_agreement"] == 0.95  # policy only tightens


def test_a_retrain_whose_served_variant_regresses_is_rejected_with_the_numbers():
    """Gate 3 judges what production would serve: the quantized variant's quality against the float candidate."""
    from types import SimpleNamespace

    from appliance.optimize.quality_gate import perplexity_gate
    from appliance.registry import engine_gate

    quality = perplexity_gate(2.0, 2.3, max_increase=0.05)  # as the optimize job records it on the int8 variant
    validation = {"variant": "int8", "ok": False, "failures": [quality["failure"]], "quality": quality,
                  "sha256": "ab", "bytes": 10,
                  "parity": {"prompts": 4, "max_abs_diff": 0.01, "max_rel_diff": 0.004, "top1_agreement": 1.0}}
    task = SimpleNamespace(engine_max_rel_diff=None, engine_min_top1=None, deploys_engines=True)
    gate = engine_gate.judge(validation, task)
    assert gate["status"] == "fail" and gate["quality"]["variant"] == 2.3  # parity alone would have passed
    assert engine_gate.reasons_of(gate) == [
        "engine parity: int8 export on ONNX Runtime (CPU): optimize validation: quality: perplexity 2.3 vs float 2 "
        "(+15.0%; the task allows +5.0%)"]
