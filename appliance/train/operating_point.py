"""A classifier's operating point: the threshold a site reads its scores at, and what the model does there.

    op = resolve(OperatingPolicy(positive_class="abnormal", specificity=0.9), labels, val_probs, val_targets)
    measure_operating_point(test_probs, test_targets, op)  # sensitivity, specificity (95% Wilson CIs), confusion

A radiologist judges a detector by its sensitivity at the specificity the department can afford
(or at the threshold it is run at), not by its AUC. The task policy stores the site's choice: a
positive class and either a threshold on that class's probability or a specificity target. A
specificity target becomes a threshold on the *validation* images (the lowest one whose
specificity there reaches the target), so that the test split, which measures it, played no part
in choosing it; the threshold is then fixed, and the test sensitivity and specificity are plain
binomial proportions with Wilson 95% intervals (good coverage at small n and at 0 or 1, where a
normal approximation or a bootstrap collapses to a zero-width interval: 10 of 10 gives 0.72-1.00,
not 1.00-1.00). A task without a chosen point is read at 0.5 on the second class (for two classes
exactly the arg-max decision) and says that the site did not choose it.

Expected calibration error (top-label, 10 equal-width confidence bins, Guo et al. 2017): the
image-weighted mean gap between confidence and accuracy per bin; 0 is perfectly calibrated.
A number a split cannot give is None ("not measured"), never NaN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

Z95 = 1.959963984540054
ECE_BINS = 10
DEFAULT_THRESHOLD = 0.5


@dataclass(frozen=True)
class OperatingPolicy:
    """The site's choice, as stored with the task (all None: not chosen)."""

    positive_class: str | None = None
    """The class a positive call means (None: the second of two classes, the one the ROC AUC treats as positive)."""
    specificity: float | None = None
    """Target specificity; the threshold is the lowest that reaches it on the validation images."""
    threshold: float | None = None
    """A fixed threshold on the positive class's probability (a positive call: probability >= threshold)."""

    @property
    def chosen(self) -> bool:
        return self.specificity is not None or self.threshold is not None

    @classmethod
    def of_task(cls, task: Any) -> OperatingPolicy:
        if task is None:
            return cls()
        return cls(getattr(task, "operating_class", None), getattr(task, "operating_specificity", None),
                   getattr(task, "operating_threshold", None))

    def describe(self) -> str:
        who = self.positive_class or "the second class"
        if self.specificity is not None:
            return f"{who} at specificity {self.specificity:g} (threshold set on the validation images)"
        if self.threshold is not None:
            return f"{who} at threshold {self.threshold:g}"
        return f"not set: {who} read at threshold {DEFAULT_THRESHOLD:g} (arg-max for two classes), not gated"


def wilson_interval(successes: int, trials: int, z: float = Z95) -> tuple[float, float] | None:
    """Wilson score interval for a binomial proportion; None when there are no trials."""
    if trials <= 0:
        return None
    p = successes / trials
    denominator = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def threshold_for_specificity(negative_scores: list[float], target: float) -> float:
    """The lowest threshold (positive: score >= threshold) at which at least `target` of the negatives are below."""
    ranked = sorted(negative_scores, reverse=True)
    allowed = math.floor((1 - target) * len(ranked) + 1e-9)  # negatives that may still score at or above it
    if allowed >= len(ranked):
        return 0.0
    return math.nextafter(ranked[allowed], math.inf)  # just above the first negative that must fall below


