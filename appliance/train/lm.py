"""LoRA supervised fine-tuning of a causal LM, top to bottom: load, prepare, loop, evaluate, save.

    result = train_lora(resolve_base_model("tiny-deepseek-r1"), train_records, val_records, LoraRecipe())

The job runner wraps this (process, progress events, vault-backed checkpoints); this module
only needs records, a recipe and somewhere to put checkpoints.

Precision (`precision_of`): the frozen base weights load in bf16 on GPUs (fp16 with a gradient
scaler where bf16 is unsupported; 4-bit NF4 with `quantization = "nf4"`), in fp32 on CPU unless the
recipe asks for bf16; LoRA weights and AdamW state are always fp32. A memory plan
(train/memory_plan.py) is checked before anything loads.

Resuming from a checkpoint continues exactly: the data order is a pure function of (seed, epoch)
and the checkpoint holds the step, optimizer, scheduler, gradient scaler and RNG states (CPU and
CUDA). With early stopping on, the adapter returned is the best-validation one, and the test split
is evaluated whenever training ended (finished or stopped early), never skipped.
"""

from __future__ import annotations

import contextlib
import io
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from appliance.base_models import BaseModel
from appliance.errors import AirlockError
from appliance.train.curves import Curves, lm_test_values
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
    grad_norm: float | None = None
    """Total norm of the adapter's gradients before clipping (NaN/inf when fp16 overflowed)."""


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
    memory_plan: dict[str, Any] | None = None
    """The memory plan this run was admitted with (train/memory_plan.py), None where not modelled."""
    micro_batches: dict[int, int] = field(default_factory=dict)
    """Micro-batches this process ran per epoch (equal on every rank under DDP)."""
    curves: Curves = field(default_factory=Curves)
    """train/loss, train/lr, train/grad_norm, val/loss, test/* for TensorBoard (train/curves.py)."""
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


def epoch_batches(examples: list[Example], recipe: LoraRecipe, pad_id: int, epoch: int, count: int) -> list[MicroBatch]:
    """Exactly `count` micro-batches for `epoch` (shuffled by seed and epoch).

    Packing a shuffled order can give a few rows more or fewer than the unshuffled packing that
    fixed the steps per epoch: extra rows wait for the next epoch's shuffle, and a short epoch
    repeats its first rows. Every epoch then has the same number of full steps, so under DDP every
    rank runs the same number of forward/backward passes (a rank with one fewer would hang the
    others' all-reduce).
    """
    batches = make_batches(examples, recipe, pad_id, order_seed=recipe.seed * 1000 + epoch)
    if len(batches) >= count:
        return batches[:count]
    return [batches[i % len(batches)] for i in range(count)]


def lr_multiplier(step: int, total: int, recipe: LoraRecipe) -> float:
    warmup = int(total * recipe.warmup_ratio)
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if recipe.schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 1.0 - progress) if recipe.schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class Precision:
    """How one run computes: where, the frozen base weights' dtype, autocast, loss scaling, 4-bit."""

    device: str
    weights: str
    """torch dtype name of the frozen base weights: float32, bfloat16 or float16."""
    autocast: Any
    """torch dtype for autocast, or None (plain fp32)."""
    grad_scaler: bool
    """fp16: scale the loss so small gradients do not underflow (torch.amp.GradScaler)."""
    nf4: bool = False


def precision_of(recipe: LoraRecipe, cuda: bool | None = None, bf16_supported: bool | None = None) -> Precision:
    """The recipe's precision on this machine (or on the one described by `cuda`/`bf16_supported`)."""
    import torch

    if cuda is None:
        cuda = torch.cuda.is_available()
    if not cuda:
        if recipe.quantization == "nf4":
            raise AirlockError("QLoRA (quantization = \"nf4\") needs a CUDA GPU; this machine has none",
                               hint="on CPU use quantization = \"none\" (with precision = \"bf16\" to halve memory)")
        if recipe.precision == "fp16":
            raise AirlockError("precision fp16 needs a GPU; this machine has none",
                               hint="use precision = \"auto\", \"bf16\" or \"fp32\" on CPU")
        if recipe.precision == "bf16":
            return Precision("cpu", "bfloat16", torch.bfloat16, False)
        return Precision("cpu", "float32", None, False)  # auto: CPUs without bf16 units are slower in bf16
    if bf16_supported is None:
        bf16_supported = torch.cuda.is_bf16_supported()
    nf4 = recipe.quantization == "nf4"
    if recipe.precision == "fp32":
        return Precision("cuda", "float32", None, False)
    if recipe.precision == "bf16" and not bf16_supported:
        raise AirlockError("this GPU does not support bf16", hint="use precision = \"auto\" or \"fp16\"")
    if recipe.precision == "fp16" or not bf16_supported:
        return Precision("cuda", "float16", torch.float16, True, nf4)
    return Precision("cuda", "bfloat16", torch.bfloat16, False, nf4)


