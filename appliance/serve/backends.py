"""Backends: what runs a served model. Text is handled above them, so a backend only maps tokens to tokens.

    backend = TorchLMBackend(model, device="cpu")
    for token in backend.generate(prompt_ids, Sampling(max_new_tokens=64, temperature=0.0), should_stop):
        ...

An LM backend takes the prompt's token ids and yields new token ids one at a time (the caller
stops iterating at EOS, a stop sequence or a cancelled request). `TorchLMBackend` runs the
PyTorch model; `RunnerLMBackend` runs the ONNX export of the optimize stage through ONNX Runtime
or a TensorRT engine (`appliance.optimize.runners`, flat KV cache); both share `pick_token`, so a
seed gives the same sampling on either. A classifier backend maps a C x H x W image in [0, 1]
to class probabilities.

Both LM backends also run several sequences in one forward pass (`forward_batch`, left-padded with an
attention mask): `appliance.serve.batching.BatchingLMBackend` wraps them so that concurrent requests share
forward passes (continuous batching). An onnxruntime-genai export on the CPU batches too, through its own
`forward_batch` (right-padded: `appliance.serve.genai_backend`). TensorRT (engine profiles of a few rows) and any
backend without `forward_batch` serve one request per worker thread through `generate`.

PyTorch decoding keeps the KV cache (`past_key_values`) between steps, so each new token costs one
position, not the whole sequence. Each request has its own random generator: a seed reproduces
the same tokens whatever else the server is doing.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import numpy as np


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int
    temperature: float = 1.0
    """0 = greedy (argmax)."""
    top_p: float = 1.0
    """Nucleus sampling: sample from the smallest set of tokens whose probability reaches top_p."""
    seed: int | None = None
    """Same seed, same prompt, same model: same tokens."""


class LMBackend(Protocol):
    kind: str
    """'pytorch', 'ort-cpu', 'ort-cuda', 'tensorrt': named in X-Airlock-Backend and /metrics."""

    def generate(self, prompt_ids: list[int], sampling: Sampling, should_stop: Callable[[], bool]
                 ) -> Iterator[int]: ...


class BatchForward(Protocol):
    """An LM backend that can run several sequences in one forward pass (`appliance.serve.batching` batches it).

    torch int64 tensors in: input_ids [batch, sequence], attention_mask [batch, past + sequence] (0 = padding),
    position_ids [batch, sequence]; `past` is the flat KV cache (key, value per layer, each [batch, kv_heads,
    past, head_dim]) a previous call returned, or None for a prefill. Out: the last position's logits [batch,
    vocab] (float32, CPU) and the new flat cache (torch tensors)."""

    kind: str

    def forward_batch(self, input_ids: Any, attention_mask: Any, position_ids: Any, past: list[Any] | None
                      ) -> tuple[Any, list[Any]]: ...


class ClassifierBackend(Protocol):
    kind: str
    channels: int
    """Channels the model takes (1 grey, 3 RGB)."""

    def probabilities(self, pixels: np.ndarray) -> list[float]: ...


def make_generator(seed: int | None) -> Any:
    import torch

    return torch.Generator().manual_seed(seed if seed is not None else secrets.randbits(63))


def pick_token(logits: Any, sampling: Sampling, generator: Any) -> int:
    """The next token from one position's logits (a 1-D float tensor on the CPU)."""
    import torch

    if sampling.temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        # Keep every token up to and including the one that reaches top_p (always at least one).
        cut = cumulative - sorted_probs >= sampling.top_p
        sorted_probs = sorted_probs.masked_fill(cut, 0.0)
        choice = torch.multinomial(sorted_probs / sorted_probs.sum(), 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=generator))


def pick_tokens(logits: Any, samplings: list[Sampling], generators: list[Any]) -> list[int | Exception]:
    """`pick_token` for every row of `logits` [rows, vocab] (CPU), each row with its own sampling and generator;
    a row whose sampling fails gets its exception, the others their token.

    Greedy rows take one numpy argmax for all of them (the first maximum, as torch.argmax). Sampled rows go through
    `pick_token` one by one, on purpose: a softmax over [32, vocab] crosses torch's parallel grain and runs on its
    OpenMP threads, which on a few shared cores spin against the forward pass (measured 100 ms a call on the loaded
    2-core machine, against about a millisecond for 32 one-row calls), and row by row keeps the very arithmetic of
    a request served alone."""
    import numpy as np

    picked: list[int | Exception] = [0] * len(samplings)
    greedy = [i for i, s in enumerate(samplings) if s.temperature <= 0]
    if greedy:
        rows = logits[greedy].numpy() if len(greedy) < len(samplings) else logits.numpy()
        for i, token in zip(greedy, np.argmax(rows, axis=-1).tolist(), strict=True):
            picked[i] = int(token)
    for i, sampling in enumerate(samplings):
        if sampling.temperature > 0:
            try:
                picked[i] = pick_token(logits[i], sampling, generators[i])
            except Exception as exc:  # this row's sampling failed (NaN logits...): its request fails, not the batch
                picked[i] = exc
    return picked


