"""What a retrain reads, and whether its result may replace production.

Data: the records imported since the production version's dataset version (all their splits),
plus a seeded replay sample of earlier train and val records, `replay` being the sample's share
of the mix (0.2: one earlier record for every four new ones). The sample is a pure function of
(seed, record hashes), so a resumed job reads exactly the same records.

Gates, in order, all recorded on the version:
1. forgetting: on every earlier frozen test split (the test records of each earlier dataset
   version; records keep their split forever), the candidate's test loss may rise at most
   `max_forgetting` relative to production's (0.05 = 5%; perplexity rises by exp(delta loss));
2. new data: on the new records' test split, the candidate's loss may rise at most
   `new_data_tolerance` relative to production's (default 0.01: improvement, or parity
   within 1%, so float noise and a tie do not reject);
3. engine parity, for tasks that deploy engines: measured by the retrain job after 1 and 2 pass
   (appliance.registry.engine_gate); `decide` leaves it `not_evaluated`.
Image classifiers are judged on ROC AUC and accuracy instead of loss (`decide_classifier`): on every
earlier test split neither may fall more than `max_forgetting` relative to production's, and on the
new test split neither more than `new_data_tolerance`. Once the site has chosen an operating point
(a specificity target or a threshold in the task policy), sensitivity there is judged the same way:
a retrain that keeps its AUC but misses more positives at the threshold the site reads is refused.
Each model's threshold for a specificity target is set on the retrain's validation images (the
same images for both), never on the test split that judges it; the entries carry both sides'
sensitivity with its Wilson 95% interval (appliance.train.operating_point).
A gate that has no records to measure on is `not_applicable` and says so; it does not block.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

PASS, FAIL, NOT_APPLICABLE = "pass", "fail", "not_applicable"


@dataclass
class RetrainData:
    """Decrypted records for one retrain (in memory only)."""

    train: list[dict[str, Any]] = field(default_factory=list)
    val: list[dict[str, Any]] = field(default_factory=list)
    frozen_tests: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    """split name (e.g. 'maint@v1/test') -> the test records of one earlier dataset version."""
    new_test: list[dict[str, Any]] = field(default_factory=list)
    new_test_name: str = ""
    counts: dict[str, int] = field(default_factory=dict)
    """new_train, replay_train, new_val, replay_val, earlier_train: numbers only."""
    ewc: list[Any] = field(default_factory=list)
    """Earlier train records (a seeded sample) on which the EWC Fisher is measured; empty without EWC."""


def replay_count(new: int, available: int, replay: float) -> int:
    """Earlier records to mix in so that they are `replay` of the mix, capped by what exists."""
    if replay <= 0 or new <= 0:
        return 0
    return min(available, round(new * replay / (1 - replay)))


def replay_sample(hashes: Sequence[str], count: int, seed: int) -> set[str]:
    """`count` record hashes chosen by a seeded hash order: the same every time for the same inputs."""
    ranked = sorted(hashes, key=lambda h: hashlib.sha256(f"replay/{seed}/{h}".encode()).digest())
    return set(ranked[:count])


def split_name(dataset: str, first: int, last: int | None = None) -> str:
    versions = f"v{first}" if last is None or last == first else f"v{first}-v{last}"
    return f"{dataset}@{versions}/test"


def select_records(rows: Sequence[tuple[str, int, str, Any]], *, dataset: str, since: int, last: int,
                   replay: float, seed: int, ewc_count: int = 0) -> RetrainData:
    """rows: (content hash, dataset version, split, record) in storage order, versions 1..last.

    `ewc_count`: also pick that many earlier train records (seeded, independent of replay) for the EWC Fisher.
    """
    new = [r for r in rows if since < r[1] <= last]
    old = [r for r in rows if r[1] <= since]
    data = RetrainData(new_test_name=split_name(dataset, since + 1, last))
    for split in ("train", "val"):
        fresh = [r for r in new if r[2] == split]
        earlier = [r for r in old if r[2] == split]
        chosen = replay_sample([r[0] for r in earlier], replay_count(len(fresh), len(earlier), replay), seed)
        picked = [r[3] for r in fresh] + [r[3] for r in earlier if r[0] in chosen]
        setattr(data, split, picked)
        data.counts[f"new_{split}"] = len(fresh)
        data.counts[f"replay_{split}"] = len(chosen)
        data.counts[f"earlier_{split}"] = len(earlier)
    for version in range(1, since + 1):
        tests = [r[3] for r in old if r[1] == version and r[2] == "test"]
        data.frozen_tests[split_name(dataset, version)] = tests
    data.new_test = [r[3] for r in new if r[2] == "test"]
    data.counts["new_test"] = len(data.new_test)
    if ewc_count:
        earlier = [r for r in old if r[2] == "train"]
        chosen = replay_sample([r[0] for r in earlier], min(ewc_count, len(earlier)), seed + 1)
        data.ewc = [r[3] for r in earlier if r[0] in chosen]
        data.counts["ewc_fisher"] = len(data.ewc)
    return data


@dataclass(frozen=True)
class SplitLoss:
    split: str
    records: int
    production: float | None
    candidate: float | None

    @property
    def relative_change(self) -> float | None:
        if self.production is None or self.candidate is None or self.production <= 0:
            return None
        return (self.candidate - self.production) / self.production

    def to_dict(self) -> dict[str, Any]:
        change = self.relative_change
        return {"split": self.split, "records": self.records,
                "production_loss": _round(self.production), "candidate_loss": _round(self.candidate),
                "production_perplexity": _round(_ppl(self.production)),
                "candidate_perplexity": _round(_ppl(self.candidate)),
                "relative_change": _round(change)}


def _ppl(loss: float | None) -> float | None:
    return None if loss is None else math.exp(min(loss, 50.0))


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


def _pct(value: float) -> str:
    return f"{value * 100:+.1f}%"


@dataclass(frozen=True)
class GateOutcome:
    passed: bool
    gates: dict[str, Any]
    reasons: list[str]


def decide(frozen: Sequence[SplitLoss], new: SplitLoss, *, max_forgetting: float, new_data_tolerance: float,
           deploys_engines: bool) -> GateOutcome:
    """The three gates over measured losses. Pure: same numbers in, same verdict and reasons out."""
    reasons: list[str] = []
    entries = []
    for split in frozen:
        entry = split.to_dict()
        change = split.relative_change
        if change is None:
            entry["status"] = NOT_APPLICABLE
            entry["reason"] = "no test records in this version" if split.records == 0 else "loss undefined"
        elif change > max_forgetting:
            entry["status"] = FAIL
            reasons.append(f"forgetting: {split.split} test loss {split.production:.4f} -> {split.candidate:.4f} "
                           f"({_pct(change)}, limit {_pct(max_forgetting)})")
        else:
            entry["status"] = PASS
        entries.append(entry)
    measured = [e for e in entries if e["status"] != NOT_APPLICABLE]
    forgetting: dict[str, Any] = {
        "status": (FAIL if any(e["status"] == FAIL for e in entries) else PASS) if measured else NOT_APPLICABLE,
        "metric": "test loss, relative change", "max_relative_increase": max_forgetting, "splits": entries}
    if not measured:
        forgetting["reason"] = "no earlier test split has records to measure"

    new_entry: dict[str, Any] = {**new.to_dict(), "metric": "test loss, relative change",
                                 "max_relative_increase": new_data_tolerance}
    change = new.relative_change
    if change is None:
        new_entry["status"] = NOT_APPLICABLE
        new_entry["reason"] = "the new records have no test split yet (small imports may land in train/val only)"
    elif change > new_data_tolerance:
        new_entry["status"] = FAIL
        reasons.append(f"new data: {new.split} test loss {new.production:.4f} -> {new.candidate:.4f} "
                       f"({_pct(change)}, must not rise more than {_pct(new_data_tolerance)})")
    else:
        new_entry["status"] = PASS

    gates = {"forgetting": forgetting, "new_data": new_entry, "engine_parity": _engine_placeholder(deploys_engines)}
    return GateOutcome(not reasons, gates, reasons)


def _engine_placeholder(deploys_engines: bool) -> dict[str, Any]:
    if deploys_engines:
        return {"status": "not_evaluated", "reason": "measured by the retrain job once the other gates pass"}
    return {"status": NOT_APPLICABLE, "reason": "the task does not deploy QAT/TensorRT engines"}


def with_engine_gate(outcome: GateOutcome, engine: dict[str, Any], reasons: Sequence[str]) -> GateOutcome:
    """The outcome with gate 3 filled in (appliance.registry.engine_gate)."""
    all_reasons = [*outcome.reasons, *reasons]
    return GateOutcome(not all_reasons, {**outcome.gates, "engine_parity": engine}, all_reasons)


# --- image classifiers ---------------------------------------------------------------------------------------------

CLASSIFIER_METRICS = {"roc_auc": "AUC", "accuracy": "accuracy", "sensitivity": "sensitivity at the operating point"}


def classifier_scores(probabilities: Any, targets: Any, labels: list[str], point: dict[str, Any] | None
                      ) -> dict[str, Any] | None:
    """One model's gate numbers on one split (None for an empty split): AUC, accuracy, ECE, the operating point.

    `sensitivity` (a gated metric) is there only when the site chose the operating point and the split has
    positives; `operating_point` always says what was measured there, or why not.
    """
    from appliance.train.classifier import classification_metrics

    if probabilities.shape[0] == 0:
        return None
    measured = classification_metrics(probabilities, targets, labels, point).to_dict()
    out = {"roc_auc": measured["roc_auc"], "accuracy": measured["accuracy"], "ece": measured["ece"],
           "operating_point": measured["operating_point"]}
    op = measured["operating_point"] or {}
    if op.get("site_chosen") and op.get("sensitivity") is not None:
        out["sensitivity"] = op["sensitivity"]
    return out


@dataclass(frozen=True)
class SplitScores:
    """A classifier's scores on one test split per model (`classifier_scores`; None if empty)."""

    split: str
    records: int
    production: dict[str, Any] | None
    candidate: dict[str, Any] | None

    def changes(self) -> dict[str, float]:
        """Relative change per metric that both models have (AUC is undefined on a one-class split)."""
        out = {}
        for metric in CLASSIFIER_METRICS:
            before = (self.production or {}).get(metric)
            after = (self.candidate or {}).get(metric)
            if before is not None and after is not None and math.isfinite(before) and math.isfinite(after) \
                    and before > 0:
                out[metric] = (after - before) / before
        return out

    def to_dict(self) -> dict[str, Any]:
        changes = self.changes()
        entry: dict[str, Any] = {"split": self.split, "records": self.records}
        for metric in CLASSIFIER_METRICS:
            entry[f"production_{metric}"] = _round(_finite((self.production or {}).get(metric)))
            entry[f"candidate_{metric}"] = _round(_finite((self.candidate or {}).get(metric)))
            entry[f"{metric}_change"] = _round(changes.get(metric))
        for side, scores in (("production", self.production), ("candidate", self.candidate)):
            if (scores or {}).get("operating_point"):
                entry[f"{side}_operating_point"] = scores["operating_point"]
        entry["relative_change"] = _round(min(changes.values())) if changes else None  # the worst metric
        return entry


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _with_ci(scores: dict[str, Any], metric: str) -> str:
    text = f"{scores[metric]:.4f}"
    ci = (scores.get("operating_point") or {}).get("sensitivity_ci") if metric == "sensitivity" else None
    return f"{text} (95% CI {ci[0]:.2f}-{ci[1]:.2f})" if ci else text


