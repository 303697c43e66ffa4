"""LoRA supervised fine-tuning of a causal LM, top to bottom: load, prepare, loop, evaluate, save.

    result = train_lora(resolve_base_model("tiny-deepseek-r1"), train_records, val_records, LoraRecipe())

The job runner wraps this (process, progress events, vault-backed checkpoints); this module
only needs records, a recipe and somewhere to put checkpoints. Runs on CPU in fp32, on GPUs in
bf16 autocast where supported. Resuming from a checkpoint continues exactly: the data order
is a pure function of (seed, epoch) and the checkpoint holds the step, optimizer, scheduler
and RNG states.
"""

from __future__ import annotations

import io
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from appliance.base_models import BaseModel
from appliance.errors import AirlockError
from appliance.train.recipe import LoraRecipe
from appliance.train.sft_data import Example, MicroBatch, encode_record, packed_batches, padded_batches
from appliance.train.targets import select_targets

CHECKPOINT = "checkpoint.pt"


class CheckpointStore(Protocol):
    """Where checkpoints go: the vault in production (encrypted, atomic)."""

    def write_bytes(self, name: str, data: bytes) -> None: ...

    def read_bytes(self, name: str) -> bytes | None: ...


@dataclass(frozen=True)
class Progress:
    step: int
    total_steps: int
    loss: float
    lr: float
    tokens_per_s: float
    eta_s: float
    val_loss: float | None = None


@dataclass
class TrainResult:
    steps: int
    total_steps: int = 0
    train_losses: list[float] = field(default_factory=list)
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    best_val_loss: float | None = None
    initial_val_loss: float | None = None
    """Validation loss of the untouched base model (before step 1): what training improved on."""
    stopped_early: bool = False
    truncated_examples: int = 0
    real_tokens: int = 0
    ewc: dict[str, Any] | None = None
    """EWC numbers (lambda, Fisher statistics, last penalty) when the recipe turned it on."""
    test: Any = None
    """EvalReport on the test split, when test records were given."""
    adapter_state: dict[str, Any] = field(default_factory=dict, repr=False)


Encoder = Callable[[Any, Sequence[dict[str, Any]], int, str], list[Example]]
"""(tokenizer, records, max_length, split name) -> examples; the job passes one that caches in the vault."""


def encode_records(tokenizer: Any, records: Sequence[dict[str, Any]], max_length: int, split: str) -> list[Example]:
    return [encode_record(tokenizer, record, max_length, where=f"{split} record {i + 1}")
            for i, record in enumerate(records)]


def make_batches(examples: list[Example], recipe: LoraRecipe, pad_id: int, order_seed: int | None) -> list[MicroBatch]:
    """Micro-batches for one epoch; `order_seed` shuffles examples first (None keeps order)."""
    import torch

    if order_seed is not None:
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(order_seed)).tolist()
        examples = [examples[i] for i in order]
    if recipe.packing:
        return list(packed_batches(examples, recipe.batch_size * recipe.max_length))
    return list(padded_batches(examples, recipe.batch_size, pad_id))


def lr_multiplier(step: int, total: int, recipe: LoraRecipe) -> float:
    warmup = int(total * recipe.warmup_ratio)
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if recipe.schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 1.0 - progress) if recipe.schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))


def _device_and_dtype(recipe: LoraRecipe) -> tuple[str, Any]:
    import torch

    if not torch.cuda.is_available():
        if recipe.precision in ("bf16", "fp16"):
            raise AirlockError(f"precision {recipe.precision} needs a GPU; this machine has none",
                               hint="use precision = \"auto\" or \"fp32\" on CPU")
        return "cpu", None
    if recipe.precision == "fp16":
        return "cuda", torch.float16
    if recipe.precision in ("bf16", "auto") and torch.cuda.is_bf16_supported():
        return "cuda", torch.bfloat16
    if recipe.precision == "bf16":
        raise AirlockError("this GPU does not support bf16", hint="use precision = \"auto\" or \"fp16\"")
    return "cuda", None


def evaluate_loss(model: Any, batches: list[MicroBatch], device: str, autocast_dtype: Any) -> float:
    """Token-weighted mean loss over the batches."""
    import torch

    model.eval()
    total, tokens = 0.0, 0
    device_type = device.split(":")[0]
    with torch.no_grad(), torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        for batch in batches:
            if batch.label_tokens == 0:
                continue
            inputs = {k: v.to(device) for k, v in batch.tensors().items()}
            total += model(**inputs, use_cache=False).loss.float().item() * batch.label_tokens
            tokens += batch.label_tokens
    model.train()
    return total / tokens if tokens else float("nan")


