"""INT8 quantization of a fine-tuned model, top to bottom: merge, fold, insert fake quant, calibrate, PTQ, QAT.

    model, tokenizer = load_merged_causal_lm(base, adapter_state, lora_recipe)   # LoRA merged first
    result = quantize_causal_lm(model, calibration_batches=cal, train_batches=train, eval_batches=val,
                                recipe=QuantRecipe(), original_steps=200, original_lr=2e-4)
    result.report   # float vs PTQ vs QAT perplexity;  result.model -> export_causal_lm_onnx(..., variant="int8")

    result = quantize_classifier(model, train=(images, labels), val=(images, labels), labels=["normal", "abnormal"],
                                 recipe=QuantRecipe(), original_steps=200, original_lr=1e-3)

The model is changed in place and in order (float metrics, then PTQ, then QAT on top of PTQ), so
a large model is never held twice. PTQ is calibration only; QAT then fine-tunes the fake-quantized
weights for `recipe.qat_steps(original_steps)` steps at `recipe.qat_lr(original_lr)`. The report
always has the float model's numbers beside both, so an operator can see what INT8 costs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from appliance.optimize.errors import OptimizeError
from appliance.optimize.recipe import QuantRecipe

Progress = Callable[[dict[str, Any]], None]


@dataclass
class QuantizationResult:
    model: Any
    """The fake-quantized model: QAT when the recipe asks for it, else PTQ. Export it as the "int8" variant."""
    report: dict[str, Any] = field(default_factory=dict)
    """float / ptq / qat metrics, the recipe, QAT steps and learning rate, layers quantized."""


# --- LoRA ------------------------------------------------------------------------------------------------------------

def merge_lora(peft_model: Any) -> Any:
    """Fold LoRA adapters into the base weights (peft `merge_and_unload`): quantization sees the weights that serve."""
    merge = getattr(peft_model, "merge_and_unload", None)
    if merge is None:
        return peft_model  # already a plain model
    merged = merge()
    leftover = [name for name, _ in merged.named_modules() if "lora_" in name]
    if leftover:
        raise OptimizeError(f"LoRA layers remain after merging ({leftover[0]})",
                            hint="the adapter uses a layer type peft cannot merge; export the float model instead")
    return merged


def load_merged_causal_lm(base: Any, adapter_state: dict[str, Any], lora_recipe: Any) -> tuple[Any, Any]:
    """The base model with a trained adapter (peft state dict) merged in, in eval mode, and its tokenizer."""
    from peft import set_peft_model_state_dict

    from appliance.train.lm import build_lora_model

    model, tokenizer = build_lora_model(base, lora_recipe)
    result = set_peft_model_state_dict(model, adapter_state)
    if getattr(result, "unexpected_keys", None):
        raise OptimizeError(f"the adapter has weights this model does not ({result.unexpected_keys[0]})",
                            hint="the adapter was trained on another base model or recipe")
    return merge_lora(model).eval(), tokenizer


# --- classifiers -----------------------------------------------------------------------------------------------------

def _fit_channels(images: Any, channels: int) -> Any:
    if images.shape[1] == 1 and channels != 1:
        return images.expand(-1, channels, -1, -1)  # grey DICOM into an RGB model
    return images


def classifier_probabilities(model: Any, images: Any, batch_size: int = 64) -> Any:
    import torch

    was_training = model.training
    model.eval()
    outputs = []
    with torch.no_grad():
        for start in range(0, images.shape[0], batch_size):
            chunk = _fit_channels(images[start:start + batch_size].float(), model.config.num_channels)
            outputs.append(model(pixel_values=chunk).logits.float().softmax(-1))
    model.train(was_training)
    return torch.cat(outputs)


def _classifier_metrics(model: Any, data: tuple[Any, Any], labels: list[str]) -> dict[str, Any]:
    from appliance.train.classifier import classification_metrics

    metrics = classification_metrics(classifier_probabilities(model, data[0]), data[1], labels)
    return {"accuracy": metrics.accuracy, "roc_auc": metrics.to_dict()["roc_auc"], "confusion": metrics.confusion}


def quantize_classifier(model: Any, *, train: tuple[Any, Any], val: tuple[Any, Any], labels: list[str],
                        recipe: QuantRecipe, original_steps: int, original_lr: float, batch_size: int = 16,
                        on_progress: Progress | None = None,
                        should_stop: Callable[[], bool] | None = None) -> QuantizationResult:
    """PTQ, then QAT, of an image classifier; calibration and QAT use `train`, the report uses `val`."""
    import torch

    from appliance.optimize.fake_quant import calibrate, fold_batch_norms, insert_fake_quant
    from appliance.train.classifier import augment

    images, targets = train
    if images.shape[0] == 0 or val[0].shape[0] == 0:
        raise OptimizeError("quantization needs training images (calibration, QAT) and validation images (report)",
                            hint="import more images or check the dataset's splits")
    notify = on_progress or (lambda _event: None)
    report: dict[str, Any] = {"task": "classifier", "recipe": recipe.to_dict(),
                              "validation_images": int(val[0].shape[0])}
    notify({"stage": "evaluating float"})
    report["float"] = _classifier_metrics(model, val, labels)

    report["folded_batch_norms"] = fold_batch_norms(model)
    report["quantized_layers"] = len(insert_fake_quant(model, recipe))
    channels = model.config.num_channels
    chunks = [_fit_channels(images[i:i + batch_size].float(), channels) for i in range(0, images.shape[0], batch_size)]
    notify({"stage": "calibrating", "batches": min(len(chunks), recipe.calibration_batches)})
    report["calibration_batches"] = calibrate(model, chunks, lambda m, b: m(pixel_values=b), recipe)
    report["ptq"] = _classifier_metrics(model, val, labels)
    report["qat"] = None
    if not recipe.qat:
        return QuantizationResult(model.eval(), report)

    steps, lr = recipe.qat_steps(original_steps), recipe.qat_lr(original_lr)
    report["qat_steps"], report["qat_lr"] = steps, lr
    model.requires_grad_(True)  # a model fresh from export or evaluation may have gradients off
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    loss_fn = torch.nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(recipe.seed)
    model.train()
    done = 0
    for step in range(steps):
        index = torch.randint(images.shape[0], (min(batch_size, images.shape[0]),), generator=generator)
        batch = augment(images[index].float(), generator, 5.0)  # light: QAT adapts to INT8, not to new data
        loss = loss_fn(model(pixel_values=_fit_channels(batch, channels)).logits, targets[index])
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        notify({"stage": "qat", "step": done, "total_steps": steps, "loss": loss.item()})
        if should_stop and should_stop():
            break
    model.requires_grad_(False)
    _finish_qat(model)
    report["qat_steps_done"] = done
    report["qat"] = _classifier_metrics(model, val, labels)
    return QuantizationResult(model, report)


def _finish_qat(model: Any) -> None:
    """Eval mode, and weight ranges from the final weights (the last step changed them after its forward)."""
    from appliance.optimize.fake_quant import QuantConv2d, QuantLinear, refresh_weight_range

    model.eval()
    for module in model.modules():
        if isinstance(module, QuantLinear | QuantConv2d):
            refresh_weight_range(module)


# --- causal language models ------------------------------------------------------------------------------------------

def perplexity(model: Any, batches: Sequence[dict[str, Any]]) -> float:
    """exp(token-weighted mean loss) over batches with `labels` (-100 = not scored), as the training code makes them."""
    import torch

    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            # transformers shifts labels by one inside the loss: the first label of a row is never scored.
            scored = int((batch["labels"][..., 1:] != -100).sum())
            if scored == 0:
                continue
            total += model(**batch, use_cache=False).loss.float().item() * scored
            tokens += scored
    model.train(was_training)
    if tokens == 0:
        raise OptimizeError("the evaluation batches have no scored tokens", hint="evaluate on the validation split")
    return math.exp(total / tokens)


def quantize_causal_lm(model: Any, *, calibration_batches: Sequence[dict[str, Any]],
                       train_batches: Sequence[dict[str, Any]], eval_batches: Sequence[dict[str, Any]],
                       recipe: QuantRecipe, original_steps: int, original_lr: float,
                       on_progress: Progress | None = None,
                       should_stop: Callable[[], bool] | None = None) -> QuantizationResult:
    """PTQ, then QAT, of a causal LM (LoRA already merged). Batches are `MicroBatch.tensors()` dicts."""
    import torch

    from appliance.optimize.fake_quant import QuantLinear, calibrate, insert_fake_quant
    from appliance.optimize.onnx_export import check_exportable

    check_exportable(model.config)  # refuse MoE before spending time on it
    notify = on_progress or (lambda _event: None)
    report: dict[str, Any] = {"task": "causal_lm", "recipe": recipe.to_dict(), "eval_batches": len(eval_batches)}
    notify({"stage": "evaluating float"})
    report["float"] = {"perplexity": perplexity(model, eval_batches)}
    report["quantized_layers"] = len(insert_fake_quant(model, recipe))
    notify({"stage": "calibrating", "batches": min(len(calibration_batches), recipe.calibration_batches)})
    report["calibration_batches"] = calibrate(model, calibration_batches,
                                              lambda m, b: m(**b, use_cache=False), recipe)
    report["ptq"] = {"perplexity": perplexity(model, eval_batches)}
    report["qat"] = None
    if not recipe.qat:
        return QuantizationResult(model.eval(), report)
    if not train_batches:
        raise OptimizeError("QAT needs training batches", hint="set qat = false in the recipe for PTQ only")

    steps, lr = recipe.qat_steps(original_steps), recipe.qat_lr(original_lr)
    report["qat_steps"], report["qat_lr"] = steps, lr
    # Only the quantized linear layers train: they are what INT8 changed. Embeddings and norms stay.
    model.requires_grad_(False)
    trainable = []
    for module in model.modules():
        if isinstance(module, QuantLinear):
            trainable += [p for p in (module.weight, module.bias) if p is not None]
    for parameter in trainable:
        parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    order = torch.randperm(len(train_batches), generator=torch.Generator().manual_seed(recipe.seed)).tolist()
    model.train()
    done = 0
    for step in range(steps):
        batch = train_batches[order[step % len(order)]]
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        notify({"stage": "qat", "step": done, "total_steps": steps, "loss": loss.item()})
        if should_stop and should_stop():
            break
    model.requires_grad_(False)
    _finish_qat(model)
    report["qat_steps_done"] = done
    report["qat"] = {"perplexity": perplexity(model, eval_batches)}
    return QuantizationResult(model, report)
