"""A random-weight model with DeepSeek-R1-Distill-Qwen-1.5B's exact shape, for memory, speed and export work.

    .venv/bin/python models/build_random_r1_distill.py OUT_DIR            # ~3.6 GB, bf16, 2 shards
    .venv/bin/python models/build_random_r1_distill.py OUT_DIR --seed 7

The config is the published config.json of deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B (hidden 1536,
28 layers, 12 heads, 2 KV heads, intermediate 8960, vocab 151,936, untied embeddings, bf16); the
weights are seeded normal(0, 0.02) (norms 1, biases 0), written in bf16 as sharded safetensors
with an index, as the hub ships larger models. Deterministic: the same seed gives the same bytes
(one CPU generator walks the tensors in a fixed order). Never committed: too large, and random.

The tokenizer is the tiny models' (the same DeepSeek special tokens; its ~1,000 ids use the first
rows of the 151,936-row embedding); the chat template is the official R1-Distill one
(models/templates/deepseek-r1-distill.jinja). Good for memory, speed, export and parity work;
its text is noise.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

MODELS = Path(__file__).resolve().parent
TINY_TOKENIZER = MODELS / "tiny-deepseek-r1"
OFFICIAL_TEMPLATE = MODELS / "templates" / "deepseek-r1-distill.jinja"
MAX_SHARD_BYTES = 2 * 1000 ** 3  # save_pretrained's "2GB"

R1_DISTILL_QWEN_1_5B_CONFIG: dict[str, Any] = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 1536, "initializer_range": 0.02,
    "intermediate_size": 8960, "max_position_embeddings": 131072, "max_window_layers": 21, "model_type": "qwen2",
    "num_attention_heads": 12, "num_hidden_layers": 28, "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
    "rope_theta": 10000, "sliding_window": 4096, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "use_cache": True, "use_mrope": False, "use_sliding_window": False, "vocab_size": 151936,
}


def _tensor_specs(config: dict[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every weight in transformers' own order, from a model built on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(Qwen2Config(**config))
    return [(name, tuple(t.shape)) for name, t in model.state_dict().items()]


def _shards(specs: list[tuple[str, tuple[int, ...]]], max_shard_bytes: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in specs:
        nbytes = 2 * _numel(shape)
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    return shards


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def build(out: Path, *, seed: int = 0, config: dict[str, Any] | None = None,
          max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Write the model directory `out` (config, generation config, tokenizer, template, shards, index)."""
    import torch
    from safetensors.torch import save_file

    config = dict(config or R1_DISTILL_QWEN_1_5B_CONFIG)
    out.mkdir(parents=True, exist_ok=True)
    specs = _tensor_specs(config)
    shards = _shards(specs, max_shard_bytes)
    generator = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    for index, shard in enumerate(shards, start=1):
        filename = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, shape in shard:
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(shape, dtype=torch.bfloat16)
            elif name.endswith(".bias"):
                tensors[name] = torch.zeros(shape, dtype=torch.bfloat16)
            else:
                std = config.get("initializer_range", 0.02)
                tensors[name] = (torch.randn(shape, generator=generator) * std).to(torch.bfloat16)
            weight_map[name] = filename
            total += tensors[name].numel() * 2
        save_file(tensors, str(out / filename), metadata={"format": "pt"})
        del tensors
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"], "do_sample": True,
         "temperature": 0.6, "top_p": 0.95}, indent=2) + "\n")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(TINY_TOKENIZER / name, out / name)
    shutil.copyfile(OFFICIAL_TEMPLATE, out / "chat_template.jinja")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    build(args.out, seed=args.seed)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
