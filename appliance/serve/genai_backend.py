"""An LM backend on onnxruntime-genai: its runtime keeps the KV cache and samples; we stream its tokens.

    backend = GenAILMBackend.load(folder, variant="genai-int4")      # og.Model over a genai export folder
    for token in backend.generate(prompt_ids, Sampling(max_new_tokens=64, temperature=0.6, top_p=0.95), stop):
        ...

The optimize stage builds and validates the export (appliance.optimize.genai_export / genai_validate) and the
serving side loads it through `appliance.optimize.genai_jobs.load_genai_backend`, which removes the decrypted
files as soon as `og.Model` has read them. One `og.Model` serves every request; each request has its own
`og.Generator` (the model's sessions are shared, each generator owns its KV cache). `generate_batch` decodes
several prompts in one generator (one forward pass per step for all of them), for callers that batch.
Sampling is og's own (temperature, top-p, seeded per request): a seed reproduces a request on this backend, but
not token for token on the PyTorch one, whose sampler is ours.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from appliance.serve.backends import Sampling


class GenAILMBackend:
    """A causal LM exported by the onnxruntime-genai builder, decoded by og.Generator."""

    def __init__(self, model: Any, *, variant: str, context_length: int, device: str = "cpu") -> None:
        self.model = model
        self.variant = variant
        self.context_length = context_length
        self.kind = "genai-cuda" if device.startswith("cuda") else "genai-cpu"

    @classmethod
    def load(cls, folder: Path, *, variant: str, device: str = "cpu") -> GenAILMBackend:
        import onnxruntime_genai as og

        config = og.Config(str(folder))
        config.clear_providers()
        if device.startswith("cuda"):
            config.append_provider("cuda")
            config.set_provider_option("cuda", "device_id", device.partition(":")[2] or "0")
        model = og.Model(config)
        context = json.loads((folder / "genai_config.json").read_text(encoding="utf-8"))["model"]["context_length"]
        return cls(model, variant=variant, context_length=int(context), device=device)

    def _params(self, prompt_tokens: int, batch: int, sampling: Sampling) -> Any:
        import onnxruntime_genai as og

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
        import onnxruntime_genai as og

        if sampling.max_new_tokens <= 0 or len(prompt_ids) >= self.context_length:
            return
        generator = og.Generator(self.model, self._params(len(prompt_ids), 1, sampling))
        generator.append_tokens(np.asarray([prompt_ids], dtype=np.int32))
        for _ in range(sampling.max_new_tokens):
            if should_stop() or generator.is_done():
                return
            generator.generate_next_token()
            yield int(generator.get_next_tokens()[0])

    def generate_batch(self, prompts: Sequence[Sequence[int]], sampling: Sampling) -> list[list[int]]:
        """New tokens of several prompts of equal length, decoded together (one forward pass per step)."""
        import numpy as np
        import onnxruntime_genai as og

        batch = np.asarray([list(p) for p in prompts], dtype=np.int32)
        generator = og.Generator(self.model, self._params(batch.shape[1], batch.shape[0], sampling))
        generator.append_tokens(batch)
        steps = 0
        while not generator.is_done() and steps < sampling.max_new_tokens:
            generator.generate_next_token()
            steps += 1
        return [[int(t) for t in generator.get_sequence(i)][batch.shape[1]:] for i in range(batch.shape[0])]
