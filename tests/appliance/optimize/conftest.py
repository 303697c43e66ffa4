"""Shared, expensive-once fixtures: a tiny classifier trained on phantoms, the tiny LM with a LoRA adapter merged,
and both quantized (PTQ + QAT). Session-scoped; tests that change a model take a deep copy."""

from __future__ import annotations

import copy
import dataclasses
import json
from typing import Any

import pytest

from tests.conftest import REPO

LABELS = ["normal", "abnormal"]
IMAGE_SHAPE = (1, 32, 32)
CLASSIFIER_STEPS, CLASSIFIER_LR = 60, 3e-3
LM_STEPS, LM_LR = 40, 3e-3
PLAN = b"a serialized TensorRT plan"


def machine(gpu: str, sm: str, tensorrt: str, cuda: str, driver: str) -> Any:
    from appliance.optimize.engine_sidecar import MachineInfo

    return MachineInfo(gpu, sm, tensorrt, cuda, driver)


A100 = machine("NVIDIA A100-SXM4-80GB", "8.0", "10.13.0.35", "12.8", "570.86.15")
H100 = machine("NVIDIA H100 80GB HBM3", "9.0", "11.1.0", "13.0", "580.65.06")


def sidecar_for(built_on: Any, **options: Any) -> dict[str, Any]:
    """The sidecar `build_engine` would write for an engine built on `built_on` (no GPU needed)."""
    from appliance.optimize.engine_sidecar import make_sidecar
    from appliance.optimize.tensorrt_engine import EngineBuildOptions

    return make_sidecar(machine=built_on, onnx_bytes=b"onnx", plan_bytes=PLAN, variant="int8",
                        profiles=[{"pixel_values": [[1, 1, 32, 32], [8, 1, 32, 32], [32, 1, 32, 32]]}],
                        io=[{"name": "pixel_values", "mode": "input", "dtype": "float", "shape": [-1, 1, 32, 32]}],
                        options={**dataclasses.asdict(EngineBuildOptions()), **options},
                        quant_recipe={"calibration": "max"})


def phantoms(n: int, seed: int, size: int = 32) -> tuple[Any, Any]:
    """Discs (normal) and squares (abnormal) at random places, noisy, float16 in [0, 1] as imports store them."""
    import torch

    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    images, labels = [], []
    for i in range(n):
        cy, cx = torch.randint(9, size - 9, (2,), generator=g).tolist()
        if i % 2 == 0:
            shape = ((yy - cy) ** 2 + (xx - cx) ** 2 <= 36).float()
        else:
            shape = (((yy - cy).abs() <= 5) & ((xx - cx).abs() <= 5)).float()
        noise = torch.rand(size, size, generator=g) * 0.3
        images.append((shape * 0.7 + noise).clamp(0, 1)[None])
        labels.append(i % 2)
    return torch.stack(images).half(), torch.tensor(labels)


@pytest.fixture(scope="session")
def classifier_data() -> dict[str, tuple[Any, Any]]:
    return {"train": phantoms(128, seed=1), "val": phantoms(64, seed=2), "test": phantoms(64, seed=3)}


@pytest.fixture(scope="session")
def trained_classifier_state(classifier_data) -> dict[str, Any]:
    """tiny-resnet-cls (random init, config only in models/) trained for a few steps with the real training code."""
    from appliance.base_models import resolve_base_model
    from appliance.train.classifier import ClassifierRecipe, train_classifier

    recipe = ClassifierRecipe(max_steps=CLASSIFIER_STEPS, batch_size=16, eval_every=CLASSIFIER_STEPS,
                              lr=CLASSIFIER_LR, seed=0)
    result = train_classifier(resolve_base_model("tiny-resnet-cls"), classifier_data["train"],
                              classifier_data["val"], recipe, labels=LABELS)
    return result.state_dict


def load_trained_classifier(state: dict[str, Any]) -> Any:
    from appliance.base_models import resolve_base_model
    from appliance.train.classifier import load_classifier

    model = load_classifier(resolve_base_model("tiny-resnet-cls"), len(LABELS), seed=0)
    model.load_state_dict(state)
    return model.eval()


