"""Decode cost of the server's genai batch (KVSlots) against og.Generator one request at a time, on the real shape.

    nice -n 19 .venv/bin/python tests/bench/bench_genai_batch.py [--layers 4] [--tokens 8] [--export DIR]

Builds (once, into `.cache/genai-batch-bench/`) a random-weight model with DeepSeek-R1-Distill-Qwen-1.5B's layer
shape (models/build_random_r1_distill.py's config: hidden 1536, 12 heads, 2 KV heads, intermediate 8960, vocab
151,936) and `--layers` of its 28 layers, exports it with the onnxruntime-genai builder to int4 (the optimize stage's
recipe; about a minute for 4 layers), or takes `--export DIR` (any genai CPU export, e.g. the tiny model's). Then, in
this one process, greedy decode of `--tokens` tokens after a 25-token prompt, CPU and wall milliseconds per decoded
token (the prefill and the first step untimed on both sides):

- og.Generator alone (the server's one-at-a-time path, `--max-batch 1`);
- `KVSlots` (the batched path: the batch's KV cache written in place) with 1, 8 and 32 rows.

Prints each as a ratio of og.Generator's CPU per token, measured in this run (no HTTP: `bench_serve.py` measures
the server). Random weights: speed only. Never fails on time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "models"))
CACHE = REPO / ".cache" / "genai-batch-bench"


def build(layers: int) -> Path:
    """The int4 export of the real-shape model with `layers` layers (built once)."""
    import build_random_r1_distill as shape
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from appliance.optimize.genai_export import build_genai_model
    from appliance.optimize.recipe import QuantRecipe

    root = CACHE / f"layers-{layers}"
    export = root / "work" / "genai-int4"
    if (export / "genai_config.json").exists():
        return export
    config = {**shape.R1_DISTILL_QWEN_1_5B_CONFIG, "num_hidden_layers": layers, "torch_dtype": "float32",
              "max_position_embeddings": 2048}
    config = {k: v for k, v in config.items() if k not in ("architectures", "model_type")}
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**config)).eval()
    tokenizer = AutoTokenizer.from_pretrained(shape.TINY_TOKENIZER, local_files_only=True)
    checkpoint = root / "checkpoint"
    model.save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    started = time.monotonic()
    built = build_genai_model(model, tokenizer, root / "work", variant="genai-int4", recipe=QuantRecipe(),
                              checkpoint=checkpoint)
    print(f"exported {layers} layers of the 1.5B shape to int4 in {time.monotonic() - started:.0f} s", flush=True)
    return built.path


def main() -> None:
    import numpy as np
    import onnxruntime_genai as og

    from appliance.serve.genai_backend import GenAILMBackend

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--export", type=Path, help="a genai CPU export folder instead of the built model")
    args = parser.parse_args()
    folder = args.export or build(args.layers)
    backend = GenAILMBackend.load(folder, variant="genai-int4")
    prompt = [5] + [(7 * j) % 900 + 10 for j in range(24)]
    steps = args.tokens

    params = og.GeneratorParams(backend.model)
    params.set_search_options(do_sample=False, max_length=len(prompt) + steps + 2, batch_size=1)
    generator = og.Generator(backend.model, params)
    generator.append_tokens(np.asarray([prompt], dtype=np.int32))  # its prefill, not timed
    generator.generate_next_token()  # nor the first step (a first run of a shape allocates)
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(steps):
        generator.generate_next_token()
    og_cpu = (time.process_time() - cpu) * 1000 / steps
    og_wall = (time.perf_counter() - wall) * 1000 / steps
    decoder = json.loads((folder / "genai_config.json").read_text(encoding="utf-8"))["model"]["decoder"]
    print(f"{folder}: {decoder['num_hidden_layers']} layers, hidden {decoder['hidden_size']}; greedy, {steps} tokens "
          f"after a {len(prompt)}-token prompt (prefill and first step not timed)")
    print(f"og.Generator alone        {og_cpu:8.2f} ms CPU/token  {og_wall:8.2f} ms wall/token")
    for rows in (1, 8, 32):
        slots = backend.kv_slots()
        tokens = [int(slots.prefill(i, [prompt[0], 10 + i, *prompt[2:]])[0].argmax()) for i in range(rows)]
        tokens = [int(t) for t in slots.decode(tokens).argmax(1)]  # not timed, as og's first step
        cpu, wall = time.process_time(), time.perf_counter()
        for _ in range(steps):
            tokens = [int(t) for t in slots.decode(tokens).argmax(1)]
        kv_cpu = (time.process_time() - cpu) * 1000 / (steps * rows)
        kv_wall = (time.perf_counter() - wall) * 1000 / (steps * rows)
        print(f"KVSlots batch of {rows:<2}       {kv_cpu:8.2f} ms CPU/token  {kv_wall:8.2f} ms wall/token  "
              f"CPU per token vs og.Generator: {og_cpu / kv_cpu:.2f}x", flush=True)


if __name__ == "__main__":
    main()
