"""An LM backend on onnxruntime-genai: its runtime keeps the KV cache and samples; we stream its tokens.

    backend = GenAILMBackend.load(folder, variant="genai-int4")      # og.Model over a genai export folder
    for token in backend.generate(prompt_ids, Sampling(max_new_tokens=64, temperature=0.6, top_p=0.95), stop):
        ...

The optimize stage builds and validates the export (appliance.optimize.genai_export / genai_validate) and the
serving side loads it through `appliance.optimize.genai_jobs.load_genai_backend`, which removes the decrypted
files as soon as `og.Model` has read them (a server that batches on the CPU loads no `og.Model`: `batched_only`,
below). One `og.Model` serves every request; each request has its own
`og.Generator` (the model's sessions are shared, each generator owns its KV cache). `generate_batch` decodes
several prompts in one generator (one forward pass per step for all of them), for callers that batch.
Sampling is og's own (temperature, top-p, seeded per request): a seed reproduces a request on this backend, but
not token for token on the PyTorch one, whose sampler is ours.

Continuous batching (CPU). On the CPU the server batches concurrent requests with its own scheduler
(`appliance.serve.batching.BatchingLMBackend`): an ONNX Runtime session over the same `model.onnx` the runtime
loads runs every running row's step. Its GroupQueryAttention takes each row's length from the attention mask and
rotates positions from it, so the rows' caches are RIGHT-padded (`cache_padding = "right"`: a row's tokens at
columns 0..length-1, whatever after), not left-padded as our own exports. The scheduler keeps the batch's cache
in `KVSlots` (`kv_slots()`): preallocated buffers that GroupQueryAttention reads and writes in place (past and
present bound to one buffer), so a step copies no cache; `forward_batch` (caches passed in and returned, the
generic `BatchForward`) stays for callers that hold their own caches.
og.Engine, the library's continuous-batching API, was measured instead and is not used on the CPU: with the builder's
CPU exports (GroupQueryAttention, no paged KV cache) it runs static batches of at most 4 requests that start and end
together, and decoded 32 requests no faster than one og.Generator at a time; its dynamic batching needs a
PagedAttention export, which the builder makes for CUDA fp16/bf16 only (docs/adr/0017-continuous-batching.md).
Batched rows sample with `BatchSampler` (numpy, every row of a step at once, seeded per request: the same
temperature and top-p rule as `pick_token`, not its random stream); a request served alone (`--max-batch 1`)
samples with og's, so a seed reproduces a request within one mode.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from appliance.serve.backends import Sampling

ADAPTER_NAME = "version"
"""The name the version's adapter is loaded under in og.Adapters."""


