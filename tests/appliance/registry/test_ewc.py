"""EWC on real training: the Fisher covers only trainable weights, and the penalty keeps a continued model near the
one it started from, so it forgets less of the old domain than the same training without it."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from appliance.base_models import resolve_base_model
from appliance.errors import AirlockError
from tests.appliance.registry.conftest import chats


def _weighted_distance(state: dict, anchor: dict, fisher: dict) -> float:
    return sum(float((fisher[k] * (state[k].float() - anchor[k]) ** 2).sum()) for k in fisher)


@pytest.fixture(scope="module")
def lm_domains():
    maintenance = [json.loads(line) for line in chats("maintenance")]
    radiology = [json.loads(line) for line in chats("radiology")]
    return {"a_train": maintenance[:60], "a_test": maintenance[60:90], "b_train": radiology[:60]}


def test_lm_fisher_is_estimated_on_the_lora_adapter_only(lm_domains):
    from appliance.train.ewc import estimate_ewc, lm_batch_loss
    from appliance.train.lm import build_lora_model, encode_records, make_batches
    from appliance.train.recipe import LoraRecipe

    recipe = LoraRecipe(rank=4, max_length=64, batch_size=4)
    model, tokenizer = build_lora_model(resolve_base_model("tiny-deepseek-r1"), recipe)
    batches = make_batches(encode_records(tokenizer, lm_domains["a_train"][:8], 64, "ewc"), recipe,
                           tokenizer.pad_token_id, order_seed=None)
    ewc = estimate_ewc(model, 10.0, batches, lambda b: lm_batch_loss(model, b, "cpu", None))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert set(ewc.fisher) == set(trainable) and all("lora_" in n for n in ewc.fisher)
    assert sum(p.numel() for p in model.parameters()) > 10 * ewc.summary()["parameters"]  # the base stays out
    assert ewc.summary()["parameters"] == sum(p.numel() for p in trainable.values())
    assert all(float(f.min()) >= 0 for f in ewc.fisher.values())
    # LoRA B starts at zero, so A gets no gradient at init; B does: the Fisher is not all zeros.
    assert ewc.summary()["fisher_max"] > 0 and ewc.batches == len(batches)
    assert ewc.penalty(model) == 0.0  # at theta* itself
    assert all(not p.requires_grad and p.grad is None for p in model.parameters() if not p.requires_grad)


def test_lm_ewc_pulls_towards_production_and_forgets_less(lm_domains):
    """v1 learns maintenance Q&A; continuing on radiology at lr 1e-2 without replay forgets it. The same run
    with EWC (Fisher from maintenance records) ends closer to v1 and keeps a lower maintenance test loss."""
    from appliance.registry.gates import evaluate_losses
    from appliance.train.ewc import estimate_ewc, lm_batch_loss
    from appliance.train.lm import build_lora_model, encode_records, make_batches, train_lora
    from appliance.train.recipe import LoraRecipe

    base = resolve_base_model("tiny-deepseek-r1")
    recipe = LoraRecipe(max_steps=12, eval_every=12, batch_size=4, max_length=64, lr=3e-3, seed=3)
    v1 = train_lora(base, lm_domains["a_train"], [], recipe).adapter_state
    hard = dataclasses.replace(recipe, lr=1e-2)
    old = lm_domains["a_train"][:32]
    plain = train_lora(base, lm_domains["b_train"], [], hard, init_adapter=v1, ewc_records=old)
    with_ewc = train_lora(base, lm_domains["b_train"], [], dataclasses.replace(hard, ewc_lambda=1e6),
                          init_adapter=v1, ewc_records=old)
    assert plain.ewc is None
    assert with_ewc.ewc["lambda"] == 1e6 and with_ewc.ewc["fisher_batches"] == 8 and with_ewc.ewc["last_penalty"] > 0

    # The Fisher the run used, measured again at v1 (eval mode draws no random numbers: the same numbers).
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    model, tokenizer = build_lora_model(base, hard)
    set_peft_model_state_dict(model, v1)
    batches = make_batches(encode_records(tokenizer, old, 64, "ewc"), hard, tokenizer.pad_token_id, order_seed=None)
    ewc = estimate_ewc(model, 1.0, batches, lambda b: lm_batch_loss(model, b, "cpu", None))
    names = {n.replace(".default", ""): n for n in ewc.fisher}  # parameter names -> adapter state-dict keys
    assert set(names) == set(get_peft_model_state_dict(model))
    fisher = {k: ewc.fisher[n] for k, n in names.items()}
    anchor = {k: ewc.anchor[n] for k, n in names.items()}
    assert len(fisher) == len(v1)
    far = _weighted_distance(plain.adapter_state, anchor, fisher)
    near = _weighted_distance(with_ewc.adapter_state, anchor, fisher)
    l2 = {name: math.sqrt(sum(float(((r.adapter_state[k] - v1[k]) ** 2).sum()) for k in v1))
          for name, r in (("plain", plain), ("ewc", with_ewc))}
    losses = {name: evaluate_losses(base, recipe, state, {"a": lm_domains["a_test"]})["a"]
              for name, state in (("v1", v1), ("plain", plain.adapter_state), ("ewc", with_ewc.adapter_state))}
    print(f"\nFisher-weighted distance to v1: {far:.3g} without EWC, {near:.3g} with; L2 {l2}; maintenance test "
          f"loss: v1 {losses['v1']:.4f}, plain {losses['plain']:.4f}, EWC {losses['ewc']:.4f}")
    assert near < 0.5 * far
    assert l2["ewc"] < l2["plain"]
    assert losses["plain"] > losses["v1"] * 1.2  # the plain continuation really forgets
    assert losses["ewc"] < losses["plain"] - 0.25 * (losses["plain"] - losses["v1"])  # a quarter less forgotten


def test_ewc_without_an_earlier_model_is_refused():
    from appliance.train.classifier import ClassifierRecipe, train_classifier
    from tests.appliance.train.test_classifier import phantoms

    with pytest.raises(AirlockError, match="EWC keeps training close to an earlier classifier"):
        train_classifier(resolve_base_model("tiny-resnet-cls"), phantoms(8, 1), phantoms(4, 2),
                         ClassifierRecipe(max_steps=1, ewc_lambda=5.0), labels=["normal", "abnormal"])


def test_classifier_ewc_pulls_towards_the_production_classifier():
    """The same continued training on inverted-contrast images, with and without EWC from the original images."""
    from appliance.train.classifier import ClassifierRecipe, train_classifier
    from tests.appliance.train.test_classifier import phantoms

    base = resolve_base_model("tiny-resnet-cls")
    labels = ["normal", "abnormal"]
    old = phantoms(64, 1)
    recipe = ClassifierRecipe(max_steps=20, eval_every=20, batch_size=16, lr=3e-3, augment=False)
    v1 = train_classifier(base, old, phantoms(16, 2), recipe, labels=labels).state_dict
    images, targets = phantoms(64, 5)
    new = ((1 - images.float()).half(), targets)
    hard = dataclasses.replace(recipe, lr=2e-2)
    results = {lam: train_classifier(base, new, phantoms(16, 2), dataclasses.replace(hard, ewc_lambda=lam),
                                     labels=labels, init_state=v1, ewc_data=old)
               for lam in (0.0, 1e6)}
    assert results[0.0].ewc is None and results[1e6].ewc["fisher_batches"] == 4
    trainable = [k for k in v1 if "running" not in k and "num_batches" not in k]
    moved = {lam: math.sqrt(sum(float(((r.state_dict[k].float() - v1[k].float()) ** 2).sum()) for k in trainable))
             for lam, r in results.items()}
    print(f"\nclassifier L2 distance to v1: {moved}")
    assert moved[1e6] < 0.7 * moved[0.0]