@pytest.fixture(scope="session")
def quantized_classifier(trained_classifier_state, classifier_data) -> Any:
    """QuantizationResult: PTQ then QAT (10% of the steps at 1% of the LR) of the trained classifier."""
    from appliance.optimize.quantize import quantize_classifier
    from appliance.optimize.recipe import QuantRecipe

    model = load_trained_classifier(trained_classifier_state)
    return quantize_classifier(model, train=classifier_data["train"], val=classifier_data["val"], labels=LABELS,
                               recipe=QuantRecipe(calibration="max"), original_steps=CLASSIFIER_STEPS,
                               original_lr=CLASSIFIER_LR)


@pytest.fixture(scope="session")
def int8_classifier_onnx(quantized_classifier) -> bytes:
    from appliance.optimize.onnx_export import export_classifier_onnx

    return export_classifier_onnx(quantized_classifier.model, variant="int8", image_shape=IMAGE_SHAPE)


def corpus_texts() -> list[str]:
    lines = (REPO / "models" / "corpus" / "corpus.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["text"] for line in lines if '"text"' in line]


@pytest.fixture(scope="session")
def lora_merged_lm() -> dict[str, Any]:
    """tiny-deepseek-r1 with a fresh LoRA adapter (non-zero B, so merging changes the weights), merged; the adapter's
    peft state dict and LoraConfig too (the adapter-file route, test_genai_adapters.py)."""
    import torch
    from peft import get_peft_model_state_dict

    from appliance.base_models import resolve_base_model
    from appliance.optimize.quantize import load_merged_causal_lm
    from appliance.train.lm import build_lora_model
    from appliance.train.recipe import LoraRecipe

    base = resolve_base_model("tiny-deepseek-r1")
    recipe = LoraRecipe(rank=8, alpha=16, dropout=0.0, seed=0)
    peft_model, tokenizer = build_lora_model(base, recipe)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.02, generator=torch.Generator().manual_seed(len(name)))
    adapter = {k: v.clone() for k, v in get_peft_model_state_dict(peft_model).items()}
    probe = torch.tensor([[0, 17, 230, 41, 9, 300]])
    with torch.no_grad():
        peft_logits = peft_model.eval()(input_ids=probe).logits
    lora_config = peft_model.peft_config["default"]
    merged, _ = load_merged_causal_lm(base, adapter, recipe)
    return {"model": merged, "tokenizer": tokenizer, "probe": probe, "peft_logits": peft_logits,
            "adapter": adapter, "lora_config": lora_config}


@pytest.fixture(scope="session")
def lm_data(lora_merged_lm) -> dict[str, Any]:
    """Batches the way the training code makes them (packed MicroBatch.tensors()), and held-out prompts."""
    from appliance.train.lm import encode_records, make_batches
    from appliance.train.recipe import LoraRecipe

    tokenizer = lora_merged_lm["tokenizer"]
    texts = corpus_texts()
    recipe = LoraRecipe(batch_size=2, max_length=96)

    def batches(records: list[str]) -> list[dict[str, Any]]:
        examples = encode_records(tokenizer, [{"text": t} for t in records], recipe.max_length, "optimize")
        return [b.tensors() for b in make_batches(examples, recipe, tokenizer.pad_token_id, order_seed=None)]

    prompts = [tokenizer(tokenizer.bos_token + t, add_special_tokens=False)["input_ids"][:12] for t in texts[900:903]]
    return {"calibration": batches(texts[:24]), "train": batches(texts[24:48]), "eval": batches(texts[600:620]),
            "prompts": prompts}


@pytest.fixture(scope="session")
def quantized_lm(lora_merged_lm, lm_data) -> Any:
    from appliance.optimize.quantize import quantize_causal_lm
    from appliance.optimize.recipe import QuantRecipe

    model = copy.deepcopy(lora_merged_lm["model"])
    return quantize_causal_lm(model, calibration_batches=lm_data["calibration"], train_batches=lm_data["train"],
                              eval_batches=lm_data["eval"], recipe=QuantRecipe(calibration="percentile"),
                              original_steps=LM_STEPS, original_lr=LM_LR)