class GenAILMBackend:
    """A causal LM exported by the onnxruntime-genai builder, decoded by og.Generator."""

    cache_padding = "right"
    """How `forward_batch` wants the rows' KV caches padded (see the module docstring)."""

    def __init__(self, model: Any, *, variant: str, context_length: int, device: str = "cpu",
                 session: Any = None, kv_shape: tuple[int, int, int] | None = None) -> None:
        self.model = model
        self.variant = variant
        self.context_length = context_length
        self.kind = "genai-cuda" if device.startswith("cuda") else "genai-cpu"
        self.session = session
        """ONNX Runtime session over the export's decoder for `forward_batch` (CPU; None: not batched)."""
        self.sampler = BatchSampler() if session is not None else None
        """How the server's batch samples this model's rows."""
        self.kv_shape = kv_shape
        """(layers, kv heads, head size) of the decoder's KV cache (genai_config.json)."""
        self.extra_inputs: dict[str, Any] = {}
        """Graph input name -> numpy array fed to the batch session on every run besides the decoder's own inputs
        (none of ours today: a version's LoRA tensors are the batch session's own initializers, see `load`); a
        `KVSlots` binds them once, when the scheduler's batch starts."""
        self.adapters: Any = None
        """og.Adapters holding the version's adapter (ADAPTER_NAME), made active on every og.Generator; None: the
        export is merged."""

    @classmethod
    def load(cls, folder: Path, *, variant: str, device: str = "cpu", adapter: Path | None = None,
             batched_only: bool = False) -> GenAILMBackend:
        """og.Model over an export folder; `adapter`: the version's `.onnx_adapter` over a base graph with a LoRA
        branch (appliance.optimize.genai_adapters), loaded into og.Adapters and into the batch session's
        initializers.

        `batched_only` (a CPU server that batches: every request goes through the batch session, og.Generator
        serves none): og.Model is not loaded, so the weights are in memory once, not twice (ADR 0017)."""
        import onnxruntime_genai as og

        batched_only = batched_only and not device.startswith("cuda")
        model, adapters = None, None
        if not batched_only:
            config = og.Config(str(folder))
            config.clear_providers()
            if device.startswith("cuda"):
                config.append_provider("cuda")
                config.set_provider_option("cuda", "device_id", device.partition(":")[2] or "0")
            model = og.Model(config)
        lora: dict[str, Any] = {}
        if adapter is not None:
            from appliance.optimize.genai_adapters import read_onnx_adapter

            if model is not None:
                adapters = og.Adapters(model)
                adapters.load(str(adapter), ADAPTER_NAME)
            lora = read_onnx_adapter(adapter)
        genai = json.loads((folder / "genai_config.json").read_text(encoding="utf-8"))["model"]
        session, kv_shape = None, None
        if not device.startswith("cuda"):  # continuous batching on the CPU (module docstring)
            # The version's LoRA tensors replace the base graph's zero initializers in the batch session itself:
            # no feed per run, and IO binding (KVSlots) cannot bind an initializer by name anyway.
            session, kv_shape = batch_session(folder, genai["decoder"], initializers=lora)
        backend = cls(model, variant=variant, context_length=int(genai["context_length"]), device=device,
                      session=session, kv_shape=kv_shape)
        backend.adapters = adapters
        return backend

    def _generator(self, params: Any) -> Any:
        """An og.Generator with the version's adapter active (an adapter-route export)."""
        import onnxruntime_genai as og

        generator = og.Generator(self.model, params)  # params from _params, which refuses a batched-only load
        if self.adapters is not None:
            generator.set_active_adapter(self.adapters, ADAPTER_NAME)
        return generator

    def forward_batch(self, input_ids: Any, attention_mask: Any, position_ids: Any, past: list[Any] | None
                      ) -> tuple[Any, list[Any]]:
        """`appliance.serve.backends.BatchForward` with right-padded caches: `attention_mask` [batch, past + sequence]
        has each row's ones first (its length), `past` the flat cache (key, value per layer, [batch, kv heads, past,
        head size], torch tensors) a previous call returned, None for a prefill."""
        import numpy as np
        import torch

        if self.session is None or self.kv_shape is None:
            raise RuntimeError(f"{self.variant} on {self.kind} decodes one request at a time (no batch session)")
        layers, heads, head_size = self.kv_shape
        rows = int(input_ids.shape[0])
        feeds: dict[str, Any] = {**self.extra_inputs, "input_ids": input_ids.numpy(),
                                 "attention_mask": attention_mask.numpy()}
        if "position_ids" in self._inputs:
            feeds["position_ids"] = position_ids.numpy()
        for i in range(layers):
            for j, part in enumerate(("key", "value")):
                feeds[f"past_key_values.{i}.{part}"] = (
                    np.zeros((rows, heads, 0, head_size), dtype=self._kv_dtype) if past is None
                    else np.ascontiguousarray(past[2 * i + j].numpy()))
        out = self.session.run(self._outputs, feeds)
        logits = torch.from_numpy(np.ascontiguousarray(out[0][:, -1], dtype=np.float32))
        return logits, [torch.from_numpy(t) for t in out[1:]]

    def kv_slots(self) -> KVSlots:
        """A KV cache for the scheduler's batch, kept in place between steps (`KVSlots`; CPU batch session)."""
        if self.session is None or self.kv_shape is None:
            raise RuntimeError(f"{self.variant} on {self.kind} decodes one request at a time (no batch session)")
        return KVSlots(self.session, self.kv_shape, self._kv_dtype, self.context_length, self.extra_inputs)

    @property
    def _kv_dtype(self) -> Any:
        """The KV cache's numpy dtype (float32 for the CPU variants; float16 where the graph says so)."""
        import numpy as np

        kv = next(spec for spec in self.session.get_inputs() if spec.name == "past_key_values.0.key")
        return np.float16 if kv.type == "tensor(float16)" else np.float32

    @property
    def _inputs(self) -> set[str]:
        return {spec.name for spec in self.session.get_inputs()}

    @property
    def _outputs(self) -> list[str]:
        """logits, then present key and value of each layer (ONNX Runtime's own order puts every key first)."""
        assert self.kv_shape is not None
        return ["logits"] + [f"present.{i}.{part}" for i in range(self.kv_shape[0]) for part in ("key", "value")]

    def _params(self, prompt_tokens: int, batch: int, sampling: Sampling) -> Any:
        import onnxruntime_genai as og

        if self.model is None:  # loaded batched_only: BatchingLMBackend decodes through kv_slots, never here
            raise RuntimeError(f"{self.variant} was loaded for batched serving only (no og.Model)")
        params = og.GeneratorParams(self.model)
        options: dict[str, Any] = {"batch_size": batch,
                                   "max_length": min(self.context_length, prompt_tokens + sampling.max_new_tokens)}
        if sampling.temperature <= 0:
            options["do_sample"] = False
        else:
            seed = sampling.seed if sampling.seed is not None else secrets.randbits(31)
            # top_k 0 leaves the cut to top_p alone, as our PyTorch sampler does (genai_config's top_k is 50).
            options.update(do_sample=True, temperature=float(sampling.temperature), top_p=float(sampling.top_p),
                           top_k=0, random_seed=int(seed) % (2**31))
        params.set_search_options(**options)
        return params

    def generate(self, prompt_ids: list[int], sampling: Sampling, should_stop: Callable[[], bool]) -> Iterator[int]:
        import numpy as np

        if sampling.max_new_tokens <= 0 or len(prompt_ids) >= self.context_length:
            return
        generator = self._generator(self._params(len(prompt_ids), 1, sampling))
        generator.append_tokens(np.asarray([prompt_ids], dtype=np.int32))
        for _ in range(sampling.max_new_tokens):
            if should_stop() or generator.is_done():
                return
            generator.generate_next_token()
            yield int(generator.get_next_tokens()[0])

    def generate_batch(self, prompts: Sequence[Sequence[int]], sampling: Sampling) -> list[list[int]]:
        """New tokens of several prompts of equal length, decoded together (one forward pass per step)."""
        import numpy as np

        batch = np.asarray([list(p) for p in prompts], dtype=np.int32)
        generator = self._generator(self._params(batch.shape[1], batch.shape[0], sampling))
        generator.append_tokens(batch)
        steps = 0
        while not generator.is_done() and steps < sampling.max_new_tokens:
            generator.generate_next_token()
            steps += 1
        return [[int(t) for t in generator.get_sequence(i)][batch.shape[1]:] for i in range(batch.shape[0])]


