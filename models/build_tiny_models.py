"""Regenerate the tiny demo models from the corpus that ships in the repo, deterministically.

    .venv/bin/python models/build_tiny_models.py            # rewrites models/tiny-*
    .venv/bin/python models/build_tiny_models.py --out DIR  # writes them under DIR instead

- `tiny-deepseek-r1/`: a real `Qwen2ForCausalLM` (DeepSeek-R1-Distill-Qwen architecture,
  ~3 M parameters) with a byte-level BPE tokenizer trained here, the DeepSeek-R1 special tokens
  and chat template, briefly pretrained on `corpus/corpus.jsonl` so that generation reads like
  the corpus. Weights in safetensors.
- `tiny-deepseek-coder/`: config + tokenizer of a `LlamaForCausalLM` (deepseek-coder/-llm
  architecture); no weights, tests build it with `from_config`.
- `tiny-deepseek-v3/`: config + tokenizer of a `DeepseekV3ForCausalLM` (MLA + MoE); no weights.
- `tiny-resnet-cls/`: config of a 20 k-parameter one-channel `ResNetForImageClassification`; no
  weights (random-initialised, seeded, for the classifier tests and demo).

Bit-for-bit determinism: a fixed thread count, seeded RNGs, MKL in conditional-numerical-reproducibility
mode and ATen's AVX2 kernels (the baseline of every x86_64 server we target), so that
`tests/test_tiny_models.py` can compare a fresh build with the committed files by hash.
"""

from __future__ import annotations

import os

# Must be set before torch is imported: they pick the numerical kernels.
os.environ.setdefault("ATEN_CPU_CAPABILITY", "avx2")
os.environ.setdefault("MKL_CBWR", "COMPATIBLE")
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import argparse
import json
import shutil
from pathlib import Path

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus" / "corpus.jsonl"
SEED = 1234
VOCAB_SIZE = 4096
PRETRAIN_STEPS = 150
THREADS = 2  # results depend on the thread count: the committed weights were built with 2 (see --threads)
SEQ_LEN = 128
BATCH = 8

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
SPECIAL_TOKENS = [BOS, EOS, PAD, USER, ASSISTANT, "<think>", "</think>"]

# The DeepSeek-R1 chat template, reduced to what the tiny model needs (no tool calls): system
# prompt first, the reasoning block of earlier assistant turns dropped, generation opens <think>.
CHAT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% set ns = namespace(system_prompt='') %}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}"
    "{% set ns.system_prompt = message['content'] %}{%- endif %}{%- endfor %}"
    "{{ bos_token }}{{ ns.system_prompt }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}{%- endif %}"
    "{%- if message['role'] == 'assistant' %}{% set content = message['content'] %}"
    "{% if '</think>' in content and not loop.last %}"
    "{% set content = content.split('</think>')[-1].lstrip() %}{% endif %}"
    "{{ '<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>' }}{%- endif %}"
    "{%- endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜><think>\\n' }}{% endif %}"
)


# deepseek-coder-instruct's template (its long default system prompt shortened): `### Instruction:` /
# `### Response:` turns, each reply closed by <|EOT|>, which is that family's end-of-turn token.
CODER_EOT = "<|EOT|>"
CODER_CHAT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{%- set ns = namespace(found=false) -%}"
    "{%- for message in messages -%}{%- if message['role'] == 'system' -%}{%- set ns.found = true -%}"
    "{%- endif -%}{%- endfor -%}"
    "{{ bos_token }}{%- if not ns.found -%}{{ 'You are an AI programming assistant.\\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}{{ message['content'] }}"
    "{%- else %}{%- if message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] + '\\n' }}"
    "{%- else %}{{ '### Response:\\n' + message['content'] + '\\n<|EOT|>\\n' }}{%- endif %}{%- endif %}"
    "{%- endfor %}{% if add_generation_prompt %}{{ '### Response:' }}{% endif %}"
)


def load_corpus() -> list[dict]:
    return [json.loads(line) for line in CORPUS.read_text(encoding="utf-8").splitlines() if line]


