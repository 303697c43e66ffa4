"""Gates a radiologist would accept: sensitivity at the site's operating point, and the card that says why.

The retrain job's own functions on constructed score tensors (no training, so the numbers are exact):
`operating_point.resolve` sets each model's threshold on the same validation images, `gates.classifier_scores`
measures both models on a frozen test split, `gates.decide_classifier` judges, and the version goes through the
real catalog into `airlock models card`'s blocks. The story: a retrain keeps its AUC within the 5% forgetting
tolerance (0.96 -> 0.92) and its accuracy (0.75 -> 0.75), but four abnormal studies drop below the threshold
that gives the department its 90% specificity: sensitivity 1.00 -> 0.60. The AUC gate alone would pass it.
"""

from __future__ import annotations

import re

import pytest

from appliance.catalog import open_catalog
from appliance.registry import gates
from appliance.registry.card import card_blocks, to_html, to_markdown
from appliance.registry.versions import (
    ModelVersion,
    RegistryError,
    get_task,
    insert_version,
    now,
    set_policy,
)
from appliance.train.operating_point import OperatingPolicy, resolve
from tests.conftest import run_cli

ADMIN = "admin (os:test)"
LABELS = ["normal", "abnormal"]
# Negatives (normal studies), the same on validation and test for both models: nine low, one at 0.52.
NEGATIVES = [0.02, 0.06, 0.10, 0.14, 0.18, 0.22, 0.26, 0.30, 0.34, 0.52]
# 90% specificity on these: one negative may score above the threshold -> just above 0.34.
PRODUCTION_POSITIVES = [0.36, 0.38, 0.40, 0.42, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99]
# AUC: 4 x 9 + 6 x 10 = 96 of 100 pairs. Accuracy at arg-max: 6 positives + 9 negatives of 20 = 0.75.
CANDIDATE_POSITIVES = [0.31, 0.32, 0.33, 0.335, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99]
# AUC: 4 x 8 + 60 = 92 of 100 (-4.2%, inside 5%); accuracy 0.75 (the four were below 0.5 before too);
# sensitivity at the threshold 6/10 (-40%).


def _split(positives: list[float]):
    import torch

    p = torch.tensor(NEGATIVES + positives, dtype=torch.float32)
    return torch.stack([1 - p, p], 1), torch.tensor([0] * len(NEGATIVES) + [1] * len(positives))


def _judge(policy: OperatingPolicy, *, max_forgetting: float = 0.05) -> tuple[gates.GateOutcome, dict, dict]:
    """Both models through the retrain job's gate functions, on a validation split and one frozen test split."""
    production, candidate = _split(PRODUCTION_POSITIVES), _split(CANDIDATE_POSITIVES)
    # Validation images: only the normal ones set a specificity threshold, and both models score them as
    # NEGATIVES; the same tensors stand in for them here.
    points = {"production": resolve(policy, LABELS, *production), "candidate": resolve(policy, LABELS, *candidate)}
    scores = {side: gates.classifier_scores(*split, LABELS, points[side])
              for side, split in (("production", production), ("candidate", candidate))}
    frozen = gates.SplitScores("chest@v1/test", 20, scores["production"], scores["candidate"])
    outcome = gates.decide_classifier([frozen], gates.SplitScores("chest@v2/test", 0, None, None),
                                      max_forgetting=max_forgetting, new_data_tolerance=0.01,
                                      deploys_engines=False, operating_point=policy.describe())
    return outcome, scores, points


def test_a_retrain_that_keeps_auc_but_loses_sensitivity_at_the_operating_point_is_rejected():
    outcome, scores, points = _judge(OperatingPolicy("abnormal", specificity=0.9))
    assert 0.34 < points["production"]["threshold"] < 0.3401  # same validation negatives, same threshold
    assert points["candidate"]["threshold"] == points["production"]["threshold"]
    assert scores["production"]["roc_auc"] == pytest.approx(0.96)
    assert scores["candidate"]["roc_auc"] == pytest.approx(0.92)
    assert scores["production"]["accuracy"] == scores["candidate"]["accuracy"] == pytest.approx(0.75)
    assert (scores["production"]["sensitivity"], scores["candidate"]["sensitivity"]) == (1.0, 0.6)
    [split] = outcome.gates["forgetting"]["splits"]
    assert split["status"] == "fail" and split["roc_auc_change"] == pytest.approx(-0.041667, abs=1e-6)
    assert split["accuracy_change"] == 0.0 and split["sensitivity_change"] == pytest.approx(-0.4)
    assert split["candidate_operating_point"]["confusion"] == {"tp": 6, "fn": 4, "fp": 1, "tn": 9}
    assert not outcome.passed and outcome.reasons == [
        "forgetting: chest@v1/test sensitivity at the operating point (abnormal, specificity 0.9 on 10 validation "
        "images outside class abnormal (task policy)) 1.0000 (95% CI 0.72-1.00) -> 0.6000 (95% CI 0.31-0.83) "
        "(-40.0%, limit -5.0%)"]
    assert outcome.gates["forgetting"]["metric"] == \
        "ROC AUC, accuracy and sensitivity at the operating point, relative change"

    # The same two models where the site has not chosen an operating point: AUC and accuracy alone pass it.
    unchosen, unchosen_scores, _ = _judge(OperatingPolicy())
    assert unchosen.passed and "sensitivity" not in unchosen_scores["candidate"]
    assert unchosen_scores["candidate"]["operating_point"]["site_chosen"] is False
    # A tolerance above the drop lets it through: the gate is the task's tolerance, not a fixed rule.
    assert _judge(OperatingPolicy("abnormal", specificity=0.9), max_forgetting=0.45)[0].passed


