"""The training recipe: a TOML file people write -> a frozen, validated dataclass.

    # recipe.toml (every field optional; these are the defaults)
    rank = 16
    alpha = 32
    lr = 2e-4
    max_steps = 200

Defaults are sane for DeepSeek-R1-Distill models on one GPU: rows of 4,096 tokens (R1 reasoning
traces are long), bf16 base weights on GPUs, fp32 LoRA weights and optimizer state. The memory
plan (train/memory_plan.py) checks them against the device before anything loads. Unknown keys
are refused: a typo must not silently fall back to a default.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from appliance.errors import AirlockError

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
QUANTIZATIONS = ("none", "nf4")
SCHEDULES = ("cosine", "linear", "constant")
STRATEGIES = ("ddp", "fsdp")
CHECKPOINTING_WORDS: dict[str, str | bool] = {"auto": "auto", "true": True, "on": True, "yes": True,
                                               "false": False, "off": False, "no": False}
"""gradient_checkpointing as text (the TUI form, `--gradient-checkpointing`) -> its value."""


class RecipeError(AirlockError):
    """A training recipe is not valid."""


@dataclass(frozen=True)
class LoraRecipe:
    rank: int = 16
    """LoRA rank r (1-256): capacity of the adapter."""
    alpha: float = 32.0
    """LoRA scaling numerator; the update is scaled by alpha / rank."""
    dropout: float = 0.05
    """Dropout on the LoRA input (0-0.5)."""
    target_modules: tuple[str, ...] | str = "auto"
    """"auto" (per architecture: attention + MLP, never the MoE router) or explicit module names."""
    lr: float = 2e-4
    """Peak learning rate (1e-6 to 1e-2)."""
    schedule: str = "cosine"
    """Learning-rate schedule after warmup: cosine, linear or constant."""
    warmup_ratio: float = 0.05
    """Fraction of the steps spent warming up linearly from 0 (0-0.5)."""
    weight_decay: float = 0.0
    """AdamW weight decay on LoRA weights (0-0.5)."""
    epochs: float = 3.0
    """Passes over the training split; `max_steps` wins when set."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (1-1,000,000); None = use `epochs`."""
    batch_size: int = 1
    """Packed rows per micro-batch (1-1024)."""
    grad_accumulation: int = 1
    """Micro-batches per optimizer step (1-1024)."""
    max_length: int = 4096
    """Tokens per packed row (16-131072); a longer example loses its oldest turns, then the start of
    its prompt, never its final answer, and is counted."""
    packing: bool = True
    """Padding-free packing: examples concatenated, attention kept within each example."""
    precision: str = "auto"
    """Dtype of the frozen base weights and of autocast: auto (GPU: bf16, or fp16 with loss scaling
    where bf16 is unsupported; CPU: fp32), bf16, fp16 (GPU only, with a gradient scaler) or fp32.
    LoRA weights and optimizer state are always fp32."""
    quantization: str = "none"
    """none, or nf4: QLoRA, the base weights in 4-bit NF4 through bitsandbytes (CUDA GPUs only)."""
    gradient_checkpointing: str | bool = "auto"
    """Recompute each layer's activations in the backward pass instead of keeping them: true, false,
    or auto (on where the memory plan's activations without it outweigh everything else it counts:
    weights, adapter, optimizer, logits and runtime; off for small models and short rows)."""
    strategy: str = "ddp"
    """With several processes (--nproc): ddp (a full model per process) or fsdp (parameters sharded
    over the processes, for a base that does not fit one GPU). One process ignores it."""
    eval_every: int = 50
    """Validation every N optimizer steps (1-100,000)."""
    early_stopping_patience: int = 0
    """Stop after N evaluations without a better validation loss; 0 = off."""
    max_grad_norm: float = 1.0
    """Gradient clipping (0 = off)."""
    seed: int = 0
    """Seeds data order, dropout and LoRA initialisation."""
    lora_routed_experts: bool = False
    """MoE models only: also adapt the fused routed experts through peft `target_parameters`."""
    ewc_lambda: float = 0.0
    """EWC penalty strength when continuing from an earlier adapter (`airlock retrain`); 0 = off (train/ewc.py)."""

    def __post_init__(self) -> None:
        _bounded("rank", self.rank, 1, 256, int)
        _bounded("alpha", self.alpha, 0.01, 4096, (int, float))
        _bounded("dropout", self.dropout, 0.0, 0.5, (int, float))
        _bounded("lr", self.lr, 1e-6, 1e-2, (int, float))
        _bounded("warmup_ratio", self.warmup_ratio, 0.0, 0.5, (int, float))
        _bounded("weight_decay", self.weight_decay, 0.0, 0.5, (int, float))
        _bounded("epochs", self.epochs, 0.01, 1000, (int, float))
        if self.max_steps is not None:
            _bounded("max_steps", self.max_steps, 1, 1_000_000, int)
        _bounded("batch_size", self.batch_size, 1, 1024, int)
        _bounded("grad_accumulation", self.grad_accumulation, 1, 1024, int)
        _bounded("max_length", self.max_length, 16, 131072, int)
        _bounded("eval_every", self.eval_every, 1, 100_000, int)
        _bounded("early_stopping_patience", self.early_stopping_patience, 0, 1000, int)
        _bounded("max_grad_norm", self.max_grad_norm, 0.0, 1000, (int, float))
        _bounded("seed", self.seed, 0, 2**31 - 1, int)
        _bounded("ewc_lambda", self.ewc_lambda, 0.0, 1e12, (int, float))
        if self.schedule not in SCHEDULES:
            raise RecipeError(f"schedule {self.schedule!r} is not one of {', '.join(SCHEDULES)}",
                              hint="use cosine unless you have a reason not to")
        if self.precision not in PRECISIONS:
            raise RecipeError(f"precision {self.precision!r} is not one of {', '.join(PRECISIONS)}",
                              hint="use auto: bf16 where the GPU supports it, fp32 on CPU")
        if self.quantization not in QUANTIZATIONS:
            raise RecipeError(f"quantization {self.quantization!r} is not one of {', '.join(QUANTIZATIONS)}",
                              hint="use none, or nf4 for QLoRA on a CUDA GPU")
        if self.quantization == "nf4" and self.precision == "fp32":
            raise RecipeError("quantization nf4 computes in bf16 or fp16, not fp32",
                              hint='use precision = "auto" with quantization = "nf4"')
        if self.strategy not in STRATEGIES:
            raise RecipeError(f"strategy {self.strategy!r} is not one of {', '.join(STRATEGIES)}",
                              hint="ddp unless one GPU cannot hold the base model: then fsdp")
        checkpointing = self.gradient_checkpointing
        if isinstance(checkpointing, str) and checkpointing.strip().lower() in CHECKPOINTING_WORDS:
            object.__setattr__(self, "gradient_checkpointing", CHECKPOINTING_WORDS[checkpointing.strip().lower()])
        elif not isinstance(checkpointing, bool):
            raise RecipeError(f"gradient_checkpointing {checkpointing!r} is not true, false or \"auto\"",
                              hint="leave it out (auto) unless a run must force it on or off")
        targets = self.target_modules
        if isinstance(targets, str):
            if targets != "auto":
                raise RecipeError(f"target_modules {targets!r} must be \"auto\" or a list of module names",
                                  hint='e.g. target_modules = ["q_proj", "v_proj"]')
        elif not targets or not all(isinstance(t, str) and t.replace("_", "").replace(".", "").isalnum()
                                    for t in targets):
            raise RecipeError(f"target_modules {list(targets)!r} must be non-empty plain module names",
                              hint='e.g. target_modules = ["q_proj", "v_proj"]')

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        if isinstance(out["target_modules"], tuple):
            out["target_modules"] = list(out["target_modules"])
        return out