def build_lora_model(base: BaseModel, recipe: LoraRecipe) -> tuple[Any, Any]:
    """Base model (frozen) with LoRA adapters on the family's targets, and its tokenizer."""
    import torch
    from peft import LoraConfig, get_peft_model

    from appliance.base_models import load_causal_lm

    torch.manual_seed(recipe.seed)
    lm, tokenizer = load_causal_lm(base)
    targets = select_targets(lm, recipe)
    config = LoraConfig(r=recipe.rank, lora_alpha=recipe.alpha, lora_dropout=recipe.dropout,
                        target_modules=list(targets.modules), target_parameters=list(targets.parameters) or None,
                        bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(lm, config)
    if recipe.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model, tokenizer


def _distributed() -> tuple[int, int]:
    """(rank, world size) under torchrun, (0, 1) otherwise."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _agree(flag: bool) -> bool:
    """Under torchrun every rank must stop at the same step: stop if any rank wants to."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return flag
    value = torch.tensor([1 if flag else 0])
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def train_lora(base: BaseModel, train_records: Sequence[dict[str, Any]], val_records: Sequence[dict[str, Any]],
               recipe: LoraRecipe, *, test_records: Sequence[dict[str, Any]] = (),
               checkpoints: CheckpointStore | None = None,
               on_progress: Callable[[Progress], None] | None = None,
               should_stop: Callable[[], bool] | None = None,
               encode: Encoder = encode_records,
               init_adapter: dict[str, Any] | None = None,
               ewc_records: Sequence[dict[str, Any]] = ()) -> TrainResult:
    """Train; checkpoint at every evaluation and when `should_stop()` turns true (SIGTERM).

    `init_adapter` (a peft adapter state dict of the same LoRA structure) continues training from
    an earlier adapter instead of a fresh one: incremental retraining starts from the production
    model. A checkpoint, when there is one, wins over it (it already descends from it).

    Under torchrun (DDP, gloo on CPU / NCCL on GPUs) each optimizer step spreads its
    `grad_accumulation x world_size` micro-batches over the ranks; the effective batch and the
    token-weighted loss are those of one process accumulating them all.
    """
    import torch
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    rank, world = _distributed()
    device, autocast_dtype = _device_and_dtype(recipe)
    if device == "cuda" and world > 1:
        device = f"cuda:{rank % torch.cuda.device_count()}"
    model, tokenizer = build_lora_model(base, recipe)
    if init_adapter is not None:
        loaded = set_peft_model_state_dict(model, init_adapter)
        if getattr(loaded, "unexpected_keys", None):
            raise AirlockError("the adapter to continue from does not fit this recipe's LoRA structure",
                               hint="keep rank, alpha and target_modules of the parent run, or train fresh")
    model.to(device).train()
    ewc = None
    if recipe.ewc_lambda:  # before DDP wraps the model: the Fisher's backward passes are local to each rank
        from appliance.train.ewc import estimate_ewc, lm_batch_loss

        if init_adapter is None:
            raise AirlockError("EWC keeps training close to an earlier adapter, and there is none here",
                               hint="set ewc_lambda only for `airlock retrain` (continued from production)")
        ewc_batches = make_batches(encode(tokenizer, ewc_records, recipe.max_length, "ewc"), recipe,
                                   tokenizer.pad_token_id, order_seed=None)
        ewc = estimate_ewc(model, recipe.ewc_lambda, ewc_batches,
                           lambda b: lm_batch_loss(model, b, device, autocast_dtype))
    forward = model
    if world > 1:
        forward = torch.nn.parallel.DistributedDataParallel(model, device_ids=None if device == "cpu" else [device])
    train_examples = encode(tokenizer, train_records, recipe.max_length, "train")
    val_batches = make_batches(encode(tokenizer, val_records, recipe.max_length, "val"), recipe,
                               tokenizer.pad_token_id, order_seed=None)
    if not train_examples:
        raise AirlockError("the training split is empty", hint="import more records or check the dataset's splits")
    per_epoch = len(make_batches(train_examples, recipe, tokenizer.pad_token_id, order_seed=None))
    per_step = recipe.grad_accumulation * world
    steps_per_epoch = max(1, per_epoch // per_step)
    total_steps = recipe.max_steps or max(1, math.ceil(recipe.epochs * steps_per_epoch))

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=recipe.lr, weight_decay=recipe.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(s, total_steps, recipe))
    result = TrainResult(steps=0, total_steps=total_steps, truncated_examples=sum(e.truncated for e in train_examples))
    state = {"step": 0, "best_val": None, "bad_evals": 0}

    saved = checkpoints.read_bytes(CHECKPOINT) if checkpoints else None
    if saved is not None:
        blob = torch.load(io.BytesIO(saved), weights_only=True)  # no pickle code, even from our own store
        set_peft_model_state_dict(model, blob["adapter"])
        optimizer.load_state_dict(blob["optimizer"])
        scheduler.load_state_dict(blob["scheduler"])
        torch.set_rng_state(blob["rng"])
        state = blob["state"]
        result.train_losses, result.val_losses = blob["train_losses"], blob["val_losses"]
    elif val_batches:
        # Eval mode draws no random numbers: the training curve is the same with or without this.
        state["initial_val"] = evaluate_loss(model, val_batches, device, autocast_dtype)

    def save_checkpoint() -> None:
        if checkpoints is None or rank != 0:
            return
        buffer = io.BytesIO()
        torch.save({"adapter": get_peft_model_state_dict(model), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "rng": torch.get_rng_state(), "state": state,
                    "train_losses": result.train_losses, "val_losses": result.val_losses,
                    "recipe": recipe.to_dict()}, buffer)
        checkpoints.write_bytes(CHECKPOINT, buffer.getvalue())

    started, tokens_seen = time.perf_counter(), 0
    first_step = state["step"]
    while state["step"] < total_steps:
        step = state["step"]
        epoch, index_in_epoch = divmod(step, steps_per_epoch)
        batches = make_batches(train_examples, recipe, tokenizer.pad_token_id, order_seed=recipe.seed * 1000 + epoch)
        group = batches[index_in_epoch * per_step:(index_in_epoch + 1) * per_step]
        step_tokens = sum(b.label_tokens for b in group) or 1
        loss_sum = 0.0
        device_type = "cuda" if device.startswith("cuda") else "cpu"
        with torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            for batch in group[rank::world]:
                inputs = {k: v.to(device) for k, v in batch.tensors().items()}
                # Token-weighted over the whole step (all ranks), not a mean of micro-batch means;
                # DDP averages gradients over ranks, hence the x world.
                loss = forward(**inputs, use_cache=False).loss * (batch.label_tokens / step_tokens * world)
                loss.backward()
                loss_sum += loss.item() / world
                tokens_seen += batch.real_tokens
        if world > 1:
            total = torch.tensor([loss_sum])
            torch.distributed.all_reduce(total)
            loss_sum = total.item()
        if ewc is not None:
            ewc.add_gradient(model)
        if recipe.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(trainable, recipe.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state["step"] = step + 1
        result.train_losses.append(round(loss_sum, 6))

        val_loss = None
        if val_batches and (state["step"] % recipe.eval_every == 0 or state["step"] == total_steps):
            val_loss = evaluate_loss(model, val_batches, device, autocast_dtype)
            result.val_losses.append((state["step"], val_loss))
            if state["best_val"] is None or val_loss < state["best_val"]:
                state["best_val"], state["bad_evals"] = val_loss, 0
            else:
                state["bad_evals"] += 1
            save_checkpoint()
        if on_progress and rank == 0:
            elapsed = time.perf_counter() - started
            done = state["step"] - first_step
            on_progress(Progress(state["step"], total_steps, loss_sum, scheduler.get_last_lr()[0],
                                 tokens_seen / elapsed if elapsed else 0.0,
                                 elapsed / done * (total_steps - state["step"]) if done else 0.0, val_loss))
        if recipe.early_stopping_patience and state["bad_evals"] >= recipe.early_stopping_patience:
            result.stopped_early = True
            break
        if _agree(bool(should_stop and should_stop())):
            save_checkpoint()
            break

    if test_records and state["step"] >= total_steps and rank == 0:
        from appliance.train.evaluate import evaluate_lm

        test_examples = encode(tokenizer, test_records, recipe.max_length, "test")
        test_batches = make_batches(test_examples, recipe, tokenizer.pad_token_id, order_seed=None)
        result.test = evaluate_lm(model, tokenizer, test_batches, [r for r in test_records if "messages" in r])
        model.train()
    result.steps = state["step"]
    result.best_val_loss = state["best_val"]
    result.initial_val_loss = state.get("initial_val")
    result.real_tokens = tokens_seen
    result.ewc = ewc.summary() if ewc is not None else None
    result.adapter_state = {k: v.detach().cpu() for k, v in get_peft_model_state_dict(model).items()}
    return result