class TorchLMBackend:
    """A causal LM in PyTorch (LoRA merged into the weights), decoding with its KV cache."""

    kind = "pytorch"

    def __init__(self, model: Any, device: str = "cpu") -> None:
        self.model = model.to(device).eval()
        self.device = device

    def generate(self, prompt_ids: list[int], sampling: Sampling, should_stop: Callable[[], bool]
                 ) -> Iterator[int]:
        import torch

        generator = make_generator(sampling.seed)
        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor([prompt_ids], device=self.device), use_cache=True)
            for step in range(sampling.max_new_tokens):
                if should_stop():
                    return
                token = pick_token(out.logits[0, -1].to("cpu"), sampling, generator)
                yield token
                if step + 1 == sampling.max_new_tokens:
                    return
                out = self.model(input_ids=torch.tensor([[token]], device=self.device),
                                 past_key_values=out.past_key_values, use_cache=True)

    def forward_batch(self, input_ids: Any, attention_mask: Any, position_ids: Any, past: list[Any] | None
                      ) -> tuple[Any, list[Any]]:
        """See `BatchForward` (the caller holds torch.inference_mode)."""
        from transformers import DynamicCache

        cache = None
        if past is not None:
            cache = DynamicCache(ddp_cache_data=list(zip(past[0::2], past[1::2], strict=True)),
                                 config=self.model.config)
        out = self.model(input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device),
                         position_ids=position_ids.to(self.device), past_key_values=cache, use_cache=True)
        present = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
        return out.logits[:, -1].float().cpu(), present


class RunnerLMBackend:
    """A causal LM exported to ONNX with a flat KV cache, run by ONNX Runtime or TensorRT.

    `runner` is an `appliance.optimize` runner (`run(feeds) -> outputs`, `kind`); each step feeds the
    cache the previous step returned (`appliance.optimize.runners.causal_lm_step`).
    """

    def __init__(self, runner: Any, layout: tuple[int, int, int]) -> None:
        self.runner = runner
        self.layout = layout
        self.kind = str(runner.kind)
        self.cache_padding = str(getattr(runner, "cache_padding", "left"))
        """How `forward_batch` wants the rows' caches padded (a runtime that decodes itself says)."""
        self.sampler = getattr(runner, "sampler", None)
        """The runtime's own batch sampler, if it has one (onnxruntime-genai: genai_backend.BatchSampler)."""
        if callable(getattr(runner, "kv_slots", None)) and getattr(runner, "session", None) is not None:
            self.kv_slots = runner.kv_slots
            """The runtime keeps the batch's KV cache in place itself (genai_backend.KVSlots; batching._SlotBatch)."""

    def generate(self, prompt_ids: list[int], sampling: Sampling, should_stop: Callable[[], bool]
                 ) -> Iterator[int]:
        import numpy as np
        import torch

        from appliance.optimize.runners import causal_lm_step, empty_past, kv_dtype_of

        if hasattr(self.runner, "generate"):  # a runtime that decodes itself: onnxruntime-genai (genai_backend.py)
            yield from self.runner.generate(prompt_ids, sampling, should_stop)
            return
        generator = make_generator(sampling.seed)
        past = empty_past(self.layout, 1, kv_dtype_of(self.runner))
        ids, length = np.asarray([prompt_ids], dtype=np.int64), 0
        for _ in range(sampling.max_new_tokens):
            if should_stop():
                return
            logits, past = causal_lm_step(self.runner, ids, past, length)
            length += ids.shape[1]
            token = pick_token(torch.from_numpy(np.ascontiguousarray(logits[0, -1], dtype=np.float32)), sampling,
                               generator)
            yield token
            ids = np.asarray([[token]], dtype=np.int64)

    def forward_batch(self, input_ids: Any, attention_mask: Any, position_ids: Any, past: list[Any] | None
                      ) -> tuple[Any, list[Any]]:
        """See `BatchForward`: the same step as `generate`, several rows at once (the export takes a padding mask)."""
        import numpy as np
        import torch

        from appliance.optimize.runners import empty_past, kv_dtype_of

        if hasattr(self.runner, "forward_batch"):  # onnxruntime-genai's export (genai_backend.py): its own graph
            return self.runner.forward_batch(input_ids, attention_mask, position_ids, past)

        if past is None:
            cache = empty_past(self.layout, int(input_ids.shape[0]), kv_dtype_of(self.runner))
        else:
            cache = [np.ascontiguousarray(t.numpy()) for t in past]
        feeds = {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy(),
                 "position_ids": position_ids.numpy()}
        for i in range(len(cache) // 2):
            feeds[f"past_key_{i}"], feeds[f"past_value_{i}"] = cache[2 * i], cache[2 * i + 1]
        out = self.runner.run(feeds)
        present = [torch.from_numpy(np.asarray(out[f"present_{part}_{i}"]))
                   for i in range(len(cache) // 2) for part in ("key", "value")]
        return torch.from_numpy(np.ascontiguousarray(out["logits"][:, -1], dtype=np.float32)), present


class RunnerClassifierBackend:
    """An image classifier exported to ONNX (pixel_values -> logits), run by ONNX Runtime or TensorRT."""

    def __init__(self, runner: Any, channels: int) -> None:
        self.runner = runner
        self.kind = str(runner.kind)
        self.channels = channels

    def probabilities(self, pixels: np.ndarray) -> list[float]:
        import numpy as np

        dtype = getattr(self.runner, "input_dtypes", {}).get("pixel_values", np.dtype("float32"))
        logits = np.asarray(self.runner.run({"pixel_values": pixels[None].astype(dtype)})["logits"][0],
                            dtype=np.float64)
        exp = np.exp(logits - logits.max())
        return (exp / exp.sum()).tolist()


class TorchClassifierBackend:
    """An image classifier in PyTorch: softmax over its classes for one image."""

    kind = "pytorch"

    def __init__(self, model: Any, device: str = "cpu") -> None:
        self.model = model.to(device).eval()
        self.device = device
        self.channels = int(model.config.num_channels)

    def probabilities(self, pixels: np.ndarray) -> list[float]:
        import torch

        with torch.inference_mode():
            batch = torch.from_numpy(pixels).float()[None].to(self.device)
            return self.model(pixel_values=batch).logits.softmax(-1)[0].cpu().tolist()