def _bounded(name: str, value: Any, low: float, high: float, kind: type | tuple[type, ...]) -> None:
    if isinstance(value, bool) or not isinstance(value, kind):
        raise RecipeError(f"recipe field {name} = {value!r} has the wrong type",
                          hint=f"{name} takes a number between {low:g} and {high:g}")
    if not low <= value <= high:
        raise RecipeError(f"recipe field {name} = {value!r} is outside {low:g}..{high:g}",
                          hint=f"pick a value between {low:g} and {high:g}")


def recipe_from_dict(values: dict[str, Any], source: str = "recipe", cls: type[Any] = LoraRecipe) -> Any:
    """A recipe of dataclass `cls` (LoraRecipe, or ClassifierRecipe for image classifiers) from plain values."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise RecipeError(f"{source}: unknown field(s) {', '.join(unknown)}",
                          hint=f"known fields: {', '.join(sorted(known))}")
    values = dict(values)
    if isinstance(values.get("target_modules"), list):
        values["target_modules"] = tuple(values["target_modules"])
    return cls(**values)


def load_recipe(path: Path | None, cls: type[Any] = LoraRecipe) -> Any:
    """Read a recipe TOML file (None = all defaults) into `cls`. Errors name the file."""
    if path is None:
        return cls()
    try:
        values = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise RecipeError(f"cannot read recipe {path}: {exc.strerror}", hint="check the path") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise RecipeError(f"recipe {path} is not valid TOML: {exc}", hint="fix the line named above") from exc
    try:
        return recipe_from_dict(values, str(path), cls)
    except RecipeError as exc:
        message = exc.message if exc.message.startswith(str(path)) else f"{path}: {exc.message}"
        raise RecipeError(message, hint=exc.hint) from None