def _score_failures(scores: SplitScores, limit: float, label: str) -> list[str]:
    out = []
    for metric, change in scores.changes().items():
        if change < -limit:
            name = CLASSIFIER_METRICS[metric]
            if metric == "sensitivity":
                op = scores.candidate.get("operating_point") or {}
                name += f" ({op.get('class')}, {op.get('chosen_by')})"
            out.append(f"{label}: {scores.split} {name} {_with_ci(scores.production, metric)} -> "
                       f"{_with_ci(scores.candidate, metric)} ({_pct(change)}, limit {_pct(-limit)})")
    return out


def _metric_names(splits: Sequence[SplitScores]) -> str:
    gated = any("sensitivity" in s.changes() for s in splits)
    return ("ROC AUC, accuracy and sensitivity at the operating point" if gated else "ROC AUC and accuracy") \
        + ", relative change"


def decide_classifier(frozen: Sequence[SplitScores], new: SplitScores, *, max_forgetting: float,
                      new_data_tolerance: float, deploys_engines: bool,
                      operating_point: str | None = None) -> GateOutcome:
    """Gates 1 and 2 for image classifiers, on ROC AUC, accuracy and (once the site chose one) sensitivity at
    the operating point, all higher-is-better. Pure, like `decide`. `operating_point`: the policy in words."""
    reasons: list[str] = []
    entries = []
    for split in frozen:
        entry = split.to_dict()
        failures = _score_failures(split, max_forgetting, "forgetting")
        if not split.changes():
            entry["status"] = NOT_APPLICABLE
            entry["reason"] = "no test images in this version" if split.records == 0 else "metrics undefined"
        else:
            entry["status"] = FAIL if failures else PASS
        reasons += failures
        entries.append(entry)
    measured = [e for e in entries if e["status"] != NOT_APPLICABLE]
    forgetting: dict[str, Any] = {
        "status": (FAIL if any(e["status"] == FAIL for e in entries) else PASS) if measured else NOT_APPLICABLE,
        "metric": _metric_names(frozen), "max_relative_decrease": max_forgetting,
        "max_relative_increase": max_forgetting, "splits": entries}
    if operating_point is not None:
        forgetting["operating_point"] = operating_point
    if not measured:
        forgetting["reason"] = "no earlier test split has images to measure"
    new_entry: dict[str, Any] = {**new.to_dict(), "metric": _metric_names([new]),
                                 "max_relative_decrease": new_data_tolerance,
                                 "max_relative_increase": new_data_tolerance}
    failures = _score_failures(new, new_data_tolerance, "new data")
    if not new.changes():
        new_entry["status"] = NOT_APPLICABLE
        new_entry["reason"] = "the new images have no test split yet (small imports may land in train/val only)"
    else:
        new_entry["status"] = FAIL if failures else PASS
    reasons += failures
    gates = {"forgetting": forgetting, "new_data": new_entry, "engine_parity": _engine_placeholder(deploys_engines)}
    return GateOutcome(not reasons, gates, reasons)


def evaluate_losses(base: Any, recipe: Any, adapter_state: dict[str, Any], splits: dict[str, list[dict[str, Any]]],
                    ) -> dict[str, float | None]:
    """Token-weighted test loss of base + adapter on each split (None for an empty split). Loads the model once."""
    from peft import set_peft_model_state_dict

    from appliance.train.lm import _device_and_dtype, build_lora_model, encode_records, evaluate_loss, make_batches

    device, autocast_dtype = _device_and_dtype(recipe)
    model, tokenizer = build_lora_model(base, recipe)
    set_peft_model_state_dict(model, adapter_state)
    model.to(device).eval()
    out: dict[str, float | None] = {}
    for name, records in splits.items():
        if not records:
            out[name] = None
            continue
        batches = make_batches(encode_records(tokenizer, records, recipe.max_length, name), recipe,
                               tokenizer.pad_token_id, order_seed=None)
        loss = evaluate_loss(model, batches, device, autocast_dtype)
        out[name] = loss if math.isfinite(loss) else None
    del model
    return out