def test_a_fixed_threshold_catches_a_retrain_with_the_very_same_auc():
    """Threshold 0.3 (a triage worklist): scores squeezed below 0.5 keep every ranking, hence AUC and accuracy."""
    import torch

    policy = OperatingPolicy(threshold=0.3)
    production = _split(PRODUCTION_POSITIVES)
    squeezed = torch.where(production[0][:, 1] < 0.5, production[0][:, 1] ** 2 * 2, production[0][:, 1])
    candidate = torch.stack([1 - squeezed, squeezed], 1), production[1]  # monotone: the same order
    point = resolve(policy, LABELS)
    before = gates.classifier_scores(*production, LABELS, point)
    after = gates.classifier_scores(*candidate, LABELS, point)
    assert after["roc_auc"] == before["roc_auc"] and after["accuracy"] == before["accuracy"]
    outcome = gates.decide_classifier([gates.SplitScores("chest@v1/test", 20, before, after)],
                                      gates.SplitScores("chest@v2/test", 0, None, None), max_forgetting=0.05,
                                      new_data_tolerance=0.01, deploys_engines=False)
    # 0.36..0.42 squared x 2 = 0.26..0.35: 0.36 and 0.38 fall below 0.3 -> sensitivity 1.0 -> 0.8.
    assert after["sensitivity"] == pytest.approx(0.8) and not outcome.passed
    assert outcome.reasons[0].startswith("forgetting: chest@v1/test sensitivity at the operating point (abnormal, "
                                         "threshold 0.3 (task policy)) 1.0000 (95% CI 0.72-1.00) -> 0.8000")


def _classifier_version(db, number: int, state: str, outcome: gates.GateOutcome, test: dict) -> ModelVersion:
    from appliance.data import datasets
    from appliance.data.datasets import Dataset
    from appliance.jobs.records import create_job
    from appliance.registry.versions import ensure_task
    from appliance.train import runs

    if datasets.find(db, "chest") is None:
        datasets.insert(db, Dataset("ds-chest-0001", "chest", "dicom", "medical", "seed", "60/20/20", "active",
                                    now(), "tester"))
    job = create_job(db, "retrain", {"run": f"cls-{number}"}, actor="tester")  # a row only: nothing is launched
    run = runs.Run(f"cls-{number}", "classifier", "chest-cls", job.id, "tiny-resnet-cls", "b" * 64, "ds-chest-0001",
                   "chest", 1, "c" * 64, {"lr": 0.001, "max_steps": 60}, "r" * 64, "succeeded", {}, {},
                   f"run-cls-{number}", None, now(), now(), now(), "tester")
    runs.insert_run(db, run)
    ensure_task(db, "chest-cls", run, actor=ADMIN)
    return insert_version(db, ModelVersion(
        f"chest-cls-v{number}", "chest-cls", "classifier", number, state, run.id,
        "chest-cls-v1" if number > 1 else None, run.base_model, run.base_hash,
        [{"dataset_id": run.dataset_id, "name": "chest", "version": 1, "content_hash": "c" * 64}], run.recipe_hash,
        "0.1.0", {"test": test}, {"classifier": {"object": run.artifact, "file": "classifier.safetensors",
                                                 "sha256": "a" * 64, "bytes": 10}},
        now(), ADMIN, outcome.gates, list(outcome.reasons), now()))


def _formatted_none(text: str) -> bool:
    """A Python None printed into the text (the card's own sentence "None yet: no QAT ..." is English)."""
    return "None" in text.replace("None yet:", "")


