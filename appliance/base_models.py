"""Base models: find them on local disk by name, load them offline, generate text.

A base model is a Hugging Face directory (config, tokenizer, safetensors). Names resolve against
`paths.models_dirs()`; an absolute path is used as is. Nothing here can reach a hub: paths are
absolute, `local_files_only=True`, and the offline environment is already set.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.errors import AirlockError, ModelNotFoundError
from appliance.paths import models_dirs

DEMO_MODEL = "tiny-deepseek-r1"
CAUSAL_LM_ARCHITECTURES = {"Qwen2ForCausalLM", "LlamaForCausalLM", "DeepseekV3ForCausalLM", "DeepseekV2ForCausalLM"}
IMAGE_CLASSIFIER_ARCHITECTURES = {"ResNetForImageClassification", "ConvNextForImageClassification",
                                  "ViTForImageClassification"}
SUPPORTED_ARCHITECTURES = CAUSAL_LM_ARCHITECTURES | IMAGE_CLASSIFIER_ARCHITECTURES


@dataclass(frozen=True)
class BaseModel:
    name: str
    path: Path
    architecture: str
    has_weights: bool


def resolve_base_model(name_or_path: str) -> BaseModel:
    """Find a base model directory by name (or absolute path) and check it is one we support."""
    candidate = Path(name_or_path).expanduser()
    searched: list[Path]
    if candidate.is_absolute():
        searched = [candidate]
    elif "/" in name_or_path or name_or_path.startswith("."):
        candidate = candidate.resolve()
        searched = [candidate]
    else:
        searched = [d / name_or_path for d in models_dirs()]
    for path in searched:
        config_file = path / "config.json"
        if config_file.is_file():
            return _describe(path.resolve(), config_file)
    raise ModelNotFoundError(
        f"base model {name_or_path!r} not found (looked in: {', '.join(str(p) for p in searched)})",
        hint="install it from a bundle, or pass the absolute path of a local Hugging Face model directory",
    )


def _describe(path: Path, config_file: Path) -> BaseModel:
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(f"{config_file} is not readable JSON: {exc}",
                                 hint="re-stage the model from its bundle") from exc
    architectures = config.get("architectures") or ["?"]
    if architectures[0] not in SUPPORTED_ARCHITECTURES:
        raise ModelNotFoundError(
            f"{path} is a {architectures[0]}, not a supported model family",
            hint=f"supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))}",
        )
    has_weights = any(path.glob("*.safetensors"))
    return BaseModel(path.name, path, architectures[0], has_weights)


def load_causal_lm(model: BaseModel, *, dtype: str = "float32", nf4: bool = False) -> tuple[Any, Any]:
    """Load (model, tokenizer) from local files only, in eval mode.

    `dtype` is the torch dtype name of the weights ("float32", "bfloat16", "float16"): weights load
    straight into it (a bf16 7B model never exists in fp32 in memory). `nf4` loads the linear layers
    in 4-bit NF4 through bitsandbytes (QLoRA, CUDA only), computing in `dtype`.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # progress bars garble CLI output and job logs
    if model.architecture not in CAUSAL_LM_ARCHITECTURES:
        raise ModelNotFoundError(f"{model.path} is a {model.architecture}, not a language model",
                                 hint="choose a DeepSeek-family causal LM for text tasks")
    if not model.has_weights:
        raise ModelNotFoundError(f"{model.path} has a config but no *.safetensors weights",
                                 hint="stage the full model (config, tokenizer and weights) from a bundle")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"unsupported weight dtype {dtype!r}")
    tokenizer = AutoTokenizer.from_pretrained(model.path, local_files_only=True)
    extra: dict[str, Any] = {}
    if nf4:
        extra = {"quantization_config": _nf4_config(getattr(torch, dtype)),
                 "device_map": {"": torch.cuda.current_device()}}
    lm = AutoModelForCausalLM.from_pretrained(model.path, local_files_only=True, dtype=getattr(torch, dtype), **extra)
    lm.eval()
    return lm, tokenizer


def _nf4_config(compute_dtype: Any) -> Any:
    """QLoRA's base: 4-bit NF4 with double quantization (Dettmers et al. 2023), as transformers documents it."""
    import torch
    from transformers import BitsAndBytesConfig

    if not torch.cuda.is_available():
        raise AirlockError("4-bit NF4 weights (QLoRA) need a CUDA GPU; this machine has none",
                           hint='use quantization = "none"')
    try:
        import bitsandbytes  # noqa: F401  (the GPU bundle ships it)
    except ImportError as exc:
        raise AirlockError("4-bit NF4 weights (QLoRA) need bitsandbytes, which is not installed",
                           hint="install the GPU bundle, or use quantization = \"none\"") from exc
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


def generate_text(lm: Any, tokenizer: Any, prompt: str, *, max_new_tokens: int = 40, chat: bool = False,
                  seed: int = 0) -> str:
    """Greedy continuation of `prompt` (or of a one-turn chat when `chat`); returns the new text."""
    import torch

    torch.manual_seed(seed)
    if chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    else:
        text = tokenizer.bos_token + prompt
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    with torch.inference_mode():
        output = lm.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=not chat)


def list_base_models() -> list[BaseModel]:
    """Every supported model directory in the search path; the first of a name wins."""
    found: dict[str, BaseModel] = {}
    for directory in models_dirs():
        if not directory.is_dir():
            continue
        for config_file in sorted(directory.glob("*/config.json")):
            name = config_file.parent.name
            if name in found:
                continue
            try:
                found[name] = _describe(config_file.parent.resolve(), config_file)
            except ModelNotFoundError:
                continue  # not a model family we serve; `resolve_base_model` explains when asked
    return list(found.values())