def _device_and_dtype(recipe: LoraRecipe) -> tuple[str, Any]:
    precision = precision_of(recipe)
    return precision.device, precision.autocast


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

    precision = precision_of(recipe)
    torch.manual_seed(recipe.seed)
    lm, tokenizer = load_causal_lm(base, dtype=precision.weights, nf4=precision.nf4)
    if precision.nf4:
        from peft import prepare_model_for_kbit_training

        lm = prepare_model_for_kbit_training(lm, use_gradient_checkpointing=recipe.gradient_checkpointing is True,
                                             gradient_checkpointing_kwargs={"use_reentrant": False})
    targets = select_targets(lm, recipe)
    config = LoraConfig(r=recipe.rank, lora_alpha=recipe.alpha, lora_dropout=recipe.dropout,
                        target_modules=list(targets.modules), target_parameters=list(targets.parameters) or None,
                        bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(lm, config, autocast_adapter_dtype=True)
    for parameter in model.parameters():  # LoRA weights (and so AdamW's state) in fp32, whatever the base
        if parameter.requires_grad and parameter.dtype != torch.float32:
            parameter.data = parameter.data.float()
    if recipe.gradient_checkpointing is True:  # "auto" is decided by train_lora from the memory plan
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model, tokenizer


def rng_states() -> dict[str, Any]:
    """The RNG states a checkpoint needs for an exact resume: CPU always, every CUDA device when present."""
    import torch

    states: dict[str, Any] = {"rng": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda_rng"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng(blob: dict[str, Any]) -> None:
    """Put back what `rng_states` saved; CUDA states only where this machine has the same GPUs."""
    import torch

    torch.set_rng_state(blob["rng"])
    cuda_states = blob.get("cuda_rng")
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)


def _distributed() -> tuple[int, int]:
    """(rank, world size) under torchrun, (0, 1) otherwise."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _collective_device() -> Any:
    """Where the process group's tensors must live: NCCL only reduces CUDA tensors, gloo CPU ones."""
    import torch
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _agree(flag: bool) -> bool:
    """Under torchrun every rank must stop at the same step: stop if any rank wants to."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return flag
    value = torch.tensor([1 if flag else 0], device=_collective_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)
CPU_MMAP_THRESHOLD = 1 << 20
"""Allocations from 1 MiB up (a packed row's activations: 3 MiB and more each on the tiny model) are
mmapped, and unmapped when freed."""


def return_freed_activations(device: str) -> bool:
    """On CPU under glibc: fix malloc's mmap threshold, so a step's activations go back to the OS when freed.

    glibc raises its mmap threshold each time a mmapped block is freed (up to 32 MiB), so from the
    second step on a step's activations come from the heap, and a heap freed out of order is
    mostly kept: bench_train's peak RSS rose by one step's activations at step 2 and stayed there
    (1490 MiB vs 969 at step 1; 1078 MiB with the threshold fixed, docs/adr/0020). Setting the
    threshold turns the dynamic rule off (mallopt(3)). Returns whether it was set."""
    import ctypes
    import platform

    if not device.startswith("cpu") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        return bool(ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, CPU_MMAP_THRESHOLD))
    except (OSError, AttributeError):
        return False


def clip_or_measure(parameters: Sequence[Any], max_norm: float) -> Any:
    """The gradients' total norm before clipping (what HF Trainer logs as grad_norm); clipped to
    `max_norm` when it is set, else only measured (the gradients stay untouched)."""
    import torch

    if max_norm:
        norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None])
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP: a DTensor over the shards


def train_lora(base: BaseModel, train_records: Sequence[dict[str, Any]], val_records: Sequence[dict[str, Any]],
               recipe: LoraRecipe, *, test_records: Sequence[dict[str, Any]] = (),
               checkpoints: CheckpointStore | None = None,
               on_progress: Callable[[Progress], None] | None = None,
               should_stop: Callable[[], bool] | None = None,
               encode: Encoder = encode_records,
               init_adapter: dict[str, Any] | None = None,
               ewc_records: Sequence[dict[str, Any]] = (),
               on_checkpoint: Callable[[Curves], None] | None = None) -> TrainResult:
    """Train; checkpoint at every evaluation and when `should_stop()` turns true (SIGTERM).

    `on_checkpoint(curves)` runs on rank 0 after each checkpoint is written, with the curves up to
    it: the job stores them, so they are exportable while the run trains and after a kill -9.

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
    fsdp = recipe.strategy == "fsdp" and world > 1
    if fsdp:
        from appliance.train import fsdp as sharding

        sharding.check_supported(recipe)
    precision = precision_of(recipe)
    device, autocast_dtype = precision.device, precision.autocast
    if device == "cuda":
        device = f"cuda:{rank % torch.cuda.device_count()}" if world > 1 else "cuda:0"
    from appliance.train.memory_plan import check_plan
    from appliance.train.packed_attention import use_packed_attention

    return_freed_activations(device)
    plan = check_plan(base, recipe, device=device, world=world,  # refuses before any weight is loaded
                      shards=world if fsdp else 1)
    recipe = replace(recipe, gradient_checkpointing=plan.checkpointing if plan is not None
                     else recipe.gradient_checkpointing is True)  # auto: the plan decided (off where not modelled)
    model, tokenizer = build_lora_model(base, recipe)
    # Packed rows attend per example without a rows x rows mask (train/packed_attention.py); the
    # models that export and serve keep transformers' SDPA (build_lora_model's default).
    model.get_base_model().set_attn_implementation(use_packed_attention())
    if init_adapter is not None:
        loaded = set_peft_model_state_dict(model, init_adapter)
        if getattr(loaded, "unexpected_keys", None):
            raise AirlockError("the adapter to continue from does not fit this recipe's LoRA structure",
                               hint="keep rank, alpha and target_modules of the parent run, or train fresh")
    if not precision.nf4 and not fsdp:  # bitsandbytes placed the 4-bit weights already; FSDP moves shards
        model.to(device)
    model.train()
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
    if fsdp:
        sharding.shard(model, device)
    elif world > 1:
        forward = torch.nn.parallel.DistributedDataParallel(model, device_ids=None if device == "cpu" else [device])

    def adapter_now() -> dict[str, Any]:
        """The whole adapter, on the CPU (under FSDP gathered from the shards: every rank calls this)."""
        if fsdp:
            return sharding.adapter_state(model)
        return {k: v.detach().to("cpu", copy=True) for k, v in get_peft_model_state_dict(model).items()}

    def load_adapter(adapter: dict[str, Any]) -> None:
        if fsdp:
            sharding.load_adapter(model, adapter)
        else:
            set_peft_model_state_dict(model, adapter)

    def no_sync(last: bool) -> Any:
        """Gradients are reduced once per step, on the rank's last micro-batch, not on each."""
        if world == 1 or last:
            return contextlib.nullcontext()
        return sharding.gradient_sync(model, False) if fsdp else forward.no_sync()
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
    scaler = torch.amp.GradScaler("cuda", enabled=precision.grad_scaler)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(s, total_steps, recipe))
    result = TrainResult(steps=0, total_steps=total_steps, truncated_examples=sum(e.truncated for e in train_examples),
                         memory_plan=plan.to_dict() if plan is not None else None)
    state = {"step": 0, "best_val": None, "bad_evals": 0}
    best_adapter: dict[str, Any] | None = None  # early stopping ships these weights, not the last ones

    saved = checkpoints.read_bytes(CHECKPOINT) if checkpoints else None
    if saved is not None:
        blob = torch.load(io.BytesIO(saved), weights_only=True)  # no pickle code, even from our own store
        load_adapter(blob["adapter"])
        if fsdp:
            sharding.load_optimizer_state(model, optimizer, blob["optimizer"])
        else:
            optimizer.load_state_dict(blob["optimizer"])
        scheduler.load_state_dict(blob["scheduler"])
        if blob.get("scaler"):
            scaler.load_state_dict(blob["scaler"])
        restore_rng(blob)
        best_adapter = blob.get("best_adapter")
        state = blob["state"]
        result.train_losses, result.val_losses = blob["train_losses"], blob["val_losses"]
        result.curves = Curves.from_state(blob.get("curves"))
    elif val_batches:
        # Eval mode draws no random numbers: the training curve is the same with or without this.
        state["initial_val"] = evaluate_loss(model, val_batches, device, autocast_dtype)
        result.curves.add(0, {"val/loss": state["initial_val"]})

    def save_checkpoint() -> None:
        if checkpoints is None:
            return
        if fsdp:  # gathering the shards takes every rank
            adapter, optimizer_state = adapter_now(), sharding.optimizer_state(model, optimizer)
        elif rank == 0:
            adapter, optimizer_state = get_peft_model_state_dict(model), optimizer.state_dict()
        if rank != 0:
            return
        buffer = io.BytesIO()
        torch.save({"adapter": adapter, "optimizer": optimizer_state,
                    "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), **rng_states(),
                    "best_adapter": best_adapter, "state": state,
                    "train_losses": result.train_losses, "val_losses": result.val_losses,
                    "curves": result.curves.state(), "recipe": recipe.to_dict()}, buffer)
        checkpoints.write_bytes(CHECKPOINT, buffer.getvalue())
        if on_checkpoint:
            on_checkpoint(result.curves)

    started, tokens_seen = time.perf_counter(), 0
    first_step = state["step"]
    epoch_cache: dict[int, list[MicroBatch]] = {}
    while state["step"] < total_steps:
        step = state["step"]
        epoch, index_in_epoch = divmod(step, steps_per_epoch)
        if epoch not in epoch_cache:
            epoch_cache = {epoch: epoch_batches(train_examples, recipe, tokenizer.pad_token_id, epoch,
                                                steps_per_epoch * per_step)}
        group = epoch_cache[epoch][index_in_epoch * per_step:(index_in_epoch + 1) * per_step]
        step_tokens = sum(b.label_tokens for b in group) or 1
        loss_sum = 0.0
        device_type = "cuda" if device.startswith("cuda") else "cpu"
        mine = group[rank::world]
        result.micro_batches[epoch] = result.micro_batches.get(epoch, 0) + len(mine)
        with torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            for index, batch in enumerate(mine):
                inputs = {k: v.to(device) for k, v in batch.tensors().items()}
                with no_sync(last=index == len(mine) - 1):
                    # Token-weighted over the whole step (all ranks), not a mean of micro-batch means;
                    # DDP averages gradients over ranks, hence the x world.
                    loss = forward(**inputs, use_cache=False).loss * (batch.label_tokens / step_tokens * world)
                    scaler.scale(loss).backward()
                loss_sum += loss.item() / world
                tokens_seen += batch.real_tokens
        if world > 1:
            total = torch.tensor([loss_sum], device=_collective_device())
            torch.distributed.all_reduce(total)
            loss_sum = total.item()
        scaler.unscale_(optimizer)  # a no-op unless fp16: EWC and clipping see true gradients
        if ewc is not None:
            ewc.add_gradient(model)
        grad_norm = float(clip_or_measure(trainable, recipe.max_grad_norm))
        lr = scheduler.get_last_lr()[0]  # the rate this step used
        scaler.step(optimizer)  # skipped (and the scale lowered) when fp16 gradients overflowed
        scaler.update()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state["step"] = step + 1
        result.train_losses.append(round(loss_sum, 6))
        result.curves.add(state["step"], {"train/loss": loss_sum, "train/lr": lr, "train/grad_norm": grad_norm})

        val_loss = None
        if val_batches and (state["step"] % recipe.eval_every == 0 or state["step"] == total_steps):
            val_loss = evaluate_loss(model, val_batches, device, autocast_dtype)
            result.val_losses.append((state["step"], val_loss))
            result.curves.add(state["step"], {"val/loss": val_loss})
            if state["best_val"] is None or val_loss < state["best_val"]:
                state["best_val"], state["bad_evals"] = val_loss, 0
                if recipe.early_stopping_patience:
                    best_adapter = adapter_now()
            else:
                state["bad_evals"] += 1
            save_checkpoint()
        if on_progress and rank == 0:
            elapsed = time.perf_counter() - started
            done = state["step"] - first_step
            on_progress(Progress(state["step"], total_steps, loss_sum, scheduler.get_last_lr()[0],
                                 tokens_seen / elapsed if elapsed else 0.0,
                                 elapsed / done * (total_steps - state["step"]) if done else 0.0, val_loss,
                                 grad_norm))
        if recipe.early_stopping_patience and state["bad_evals"] >= recipe.early_stopping_patience:
            result.stopped_early = True
            break
        if _agree(bool(should_stop and should_stop())):
            save_checkpoint()
            break

    finished = state["step"] >= total_steps or result.stopped_early  # not paused by a stop request
    if finished and best_adapter is not None:
        load_adapter(best_adapter)  # the weights whose validation loss is reported
    if test_records and finished and (rank == 0 or fsdp):  # a sharded model generates on every rank together
        from appliance.train.evaluate import evaluate_lm

        test_examples = encode(tokenizer, test_records, recipe.max_length, "test")
        test_batches = make_batches(test_examples, recipe, tokenizer.pad_token_id, order_seed=None)
        result.test = evaluate_lm(model, tokenizer, test_batches, [r for r in test_records if "messages" in r])
        result.curves.add(state["step"], lm_test_values(result.test.metrics()))
        model.train()
    result.steps = state["step"]
    result.best_val_loss = state["best_val"]
    result.initial_val_loss = state.get("initial_val")
    result.real_tokens = tokens_seen
    result.ewc = ewc.summary() if ewc is not None else None
    result.adapter_state = adapter_now()
    return result