def test_the_card_shows_the_operating_point_the_confusion_there_calibration_and_why_it_was_rejected(airlock_home):
    db = open_catalog()
    outcome, scores, _ = _judge(OperatingPolicy("abnormal", specificity=0.9))
    _classifier_version(db, 1, "candidate", gates.GateOutcome(True, {}, []), scores["production"])
    _classifier_version(db, 2, "rejected", outcome, scores["candidate"])
    card = to_markdown(card_blocks(db, "chest-cls-v2"))
    assert "## Operating point and calibration" in card
    assert "Positive class abnormal; threshold 0.3400 on its probability, from specificity 0.9 on 10 validation " \
           "images outside class abnormal (task policy)." in card
    assert "| sensitivity | 0.6000 | 0.3127-0.8318 |" in card and "| specificity | 0.9000 | 0.5958-0.9821 |" in card
    assert "| true class | called abnormal | called not abnormal |" in card
    assert "| abnormal | 6 | 4 |" in card and "| not abnormal | 1 | 9 |" in card
    ece = scores["candidate"]["ece"]
    assert 0 < ece < 1 and f"expected calibration error {ece:.4f}" in card
    assert "| test sensitivity at the operating point | 0.6000 | 1.0000 | -0.4000 |" in card
    assert "sensitivity 1.0000 (95% CI 0.72-1.00) at threshold 0.3400" in card  # production, in the gate row
    assert "sensitivity 0.6000 (95% CI 0.31-0.83) at threshold 0.3400" in card  # this version
    assert f"- rejected: {outcome.reasons[0]}" in card
    assert "Operating point the gates read (task policy at the retrain): abnormal at specificity 0.9" in card
    assert not _formatted_none(card) and not re.search(r"\bnan\b", card, re.IGNORECASE)
    assert "<h2>Operating point and calibration</h2>" in to_html(card_blocks(db, "chest-cls-v2"))

    # A version measured on test images of one class: "not measured", with the reason, never None.
    import torch

    one_class = gates.classifier_scores(torch.tensor([[0.9, 0.1], [0.8, 0.2]]), torch.tensor([0, 0]), LABELS,
                                        resolve(OperatingPolicy(threshold=0.3), LABELS))
    _classifier_version(db, 3, "candidate", gates.GateOutcome(True, {}, []), one_class)
    card3 = to_markdown(card_blocks(db, "chest-cls-v3"))
    assert "| sensitivity | not measured | not measured |" in card3
    assert "Not measured: no test images of class abnormal: sensitivity not measured." in card3
    assert not _formatted_none(card3)


def test_operating_point_policy_is_stored_validated_and_audited(airlock_home):
    db = open_catalog()
    outcome, scores, _ = _judge(OperatingPolicy())
    _classifier_version(db, 1, "candidate", outcome, scores["production"])
    task = set_policy(db, "chest-cls", actor=ADMIN, operating_class="abnormal", operating_specificity=0.9)
    assert (task.operating_class, task.operating_specificity, task.operating_threshold) == ("abnormal", 0.9, None)
    assert OperatingPolicy.of_task(task).describe().startswith("abnormal at specificity 0.9")
    task = set_policy(db, "chest-cls", actor=ADMIN, operating_threshold=0.3)  # the newer kind replaces the other
    assert (task.operating_class, task.operating_specificity, task.operating_threshold) == ("abnormal", None, 0.3)
    for bad, message in (({"operating_specificity": 1.0}, "outside 0..1"),
                         ({"operating_specificity": 0.9, "operating_threshold": 0.3}, "not both")):
        with pytest.raises(RegistryError, match=message):
            set_policy(db, "chest-cls", actor=ADMIN, **bad)
    with pytest.raises(RegistryError, match="cleared and set"):
        set_policy(db, "chest-cls", actor=ADMIN, clear_operating_point=True, operating_threshold=0.2)
    cleared = set_policy(db, "chest-cls", actor=ADMIN, clear_operating_point=True)
    assert (cleared.operating_class, cleared.operating_specificity, cleared.operating_threshold) == (None,) * 3
    assert get_task(db, "chest-cls") == cleared
    audited = [r[0] for r in db.execute("SELECT details FROM audit_log WHERE action = 'models.policy'")]
    assert len(audited) == 3 and '"operating_threshold":null' in audited[-1].replace(" ", "")

    shown = run_cli("models", "policy", "chest-cls")
    assert shown.returncode == 0, shown.stderr
    assert "operating point" in shown.stdout and "not set" in shown.stdout and "None" not in shown.stdout