def batch_session(folder: Path, decoder: dict[str, Any], *, initializers: dict[str, Any] | None = None
                  ) -> tuple[Any, tuple[int, int, int]]:
    """An ONNX Runtime CPU session over the export's decoder graph (external data read from `folder`), and its KV
    cache's (layers, kv heads, head size), which the graph leaves symbolic (the session: `decoder_session`, as the
    export's validation opens it; `initializers`: a version's LoRA tensors baked into this session)."""
    from appliance.optimize.errors import EngineError
    from appliance.optimize.genai_validate import decoder_session

    expected = {"input_ids", "attention_mask", "position_ids"}
    session = decoder_session(folder, decoder, "CPUExecutionProvider", what="the genai export for batching",
                              hint="re-export it, or serve with --max-batch 1 (one request at a time)",
                              initializers=initializers)
    layers = int(decoder["num_hidden_layers"])
    unknown = sorted(spec.name for spec in session.get_inputs()
                     if spec.name not in expected and not spec.name.startswith("past_key_values."))
    if unknown or "attention_mask" not in {spec.name for spec in session.get_inputs()}:
        what = ", ".join(unknown) or "no attention_mask"
        raise EngineError(f"the genai export's decoder has inputs batching does not feed ({what})",
                          hint="serve with --max-batch 1 (one request at a time)")
    return session, (layers, int(decoder["num_key_value_heads"]), int(decoder["head_size"]))