def train_tokenizer(records: list[dict]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts = []
    for record in records:
        if "text" in record:
            texts.append(record["text"])
        else:
            texts.extend(message["content"] for message in record["messages"])
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[USER, ASSISTANT, "<think>", "</think>"],
        chat_template=CHAT_TEMPLATE,
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )


def training_texts(records: list[dict], tokenizer) -> list[str]:
    texts = []
    for record in records:
        if "text" in record:
            texts.append(BOS + record["text"] + EOS)
        else:
            texts.append(tokenizer.apply_chat_template(record["messages"], tokenize=False))
    return texts


def coder_tokenizer(tokenizer):
    """The same BPE with deepseek-coder's end-of-turn token and chat template."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(tokenizer.backend_tokenizer.to_str()),
        bos_token=BOS,
        eos_token=CODER_EOT,
        pad_token=PAD,
        chat_template=CODER_CHAT_TEMPLATE,
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )


def qwen2_config(tokenizer):
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=192,
        intermediate_size=512,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        architectures=["Qwen2ForCausalLM"],
    )


def pretrain(model, tokenizer, texts: list[str]) -> list[float]:
    """A short causal-LM pretraining on the corpus, packed into fixed-length rows."""
    import torch

    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
    rows = torch.tensor(ids[: len(ids) // SEQ_LEN * SEQ_LEN]).view(-1, SEQ_LEN)
    generator = torch.Generator().manual_seed(SEED)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=PRETRAIN_STEPS,
                                                   pct_start=0.1)
    model.train()
    losses = []
    for _ in range(PRETRAIN_STEPS):
        batch = rows[torch.randint(len(rows), (BATCH,), generator=generator)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(round(loss.item(), 4))
    model.eval()
    return losses


def write_config_only(out: Path, name: str, config, tokenizer) -> None:
    target = out / name
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    config.save_pretrained(target)
    if tokenizer is not None:
        tokenizer.save_pretrained(target)


def build(out: Path, threads: int = THREADS) -> dict:
    import torch
    from transformers import DeepseekV3Config, LlamaConfig, Qwen2ForCausalLM, ResNetConfig

    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(SEED)

    records = load_corpus()
    tokenizer = train_tokenizer(records)
    model = Qwen2ForCausalLM(qwen2_config(tokenizer))
    losses = pretrain(model, tokenizer, training_texts(records, tokenizer))

    target = out / "tiny-deepseek-r1"
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    model.generation_config.do_sample = False
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)

    common = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                  max_position_embeddings=2048)
    coder = coder_tokenizer(tokenizer)
    write_config_only(out, "tiny-deepseek-coder", LlamaConfig(
        hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, architectures=["LlamaForCausalLM"],
        **{**common, "vocab_size": len(coder), "eos_token_id": coder.eos_token_id}), coder)
    write_config_only(out, "tiny-deepseek-v3", DeepseekV3Config(
        hidden_size=128, intermediate_size=256, moe_intermediate_size=64, num_hidden_layers=2,
        first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4,
        n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, n_group=1, topk_group=1,
        q_lora_rank=64, kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16,
        v_head_dim=32, architectures=["DeepseekV3ForCausalLM"], **common), tokenizer)
    write_config_only(out, "tiny-resnet-cls", ResNetConfig(
        num_channels=1, embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic",
        num_labels=2, id2label={0: "normal", 1: "abnormal"}, label2id={"normal": 0, "abnormal": 1},
        architectures=["ResNetForImageClassification"]), None)
    return {"parameters": sum(p.numel() for p in model.parameters()),
            "first_loss": losses[0], "last_loss": losses[-1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE, help="directory to write the models into")
    parser.add_argument("--threads", type=int, default=THREADS,
                        help=f"CPU threads of the pretraining (default {THREADS}, what the committed weights were "
                             "built with; another count rounds differently, within the tolerance of "
                             "tests/test_tiny_models.py)")
    args = parser.parse_args()
    summary = build(args.out, args.threads)
    print(json.dumps(summary, sort_keys=True))


if __name__ == "__main__":
    main()
