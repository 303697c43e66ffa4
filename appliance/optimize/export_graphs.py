"""The modules that torch.onnx.export traces: fixed input and output names, fixed dtypes at the edges.

This module subclasses torch.nn.Module, so importing it imports torch (and transformers when a
causal LM is traced): `onnx_export` imports it inside its functions.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def causal_lm_io_names(num_layers: int) -> tuple[list[str], list[str]]:
    """(input names, output names) of an exported causal LM, the KV cache flattened layer by layer."""
    inputs = ["input_ids", "attention_mask", "position_ids"]
    outputs = ["logits"]
    for i in range(num_layers):
        inputs += [f"past_key_{i}", f"past_value_{i}"]
        outputs += [f"present_key_{i}", f"present_value_{i}"]
    return inputs, outputs


class ClassifierGraph(nn.Module):
    """pixel_values (float32, N x C x H x W) -> logits (float32, N x classes); FP16 inside when the model is."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.dtype = next(model.parameters()).dtype

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.dtype != torch.float32:
            pixel_values = pixel_values.to(self.dtype)
        logits = self.model(pixel_values=pixel_values).logits
        return logits if logits.dtype == torch.float32 else logits.float()


class FlatKVCausalLM(nn.Module):
    """A causal LM whose KV cache is plain tensors, because transformers' cache classes do not export.

    inputs:  input_ids [batch, sequence] int64, attention_mask [batch, past + sequence] int64,
             position_ids [batch, sequence] int64, past_key_i / past_value_i [batch, kv_heads, past, head_dim]
    outputs: logits [batch, sequence, vocab] float32, present_key_i / present_value_i [batch, kv_heads, past +
             sequence, head_dim]. The first step passes past tensors with past = 0.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.num_layers = model.config.get_text_config(decoder=True).num_hidden_layers

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                *past: torch.Tensor) -> tuple[Any, ...]:
        from transformers import DynamicCache

        cache = DynamicCache(ddp_cache_data=list(zip(past[0::2], past[1::2], strict=True)), config=self.model.config)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True)
        flat = []
        for layer in out.past_key_values.layers:
            flat += [layer.keys, layer.values]
        logits = out.logits if out.logits.dtype == torch.float32 else out.logits.float()
        return (logits, *flat)