class KVSlots:
    """The batch's KV cache, allocated once and written in place by the export's GroupQueryAttention: for each layer
    and part one buffer [slots, kv heads, width, head size] is bound (ONNX Runtime IO binding) as both the past input
    and the present output, so a decode step writes each row's new key and value at the row's own length and copies
    nothing else (the kernel shares the buffer when past and present are one pointer; onnxruntime-genai's own
    DefaultKeyValueCache with `past_present_share_buffer`). Without it GroupQueryAttention zeroes a new present and
    copies every row's past into it at every step: most of a 32-row step of the tiny model (ADR 0017).

    Row i of the scheduler's batch lives in slot i, slots 0..n-1 in use, so a step runs on the buffers' first n
    slots (a contiguous prefix: a view, no copy). `prefill(slot, ids)` writes a prompt into a slot (batch 1, its
    first-prompt path), `decode(tokens)` runs one token for slots 0..n-1 (`start`: a run of one row, to find which
    row a failed step failed for), `move(source, target)` copies a row's cached columns to fill a hole when a row
    leaves. A slot's columns past its length are never read (GroupQueryAttention reads each row's length from the
    mask), so nothing is cleared. Slots and width grow by doubling (one copy of the cache each time), the width up to
    the model's context. Per step the Python work is per layer (bindings), never per cached element."""

    START_SLOTS = 4
    START_WIDTH = 256

    def __init__(self, session: Any, kv_shape: tuple[int, int, int], dtype: Any, context_length: int,
                 extra_inputs: dict[str, Any]) -> None:
        import numpy as np

        self.session = session
        self.layers, self.heads, self.head_size = kv_shape
        self.dtype = np.dtype(dtype)
        self.context_length = context_length
        self.lengths = np.zeros(0, dtype=np.int64)
        """Tokens cached per slot."""
        self.buffers: list[Any] = []
        """key, value per layer: [slots, kv heads, width, head size], C-contiguous."""
        names = {spec.name for spec in session.get_inputs()}
        self._positions = "position_ids" in names
        self._names = [f"past_key_values.{i}.{part}" for i in range(self.layers) for part in ("key", "value")]
        self._present = [f"present.{i}.{part}" for i in range(self.layers) for part in ("key", "value")]
        self._extra = dict(extra_inputs)
        vocab = next(spec.shape[-1] for spec in session.get_outputs() if spec.name == "logits")
        if not isinstance(vocab, int):
            raise ValueError("the genai export's logits have no fixed vocabulary size; serve it with --max-batch 1")
        self.vocab = vocab
        self._logits = np.empty((0, 1, vocab), dtype=np.float32)
        """The decode steps' logits, written by ONNX Runtime in place ([slots, 1, vocab])."""
        self._decode = self._binding()
        self._prefill = self._binding()
        self._bound: tuple[int, int, int] | None = None
        """(start, rows, width) the decode binding's cache is bound to."""
        self._reserve(self.START_SLOTS, self.START_WIDTH)

    @property
    def slots(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def width(self) -> int:
        return int(self.buffers[0].shape[2]) if self.buffers else 0

    def _binding(self) -> Any:
        binding = self.session.io_binding()
        for name, array in self._extra.items():  # bound once: the arrays stay alive in self._extra
            binding.bind_cpu_input(name, array)
        return binding

    def _reserve(self, slots: int, width: int) -> None:
        """At least `slots` slots of at least `width` columns (doubling; one copy of what is cached)."""
        import numpy as np

        if width > self.context_length:
            raise ValueError(f"a row needs {width} cached tokens, beyond the model's context of "
                             f"{self.context_length}")
        if slots <= self.slots and width <= self.width:
            return
        new_slots, new_width = max(self.slots, 1), max(self.width, 1)
        while new_slots < slots:
            new_slots *= 2
        while new_width < width:
            new_width *= 2
        new_width = min(new_width, self.context_length)
        shape = (new_slots, self.heads, new_width, self.head_size)
        buffers = []
        for old in self.buffers or [None] * (2 * self.layers):
            buffer = np.empty(shape, dtype=self.dtype)
            if old is not None:
                buffer[:old.shape[0], :, :old.shape[2]] = old
            buffers.append(buffer)
        self.buffers = buffers
        self.lengths = np.concatenate([self.lengths, np.zeros(new_slots - self.slots, dtype=np.int64)])
        self._bound = None

    def _bind_cache(self, binding: Any, start: int, rows: int) -> None:
        """Bind slots start..start+rows-1 of every buffer as both past and present (the same memory)."""
        shape = [rows, self.heads, self.width, self.head_size]
        offset = start * self.heads * self.width * self.head_size * self.dtype.itemsize
        for past, present, buffer in zip(self._names, self._present, self.buffers, strict=True):
            pointer = buffer.ctypes.data + offset
            binding.bind_input(past, "cpu", 0, self.dtype, shape, pointer)
            binding.bind_output(present, "cpu", 0, self.dtype, shape, pointer)

    def _run(self, binding: Any, ids: Any, mask: Any, positions: Any, logits: Any) -> Any:
        """Run the session with ONNX Runtime writing the logits into `logits` [rows, sequence, vocab] float32; the
        last position's [rows, vocab] (a view)."""
        binding.bind_cpu_input("input_ids", ids)
        binding.bind_cpu_input("attention_mask", mask)
        if self._positions:
            binding.bind_cpu_input("position_ids", positions)
        binding.bind_output("logits", "cpu", 0, logits.dtype, list(logits.shape), logits.ctypes.data)
        self.session.run_with_iobinding(binding)
        return logits[:, -1]

    def prefill(self, slot: int, ids: Sequence[int]) -> Any:
        """Write a prompt's cache into `slot` (batch 1); the logits of its last token [1, vocab] (numpy)."""
        import numpy as np

        length = len(ids)
        self._reserve(slot + 1, length + 1)
        self._bind_cache(self._prefill, slot, 1)
        logits = self._run(self._prefill, np.asarray([ids], dtype=np.int64), np.ones((1, length), dtype=np.int64),
                           np.arange(length, dtype=np.int64)[None],
                           np.empty((1, length, self.vocab), dtype=np.float32))
        self.lengths[slot] = length
        return logits

    def decode(self, tokens: Sequence[int], start: int = 0) -> Any:
        """One token for slots start..start+len(tokens)-1, each after its own cached tokens; their logits [rows,
        vocab] (numpy). The slots' lengths grow by one only when the run succeeds."""
        import numpy as np

        rows = len(tokens)
        lengths = self.lengths[start:start + rows]
        total = int(lengths.max()) + 1
        self._reserve(start + rows, total)
        if self._bound != (start, rows, self.width):
            self._bind_cache(self._decode, start, rows)
            self._bound = (start, rows, self.width)
        if self._logits.shape[0] < start + rows:
            self._logits = np.empty((self.slots, 1, self.vocab), dtype=np.float32)
        mask = (np.arange(total, dtype=np.int64)[None] <= lengths[:, None]).astype(np.int64)
        logits = self._run(self._decode, np.asarray(tokens, dtype=np.int64)[:, None], mask, lengths[:, None].copy(),
                           self._logits[start:start + rows])
        self.lengths[start:start + rows] += 1
        return logits

    def move(self, source: int, target: int) -> None:
        """Slot `target` takes slot `source`'s cache (its cached columns only)."""
        length = int(self.lengths[source])
        for buffer in self.buffers:
            buffer[target, :, :length] = buffer[source, :, :length]
        self.lengths[target] = length

    def release(self, slot: int) -> None:
        self.lengths[slot] = 0


class BatchSampler:
    """Temperature and top-p sampling of a whole step's rows at once, in numpy (one softmax, one sort for all of
    them), each row with its own parameters and seeded generator.

    Measured on the batched genai path: `pick_token` row by row (torch softmax, sort and multinomial per row) cost
    the scheduler about as much CPU as the 32-row forward pass of the tiny model. The rule is `pick_token`'s (keep
    the most probable tokens up to and including the one that reaches top_p), the random stream is numpy's: a seed
    gives the same tokens on this backend whatever else is in the batch."""

    CANDIDATES = 64
    """Tokens sorted per top-p row before falling back to the whole vocabulary."""

    @staticmethod
    def generator(seed: int | None) -> Any:
        import numpy as np

        return np.random.default_rng(seed if seed is not None else secrets.randbits(63))

    def pick(self, logits: Any, samplings: Sequence[Sampling], generators: Sequence[Any]) -> list[int | Exception]:
        """A token per row of `logits` [rows, vocab] (a CPU torch tensor); a row that cannot be sampled (NaN or
        infinite logits) gets its exception, the others their token."""
        import numpy as np

        raw = logits.numpy()  # float32: greedy rows take its argmax (float64 would give the same), the rest float64
        picked: list[int | Exception] = [0] * len(samplings)
        finite = np.isfinite(raw).all(axis=1)
        sampled = []
        for i, sampling in enumerate(samplings):
            if not finite[i]:
                picked[i] = ValueError("the model's logits are not finite for this request; it cannot be sampled")
            elif sampling.temperature <= 0:
                picked[i] = int(np.argmax(raw[i]))
            else:
                sampled.append(i)
        if not sampled:
            return picked
        temperature = np.asarray([samplings[i].temperature for i in sampled], dtype=np.float64)[:, None]
        top_p = np.asarray([samplings[i].top_p for i in sampled], dtype=np.float64)[:, None]
        scaled = np.asarray(raw[sampled], dtype=np.float64) / temperature
        probs = np.exp(scaled - scaled.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        draws = np.asarray([generators[i].random() for i in sampled])
        tokens = np.zeros(len(sampled), dtype=np.int64)
        # Only the most probable CANDIDATES tokens are sorted (a full sort of [rows, vocab] cost more than the rest
        # of the step): a row whose candidates reach its top_p keeps no token beyond them anyway. The others (top_p 1,
        # or a flat distribution) take the whole vocabulary.
        cut = top_p[:, 0] < 1.0
        full = ~cut
        if cut.any() and probs.shape[1] > self.CANDIDATES:
            rows = np.flatnonzero(cut)
            part = np.argpartition(-probs[rows], self.CANDIDATES - 1, axis=1)[:, :self.CANDIDATES]
            top = np.take_along_axis(probs[rows], part, axis=1)
            inner = np.argsort(-top, axis=1)
            order = np.take_along_axis(part, inner, axis=1)
            ordered = np.take_along_axis(top, inner, axis=1)
            covered = np.cumsum(ordered, axis=1)[:, -1] >= top_p[rows, 0]
            done = rows[covered]
            tokens[done] = _choose(order[covered], ordered[covered], top_p[done], draws[done])
            full[rows[~covered]] = True
        elif cut.any():
            full[:] = True
        if full.any():
            rows = np.flatnonzero(full)
            order = np.argsort(-probs[rows], axis=1)
            tokens[rows] = _choose(order, np.take_along_axis(probs[rows], order, axis=1), top_p[rows], draws[rows])
        for row, i in enumerate(sampled):
            picked[i] = int(tokens[row])
        return picked


def _choose(order: Any, ordered: Any, top_p: Any, draws: Any) -> Any:
    """Each row's token: `ordered` its probabilities sorted (descending, token ids in `order`), the most probable
    kept up to and including the one that reaches top_p, one uniform draw per row picking among them."""
    import numpy as np

    ordered = ordered.copy()
    cumulative = np.cumsum(ordered, axis=1)
    ordered[(cumulative - ordered >= top_p) & (top_p < 1.0)] = 0.0  # always keeps the first token
    cumulative = np.cumsum(ordered, axis=1)
    choice = np.minimum((cumulative <= draws[:, None] * cumulative[:, -1:]).sum(axis=1), order.shape[1] - 1)
    return np.take_along_axis(order, choice[:, None], axis=1)[:, 0]

