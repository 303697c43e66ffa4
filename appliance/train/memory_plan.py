"""The memory plan of a LoRA run: what it will need, checked against the device before anything loads.

    airlock train lm --base deepseek-r1-distill-qwen-7b --data qa --recipe r.toml --plan   # prints it

Pure arithmetic from the model's config.json and the recipe (no weights are read), so a 7B model
that cannot fit on a 24 GB GPU is refused in milliseconds, with the numbers and the change that
would fit. The terms, per process:

- weights: parameters x bytes of the base dtype (fp32 4, bf16/fp16 2; NF4 ~0.52 bytes for the
  linear layers, embeddings and lm_head stay in the compute dtype);
- adapter: LoRA parameters in fp32 (weight + gradient, 8 bytes) and AdamW's two moments (8 bytes);
- activations of one micro-batch (batch_size x max_length tokens) saved for backward, per layer:
  the tensors a Qwen2/Llama decoder layer keeps (norm inputs upcast to fp32, projections' inputs,
  q/k/v before and after RoPE, the attention output, gate/up/SiLU of the MLP, LoRA's dropout
  copies); with gradient checkpointing each layer keeps only its input, plus one layer's full
  set while it is recomputed. `gradient_checkpointing = "auto"` (the default) turns it on exactly
  when the activations without it outweigh all the other terms together;
- logits: tokens x vocabulary x (compute dtype + 4 bytes of the fp32 upcast in the loss + 4 of its
  gradient), the largest single term for 152k-vocabulary models at long lengths;
- overhead: the runtime (CUDA context, or Python and libraries on CPU), 1 GiB.

A plan fits when its total is at most 90% of the device's free memory (CUDA: `mem_get_info`; CPU:
available RAM, shared by the ranks of one host). The numbers are estimates (SDPA attention, no
fused kernels); the run records the measured peak beside them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from appliance.errors import AirlockError
from appliance.train.recipe import LoraRecipe
from appliance.train.targets import DENSE_SUFFIXES

GIB = 1024 ** 3
HEADROOM = 0.9  # fragmentation and allocator caches: plan for 90% of what is free
OVERHEAD_BYTES = 1 * GIB
NF4_BYTES = 0.516  # 4 bits + blockwise absmax with double quantization (~0.127 bits per parameter)
DENSE_ARCHITECTURES = {"Qwen2ForCausalLM", "LlamaForCausalLM"}


class MemoryPlanError(AirlockError):
    """A training run would not fit in the device's memory."""


@dataclass(frozen=True)
class ModelShape:
    """What the memory arithmetic needs from a dense decoder's config.json."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied_embeddings: bool = False
    attention_bias: bool = True

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ModelShape:
        return cls(hidden=config["hidden_size"], layers=config["num_hidden_layers"],
                   heads=config["num_attention_heads"],
                   kv_heads=config.get("num_key_value_heads") or config["num_attention_heads"],
                   intermediate=config["intermediate_size"], vocab=config["vocab_size"],
                   tied_embeddings=bool(config.get("tie_word_embeddings", False)),
                   attention_bias=config.get("model_type") == "qwen2" or bool(config.get("attention_bias")))

    @property
    def kv_dim(self) -> int:
        return self.hidden // self.heads * self.kv_heads

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each projection of one layer."""
        h, kv, i = self.hidden, self.kv_dim, self.intermediate
        return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def linear_params(self) -> int:
        per_layer = sum(a * b for a, b in self.linear_shapes().values())
        bias = (self.hidden + 2 * self.kv_dim) if self.attention_bias else 0
        return self.layers * (per_layer + bias)

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2)

    @property
    def params(self) -> int:
        norms = self.layers * 2 * self.hidden + self.hidden
        return self.linear_params + self.embedding_params + norms


# Published configs (config.json on the hub), for the planner's tests and `--plan` arithmetic.
R1_DISTILL_QWEN_1_5B = ModelShape(hidden=1536, layers=28, heads=12, kv_heads=2, intermediate=8960, vocab=151936)
R1_DISTILL_QWEN_7B = ModelShape(hidden=3584, layers=28, heads=28, kv_heads=4, intermediate=18944, vocab=152064)