def resolve(policy: OperatingPolicy, labels: list[str], val_probabilities: Any = None,
            val_targets: Any = None) -> dict[str, Any]:
    """The concrete operating point: {class, class_index, threshold, chosen_by, site_chosen}, or {reason} if none."""
    if policy.positive_class is not None:
        if policy.positive_class not in labels:
            return {"reason": f"the operating point's class {policy.positive_class!r} is not one of this model's "
                              f"classes ({', '.join(labels)})", "site_chosen": policy.chosen}
        index = labels.index(policy.positive_class)
    elif len(labels) == 2:
        index = 1
    else:
        return {"reason": f"{len(labels)} classes: the task must name the positive class "
                          "(`airlock models policy TASK --operating-class NAME`)", "site_chosen": policy.chosen}
    point: dict[str, Any] = {"class": labels[index], "class_index": index, "site_chosen": policy.chosen}
    if policy.threshold is not None:
        return {**point, "threshold": policy.threshold, "chosen_by": f"threshold {policy.threshold:g} (task policy)"}
    if policy.specificity is None:
        return {**point, "threshold": DEFAULT_THRESHOLD,
                "chosen_by": f"default threshold {DEFAULT_THRESHOLD:g} (the site has not chosen an operating point)"}
    if val_probabilities is None or val_targets is None:
        return {**point, "reason": "no validation images to set the threshold for the specificity target"}
    negatives = [float(p) for p, t in zip(val_probabilities[:, index].tolist(), val_targets.tolist(), strict=True)
                 if t != index]
    if not negatives:
        return {**point, "reason": f"no validation images outside class {labels[index]}: the threshold for "
                                   f"specificity {policy.specificity:g} cannot be set"}
    threshold = threshold_for_specificity(negatives, policy.specificity)
    return {**point, "threshold": threshold, "validation_negatives": len(negatives),
            "chosen_by": f"specificity {policy.specificity:g} on {len(negatives)} validation images outside "
                         f"class {labels[index]} (task policy)"}


def measure_operating_point(probabilities: Any, targets: Any, point: dict[str, Any]) -> dict[str, Any]:
    """Sensitivity and specificity with Wilson 95% CIs and the 2 x 2 confusion at `point` (from `resolve`).

    Unmeasurable parts are None with a reason: no positives (sensitivity), no negatives (specificity).
    """
    out = {k: point[k] for k in ("class", "threshold", "chosen_by", "site_chosen", "reason") if k in point}
    if "threshold" not in point:
        return {**out, "sensitivity": None, "sensitivity_ci": None, "specificity": None, "specificity_ci": None,
                "confusion": None}
    index, threshold = point["class_index"], point["threshold"]
    tp = fn = fp = tn = 0
    for score, truth in zip(probabilities[:, index].tolist(), targets.tolist(), strict=True):
        called = score >= threshold
        if truth == index:
            tp, fn = tp + called, fn + (not called)
        else:
            fp, tn = fp + called, tn + (not called)
    sensitivity_ci, specificity_ci = wilson_interval(tp, tp + fn), wilson_interval(tn, tn + fp)
    out.update({"sensitivity": tp / (tp + fn) if tp + fn else None,
                "sensitivity_ci": list(sensitivity_ci) if sensitivity_ci else None,
                "specificity": tn / (tn + fp) if tn + fp else None,
                "specificity_ci": list(specificity_ci) if specificity_ci else None,
                "confusion": {"tp": tp, "fn": fn, "fp": fp, "tn": tn}})
    if not tp + fn:
        out["reason"] = f"no test images of class {point['class']}: sensitivity not measured"
    elif not tn + fp:
        out["reason"] = f"every test image is of class {point['class']}: specificity not measured"
    return out


def expected_calibration_error(probabilities: Any, targets: Any, bins: int = ECE_BINS) -> float | None:
    """Top-label ECE over `bins` equal-width confidence bins; None for an empty split."""
    top = probabilities.max(1)
    confidences = (top.values if hasattr(top, "values") else top).tolist()  # a torch tensor or a numpy array
    predictions = probabilities.argmax(1).tolist()
    truth = targets.tolist()
    if not truth:
        return None
    totals = [[0, 0.0, 0] for _ in range(bins)]  # images, summed confidence, correct
    for confidence, predicted, actual in zip(confidences, predictions, truth, strict=True):
        b = min(int(confidence * bins), bins - 1)
        totals[b][0] += 1
        totals[b][1] += confidence
        totals[b][2] += predicted == actual
    return sum(abs(conf - correct) for n, conf, correct in totals if n) / len(truth)
