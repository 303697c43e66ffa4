"""The operating point: Wilson intervals, a specificity target turned into a threshold, the confusion there, ECE.

Pure numbers on constructed score tensors (no training): each expected value is worked out by hand in a comment.
"""

from __future__ import annotations

import math

import pytest

from appliance.train.classifier import classification_metrics
from appliance.train.operating_point import (
    OperatingPolicy,
    expected_calibration_error,
    measure_operating_point,
    resolve,
    threshold_for_specificity,
    wilson_interval,
)

LABELS = ["normal", "abnormal"]


def _probs(abnormal: list[float]):
    import torch

    p = torch.tensor(abnormal, dtype=torch.float32)
    return torch.stack([1 - p, p], 1)


def _targets(values: list[int]):
    import torch

    return torch.tensor(values, dtype=torch.int64)


def test_wilson_interval_known_values():
    # Published 95% Wilson bounds: 10/10 -> 0.7225-1; 6/10 -> 0.3127-0.8318; 0/5 -> 0-0.4345.
    assert wilson_interval(10, 10) == pytest.approx((0.72246, 1.0), abs=1e-4)
    assert wilson_interval(6, 10) == pytest.approx((0.31267, 0.83182), abs=1e-4)
    assert wilson_interval(0, 5) == pytest.approx((0.0, 0.43448), abs=1e-4)
    assert wilson_interval(0, 0) is None  # no positives: not measured, never NaN


def test_threshold_for_specificity_keeps_the_target_on_ties_and_edges():
    negatives = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95]
    t = threshold_for_specificity(negatives, 0.9)  # one of ten may score at or above it: just above 0.9
    assert 0.9 < t < 0.9 + 1e-12 and sum(s < t for s in negatives) == 9
    t = threshold_for_specificity(negatives, 0.85)  # floor(1.5) = 1 may still be above: the same threshold
    assert sum(s < t for s in negatives) == 9
    tied = [0.5] * 4 + [0.2] * 6
    t = threshold_for_specificity(tied, 0.9)  # the four tied at 0.5 must all fall below: above 0.5
    assert t > 0.5 and sum(s < t for s in tied) == 10
    assert threshold_for_specificity([0.3], 0.5) > 0.3


def test_resolve_and_measure_at_a_specificity_target_set_on_validation_images():
    val = _probs([0.02, 0.06, 0.10, 0.14, 0.18, 0.22, 0.26, 0.30, 0.34, 0.52, 0.9]), _targets([0] * 10 + [1])
    point = resolve(OperatingPolicy("abnormal", specificity=0.9), LABELS, *val)
    assert point["class_index"] == 1 and point["site_chosen"] and point["validation_negatives"] == 10
    assert 0.34 < point["threshold"] < 0.3401  # nine of ten validation negatives fall below it
    # Test: 4 positives above the threshold, 1 below; 3 negatives below, 1 above.
    test = _probs([0.9, 0.8, 0.5, 0.36, 0.2, 0.1, 0.2, 0.3, 0.6]), _targets([1, 1, 1, 1, 1, 0, 0, 0, 0])
    measured = measure_operating_point(*test, point)
    assert measured["confusion"] == {"tp": 4, "fn": 1, "fp": 1, "tn": 3}
    assert measured["sensitivity"] == pytest.approx(0.8) and measured["specificity"] == pytest.approx(0.75)
    assert measured["sensitivity_ci"] == pytest.approx(list(wilson_interval(4, 5)))
    assert "specificity 0.9 on 10 validation images outside class abnormal" in measured["chosen_by"]


def test_unmeasurable_operating_points_say_why_and_hold_no_nan():
    one_class = _probs([0.1, 0.2]), _targets([0, 0])
    measured = measure_operating_point(*one_class, resolve(OperatingPolicy(threshold=0.3), LABELS))
    assert measured["sensitivity"] is None and measured["sensitivity_ci"] is None
    assert measured["specificity"] == 1.0 and "sensitivity not measured" in measured["reason"]
    no_negatives = _probs([0.9]), _targets([1])
    point = resolve(OperatingPolicy(specificity=0.9), LABELS, *no_negatives)
    assert "threshold" not in point and "cannot be set" in point["reason"]
    assert measure_operating_point(*one_class, point)["sensitivity"] is None
    three = resolve(OperatingPolicy(threshold=0.3), ["a", "b", "c"])
    assert "must name the positive class" in three["reason"]
    unknown = resolve(OperatingPolicy("fracture", threshold=0.3), LABELS)
    assert "'fracture' is not one of this model's classes (normal, abnormal)" in unknown["reason"]
    metrics = classification_metrics(*one_class, LABELS).to_dict()
    assert metrics["operating_point"]["sensitivity"] is None and not metrics["operating_point"]["site_chosen"]
    assert not any(isinstance(v, float) and math.isnan(v) for v in metrics["operating_point"].values())


def test_default_point_is_the_argmax_decision_and_not_site_chosen():
    probabilities, targets = _probs([0.9, 0.7, 0.4, 0.2, 0.6, 0.1]), _targets([1, 1, 1, 0, 0, 0])
    metrics = classification_metrics(probabilities, targets, LABELS)
    op = metrics.operating_point
    assert op["threshold"] == 0.5 and not op["site_chosen"] and "has not chosen" in op["chosen_by"]
    assert op["sensitivity"] == metrics.sensitivity["abnormal"]  # 0.5 on two classes = arg-max
    assert op["specificity"] == metrics.specificity["abnormal"]
    assert op["confusion"] == {"tp": metrics.confusion[1][1], "fn": metrics.confusion[1][0],
                               "fp": metrics.confusion[0][1], "tn": metrics.confusion[0][0]}


def test_expected_calibration_error():
    # Confidences 0.9 (two right) and 0.6 (one right, one wrong): bins [0.9,1) gap |0.9-1| = 0.1,
    # [0.6,0.7) gap |0.6-0.5| = 0.1 -> ECE 0.1. A perfectly calibrated 0.75 bin (3 of 4 right) adds 0.
    probabilities = _probs([0.9, 0.1, 0.6, 0.4])
    assert expected_calibration_error(probabilities, _targets([1, 0, 1, 1])) == pytest.approx(0.1)
    calibrated = _probs([0.75] * 4)
    assert expected_calibration_error(calibrated, _targets([1, 1, 1, 0])) == pytest.approx(0.0, abs=1e-6)
    empty = _probs([])
    assert expected_calibration_error(empty.reshape(0, 2), _targets([])) is None


def test_cli_run_line_says_not_measured_and_never_none():
    from types import SimpleNamespace

    from appliance.train.cli import _metric_text

    one_class = classification_metrics(_probs([0.1, 0.2]), _targets([0, 0]), LABELS).to_dict()
    text = _metric_text(SimpleNamespace(kind="classifier", metrics={"val_auc": None, "test": one_class}))
    assert "sensitivity at the default threshold 0.5 not measured" in text and "None" not in text
    chosen = classification_metrics(_probs([0.9, 0.2, 0.1]), _targets([1, 1, 0]), LABELS,
                                    resolve(OperatingPolicy(threshold=0.15), LABELS)).to_dict()
    text = _metric_text(SimpleNamespace(kind="classifier", metrics={"val_auc": 0.9, "test": chosen}))
    assert "sensitivity at the operating point 1.000 (95% CI 0.34-1.00)" in text and "ECE " in text