@dataclass(frozen=True)
class MemoryPlan:
    device: str
    weights: int
    adapter: int
    optimizer: int
    activations: int
    activations_without_checkpointing: int
    activations_with_checkpointing: int
    logits: int
    overhead: int
    available: int
    tokens: int
    """Tokens in one micro-batch (batch_size x max_length)."""
    checkpointing: bool = False
    """Whether the run recomputes activations (the recipe's choice, or `auto`'s decision here)."""
    suggestion: str = ""

    @property
    def total(self) -> int:
        return self.weights + self.adapter + self.optimizer + self.activations + self.logits + self.overhead

    @property
    def fits(self) -> bool:
        return self.total <= self.available * HEADROOM

    def summary(self) -> str:
        return (f"needs {_gib(self.total)} (weights {_gib(self.weights)} + adapter {_gib(self.adapter)} + optimizer "
                f"{_gib(self.optimizer)} + activations {_gib(self.activations)} + logits {_gib(self.logits)} + "
                f"runtime {_gib(self.overhead)}); {self.device} has {_gib(self.available)} free, "
                f"{int(HEADROOM * 100)}% usable")

    def lines(self) -> list[str]:
        rows = [("weights", self.weights), ("adapter (fp32 weights + gradients)", self.adapter),
                ("optimizer (AdamW, fp32)", self.optimizer),
                (f"activations ({self.tokens} tokens per micro-batch)", self.activations),
                ("  without gradient checkpointing" + ("" if self.checkpointing else " (this run)"),
                 self.activations_without_checkpointing),
                ("  with gradient checkpointing" + (" (this run)" if self.checkpointing else ""),
                 self.activations_with_checkpointing),
                ("logits and their gradient", self.logits), ("runtime", self.overhead),
                ("total", self.total), (f"free on {self.device}", self.available)]
        out = [f"{name:<40} {_gib(value):>10}" for name, value in rows]
        out.append("fits" if self.fits else f"does not fit; {self.suggestion or 'no single change fits'}")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"device": self.device, "weights": self.weights, "adapter": self.adapter, "optimizer": self.optimizer,
                "activations": self.activations, "logits": self.logits, "overhead": self.overhead,
                "total": self.total, "available": self.available, "fits": self.fits, "tokens": self.tokens,
                "gradient_checkpointing": self.checkpointing, "suggestion": self.suggestion}


def _gib(n: int | float) -> str:
    return f"{n / GIB:.1f} GiB"


def _weight_bytes(shape: ModelShape, recipe: LoraRecipe, on_cuda: bool) -> int:
    if recipe.quantization == "nf4":
        return int(shape.linear_params * NF4_BYTES + (shape.params - shape.linear_params) * 2)
    return shape.params * _element_bytes(recipe, on_cuda)


def _element_bytes(recipe: LoraRecipe, on_cuda: bool) -> int:
    """Bytes per value of the base weights and of activations under autocast."""
    if recipe.precision == "fp32":
        return 4
    if recipe.precision == "auto" and not on_cuda:
        return 4  # auto is fp32 on CPU (train/lm.py precision_of)
    return 2


def _lora_params(shape: ModelShape, recipe: LoraRecipe) -> int:
    names = DENSE_SUFFIXES if recipe.target_modules == "auto" else tuple(recipe.target_modules)
    per_layer = sum(recipe.rank * (a + b) for name, (a, b) in shape.linear_shapes().items() if name in names)
    return shape.layers * per_layer


def _layer_activation_bytes(shape: ModelShape, recipe: LoraRecipe, e: int) -> int:
    """Bytes one decoder layer saves for backward, per token."""
    h, kv, i, r = shape.hidden, shape.kv_dim, shape.intermediate, recipe.rank
    norms = 2 * h * (4 + e)                   # RMSNorm keeps its input and the fp32 upcast
    projection_inputs = (3 * h + i) * e        # normed x (q/k/v and gate/up share it), o_proj's and down_proj's input
    attention = 2 * (h + 2 * kv) * e + 2 * h * e  # q/k/v before and after RoPE; SDPA output and o_proj output
    mlp = 3 * i * e                            # gate, up, SiLU(gate)
    lora = _lora_targets_in(shape, recipe) * e + 7 * r * e
    if recipe.dropout:
        lora += _lora_targets_in(shape, recipe)  # the dropout masks (one byte each)
    return norms + projection_inputs + attention + mlp + lora


def _lora_targets_in(shape: ModelShape, recipe: LoraRecipe) -> int:
    names = DENSE_SUFFIXES if recipe.target_modules == "auto" else tuple(recipe.target_modules)
    return sum(a for name, (a, _) in shape.linear_shapes().items() if name in names)  # a dropped copy of each input


def plan_memory(shape: ModelShape, recipe: LoraRecipe, *, device: str, available: int, shards: int = 1) -> MemoryPlan:
    """The plan for `recipe` on `shape`, with the first change that would fit when it does not.

    `shards` > 1: FSDP over that many processes; each holds 1/shards of the weights, adapter and
    optimizer state, plus one decoder layer's weights gathered at a time.
    """
    plan = _plan(shape, recipe, device, available, shards)
    if plan.fits:
        return plan
    return replace(plan, suggestion=_suggestion(shape, recipe, device, available, shards))


