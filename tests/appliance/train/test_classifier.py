"""Image classifier: metrics are right on known inputs; real training separates two phantom classes."""

from __future__ import annotations

import math

import pytest

from appliance.base_models import resolve_base_model
from appliance.errors import ModelNotFoundError
from appliance.train.classifier import (
    ClassifierRecipe,
    augment,
    classification_metrics,
    roc_auc,
    train_classifier,
)
from appliance.train.recipe import RecipeError

LABELS = ["normal", "abnormal"]


def phantoms(n: int, seed: int, size: int = 32):
    """Half discs (normal), half squares (abnormal), noisy, as the data import stores them (float16, [0, 1])."""
    import torch

    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    images, labels = [], []
    for i in range(n):
        cy, cx = (torch.randint(10, size - 10, (2,), generator=g)).tolist()
        if i % 2 == 0:
            shape = ((yy - cy) ** 2 + (xx - cx) ** 2 <= 36).float()
        else:
            shape = (((yy - cy).abs() <= 5) & ((xx - cx).abs() <= 5)).float()
        noise = torch.rand(size, size, generator=g) * 0.3
        images.append((shape * 0.7 + noise).clamp(0, 1)[None])
        labels.append(i % 2)
    return torch.stack(images).half(), torch.tensor(labels)


def test_roc_auc_known_values():
    assert roc_auc([0.1, 0.4, 0.35, 0.8], [False, False, True, True]) == pytest.approx(0.75)
    assert roc_auc([0.5, 0.5, 0.5, 0.5], [False, True, False, True]) == pytest.approx(0.5)
    assert roc_auc([0.9, 0.8, 0.1], [True, True, False]) == 1.0
    assert math.isnan(roc_auc([0.2, 0.3], [True, True]))


def test_metrics_from_a_confusion_we_can_count():
    import torch

    probabilities = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4], [0.2, 0.8]])
    labels = torch.tensor([0, 0, 0, 1, 1])
    metrics = classification_metrics(probabilities, labels, LABELS)
    assert metrics.confusion == [[2, 1], [1, 1]]
    assert metrics.accuracy == pytest.approx(3 / 5)
    assert metrics.sensitivity == {"normal": pytest.approx(2 / 3), "abnormal": pytest.approx(1 / 2)}
    assert metrics.specificity == {"normal": pytest.approx(1 / 2), "abnormal": pytest.approx(2 / 3)}
    assert metrics.roc_auc == pytest.approx(roc_auc([0.1, 0.2, 0.7, 0.4, 0.8], [False, False, False, True, True]))


def test_augmentation_is_reproducible_and_stays_in_range():
    import torch

    images, _ = phantoms(4, seed=1)
    a = augment(images.float(), torch.Generator().manual_seed(3), 10.0)
    b = augment(images.float(), torch.Generator().manual_seed(3), 10.0)
    assert torch.equal(a, b) and a.shape == images.shape
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    assert not torch.equal(a, images.float())


def test_bad_recipe_and_wrong_model_kind():
    with pytest.raises(RecipeError, match="batch_size = 0 is outside"):
        ClassifierRecipe(batch_size=0)
    from appliance.base_models import load_causal_lm

    with pytest.raises(ModelNotFoundError, match="not a language model"):
        load_causal_lm(resolve_base_model("tiny-resnet-cls"))


def test_training_separates_two_phantom_classes():
    train, val, test = phantoms(96, seed=1), phantoms(32, seed=2), phantoms(32, seed=3)
    recipe = ClassifierRecipe(max_steps=60, batch_size=16, eval_every=20, lr=3e-3, seed=0)
    events = []
    result = train_classifier(resolve_base_model("tiny-resnet-cls"), train, val, recipe, labels=LABELS, test=test,
                              on_progress=events.append)
    assert result.steps == 60 and len(events) == 60
    assert result.best_val_auc is not None and result.best_val_auc > 0.9
    assert result.test is not None and result.test.accuracy > 0.8
    assert sum(map(sum, result.test.confusion)) == 32
    assert set(result.test.sensitivity) == set(LABELS)


@pytest.mark.slow  # ~20 real steps and 7 evaluations: 15-60 s on two shared cores
def test_early_stopping_ships_the_best_validation_weights_and_measures_test():
    from appliance.train.classifier import load_classifier, predict

    train, val, test = phantoms(64, seed=1), phantoms(32, seed=2), phantoms(16, seed=3)
    val = (val[0], 1 - val[1])  # the opposite mapping: once training learns its split, val AUC falls
    recipe = ClassifierRecipe(max_steps=60, batch_size=16, eval_every=3, lr=3e-3, seed=0, early_stopping_patience=2)
    base = resolve_base_model("tiny-resnet-cls")
    result = train_classifier(base, train, val, recipe, labels=LABELS, test=test)
    assert result.stopped_early and result.steps < 60
    # Measured: best 0.62 (step 15), last 0.54 (step 21).
    assert result.val_aucs[-1][1] < result.best_val_auc - 0.04
    assert result.test is not None  # measured although it stopped early

    shipped = load_classifier(base, len(LABELS), seed=99)
    shipped.load_state_dict(result.state_dict)
    assert classification_metrics(predict(shipped, val[0]), val[1], LABELS).roc_auc == pytest.approx(
        result.best_val_auc, abs=1e-6)
