"""The random-weight R1-Distill-1.5B-shape generator: exact published config, deterministic, loadable.

The full 3.6 GB build is for benches and the GPU check (tests/gpu/device_check.sh); here the same
code builds a narrow model of the same architecture, in several shards."""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

from tests.conftest import REPO

spec = importlib.util.spec_from_file_location("build_random_r1_distill", REPO / "models" / "build_random_r1_distill.py")
builder = importlib.util.module_from_spec(spec)
spec.loader.exec_module(builder)

NARROW = {**builder.R1_DISTILL_QWEN_1_5B_CONFIG, "hidden_size": 64, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 96, "vocab_size": 1024}


def test_the_config_is_the_published_one_the_planner_models():
    from appliance.train.memory_plan import R1_DISTILL_QWEN_1_5B, ModelShape

    assert ModelShape.from_config(builder.R1_DISTILL_QWEN_1_5B_CONFIG) == R1_DISTILL_QWEN_1_5B
    specs = builder._tensor_specs(builder.R1_DISTILL_QWEN_1_5B_CONFIG)  # meta device: no memory
    assert sum(builder._numel(shape) for _, shape in specs) == R1_DISTILL_QWEN_1_5B.params == 1_777_088_000
    assert len(builder._shards(specs, builder.MAX_SHARD_BYTES)) == 2  # 3.55 GB of bf16 in 2 GB shards


def test_same_seed_same_bytes_and_it_loads_and_chats(tmp_path: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    a = builder.build(tmp_path / "a", seed=3, config=NARROW, max_shard_bytes=100_000)
    b = builder.build(tmp_path / "b", seed=3, config=NARROW, max_shard_bytes=100_000)
    shards = sorted(p.name for p in a.glob("*.safetensors"))
    assert len(shards) >= 2 and shards == sorted(p.name for p in b.glob("*.safetensors"))
    for name in [*shards, "model.safetensors.index.json", "config.json"]:
        assert hashlib.sha256((a / name).read_bytes()).digest() == hashlib.sha256((b / name).read_bytes()).digest()

    model = AutoModelForCausalLM.from_pretrained(a, local_files_only=True, dtype=torch.bfloat16)
    assert model.config.vocab_size == 1024 and model.dtype == torch.bfloat16
    tokenizer = AutoTokenizer.from_pretrained(a, local_files_only=True)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"},
                                         {"role": "assistant", "content": "<think>\nx\n</think>\n\ny"}], tokenize=False)
    assert "<think>" not in text  # the official template, which strips the reasoning
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], 1024) and torch.isfinite(logits.float()).all()