def _plan(shape: ModelShape, recipe: LoraRecipe, device: str, available: int, shards: int = 1) -> MemoryPlan:
    on_cuda = device.startswith("cuda")
    e = _element_bytes(recipe, on_cuda)
    tokens = recipe.batch_size * recipe.max_length
    per_token_layer = _layer_activation_bytes(shape, recipe, e)
    without = tokens * per_token_layer * shape.layers
    with_checkpointing = tokens * (shape.hidden * e * shape.layers + per_token_layer)
    lora = _lora_params(shape, recipe)
    weights, logits = _weight_bytes(shape, recipe, on_cuda), tokens * shape.vocab * (e + 8)
    if shards > 1:
        weights = weights // shards + weights // shape.layers  # this rank's shard + one gathered layer
        lora = -(-lora // shards)
    checkpointing = recipe.gradient_checkpointing
    if checkpointing == "auto":  # on where activations dominate: the recomputation (~1/3 more compute) pays
        checkpointing = without > weights + 16 * lora + logits + OVERHEAD_BYTES
    return MemoryPlan(device=device, weights=weights, adapter=lora * 8, optimizer=lora * 8,
                      activations=with_checkpointing if checkpointing else without,
                      activations_without_checkpointing=without, activations_with_checkpointing=with_checkpointing,
                      logits=logits, overhead=OVERHEAD_BYTES, available=available, tokens=tokens,
                      checkpointing=bool(checkpointing))


def _suggestion(shape: ModelShape, recipe: LoraRecipe, device: str, available: int, shards: int = 1) -> str:
    """The first single change (then combination) that fits, named as recipe lines with the new total."""
    candidates: list[tuple[str, dict[str, Any]]] = []
    if recipe.precision == "fp32" or (recipe.precision == "auto" and not device.startswith("cuda")):
        candidates.append(('precision = "bf16"', {"precision": "bf16"}))
    if recipe.gradient_checkpointing is not True and not _plan(shape, recipe, device, available, shards).checkpointing:
        candidates.append(("gradient_checkpointing = true", {"gradient_checkpointing": True}))
    if device.startswith("cuda") and recipe.quantization != "nf4" and shards == 1:  # FSDP cannot shard 4-bit
        candidates.append(('quantization = "nf4" (QLoRA)', {"quantization": "nf4", "precision": "auto"}))
    if recipe.batch_size > 1:
        candidates.append(("batch_size = 1", {"batch_size": 1}))
    tried: dict[str, Any] = {}
    for changes in [[c] for c in candidates] + [candidates[:n] for n in range(2, len(candidates) + 1)]:
        values = {k: v for _, c in changes for k, v in c.items()}
        tried = values
        plan = _plan(shape, replace(recipe, **values), device, available, shards)
        if plan.fits:
            return f"would fit with {' and '.join(name for name, _ in changes)} ({_gib(plan.total)})"
    shorter = replace(recipe, **tried)
    length = shorter.max_length
    while length > 256:
        length //= 2
        plan = _plan(shape, replace(shorter, max_length=length), device, available, shards)
        if plan.fits:
            named = [name for name, _ in candidates] + [f"max_length = {length}"]
            return f"would fit with {' and '.join(named)} ({_gib(plan.total)})"
    if shards == 1 and device.startswith("cuda"):
        return ('no recipe change fits one GPU: shard the model over several with strategy = "fsdp" and '
                "--device cuda:0,1,... (DDP keeps a full copy of the model on every GPU)")
    return "no recipe change fits: use a GPU with more memory, more GPUs, or a smaller model"


def available_bytes(device: str, world: int = 1) -> int:
    """Free memory of `device`: CUDA's free bytes, or the host's available RAM shared by `world` ranks."""
    if device.startswith("cuda"):
        import torch

        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available // max(1, world))


def shape_of(model_dir: Path) -> ModelShape | None:
    """The dense shape of a model directory; None for architectures the planner does not model (MoE)."""
    config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    if (config.get("architectures") or ["?"])[0] not in DENSE_ARCHITECTURES:
        return None
    return ModelShape.from_config(config)


def plan_for(base: Any, recipe: LoraRecipe, *, device: str, world: int = 1,
             available: int | None = None, shards: int = 1) -> MemoryPlan | None:
    """The plan of `recipe` on base model `base` (config.json only) on `device`; None when not modelled."""
    shape = shape_of(base.path)
    if shape is None:
        return None
    free = available if available is not None else available_bytes(device, world)
    return plan_memory(shape, recipe, device=device, available=free, shards=shards)


def check_plan(base: Any, recipe: LoraRecipe, *, device: str, world: int = 1,
               available: int | None = None, shards: int = 1) -> MemoryPlan | None:
    """Refuse, before any weight loads, a run whose plan does not fit; the plan otherwise (None: not modelled)."""
    plan = plan_for(base, recipe, device=device, world=world, available=available, shards=shards)
    if plan is None:
        return None
    if not plan.fits:
        raise MemoryPlanError(f"{base.name} with this recipe {plan.summary()}",
                              hint=plan.suggestion or "use a device with more free memory")
    return plan
