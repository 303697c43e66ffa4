"""FSDP for LoRA runs whose base model does not fit one GPU: `strategy = "fsdp"` with `--nproc N`.

    airlock train lm --base deepseek-r1-distill-qwen-7b --data qa --device cuda:0,1 --strategy fsdp

PyTorch's FSDP2 (`torch.distributed.fsdp.fully_shard`, through the same torchrun launch as DDP,
appliance/train/ddp.py) shards every parameter over the ranks: each rank keeps 1/N of the frozen
base and of the adapter (and so of AdamW's state), and gathers one decoder layer at a time for its
forward and backward. The groups: each LoRA matrix alone (fp32, trainable), each decoder layer's
remaining weights (the base dtype, frozen), then the root (embeddings, final norm, lm_head), so
no group mixes dtypes. On CPU it runs with gloo (the tests compare two ranks with one process).

Loading: every rank opens the safetensors files memory-mapped (transformers' loader); in the base
dtype (bf16 on GPUs) the weights stay file-backed pages that the ranks of a host share through the
page cache, and `fully_shard` moves only this rank's shard of each layer to its GPU. (CPU `auto`
is fp32, which copies each weight once per rank: bf16 is the way to train big models on CPU ranks.)

Checkpoints hold whole, plain tensors (the adapter as peft names it, AdamW's state by parameter
name): `torch.distributed.checkpoint.state_dict` gathers the trainable parameters' full values
(the adapter is ~0.5% of the model), rank 0 writes them into the vault like any checkpoint, and a
resume (same strategy and number of processes, as for DDP) scatters them back into the shards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from appliance.errors import AirlockError


def check_supported(recipe: Any) -> None:
    """Refuse, before anything loads, what this FSDP path does not do."""
    if recipe.quantization == "nf4":
        raise AirlockError("QLoRA (nf4) with FSDP is not supported: bitsandbytes' 4-bit weights do not shard",
                           hint='use strategy = "ddp" with quantization = "nf4", or FSDP with a bf16 base')
    if recipe.ewc_lambda:
        raise AirlockError("EWC with FSDP is not supported (its Fisher estimate needs whole gradients)",
                           hint='use strategy = "ddp" for retraining with ewc_lambda')


def shard(model: Any, device: str) -> None:
    """fully_shard the LoRA matrices, then each decoder layer, then the root, on `device`'s mesh."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    world = torch.distributed.get_world_size()
    mesh = init_device_mesh(device.split(":")[0], (world,))
    base = model.get_base_model()
    for module in base.modules():  # LoRA's lora_A/lora_B linears: fp32 and trainable, a group each
        if isinstance(module, torch.nn.Linear) and all(p.requires_grad for p in module.parameters()):
            fully_shard(module, mesh=mesh)
    for layer in base.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


@contextlib.contextmanager
def gradient_sync(model: Any, enabled: bool) -> Iterator[None]:
    """FSDP's `no_sync`: reduce-scatter gradients only on the step's last micro-batch."""
    model.set_requires_gradient_sync(enabled)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def _options(**extra: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **extra)


def adapter_state(model: Any) -> dict[str, Any]:
    """The whole adapter (peft's names, CPU tensors) on every rank; every rank must call it."""
    from peft import get_peft_model_state_dict
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    full = get_model_state_dict(model, options=_options(ignore_frozen_params=True))
    return {k: v.detach().to("cpu", copy=True) for k, v in get_peft_model_state_dict(model, state_dict=full).items()}


def load_adapter(model: Any, adapter: dict[str, Any]) -> None:
    """Scatter a whole adapter (peft's names) into the shards; every rank must call it."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    names = {name.replace(".default.", "."): name for name, p in model.named_parameters() if p.requires_grad}
    missing = sorted(set(adapter) - set(names))
    if missing:
        raise AirlockError(f"the adapter to load has weights this model does not ({missing[0]})",
                           hint="keep rank, alpha and target_modules of the run it came from")
    set_model_state_dict(model, {names[k]: v for k, v in adapter.items()}, options=_options(strict=False))


def optimizer_state(model: Any, optimizer: Any) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_options(cpu_offload=True))


def load_optimizer_state(model: Any, optimizer: Any, state: dict[str, Any]) -> None:
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, optim_state_dict=state, options=_options())
