"""Training throughput: `train_lora` (padding-free packing) vs a Hugging Face Trainer + PEFT baseline.

    .venv/bin/python tests/bench/bench_train.py [--steps 20]

Same tiny model, same LoRA settings, same records, same machine, one run. The records have a
long-tailed length distribution (1 to 12 corpus snippets joined), like real reports. Prints real
(non-pad) tokens per second for both and their ratio (goal >= 1.5x), and the ratio of their
peak RSS, each side measured in its own process (goal <= 1.0x). Never fails on time.

Two ratios: per wall-clock second (what an operator waits) and per CPU second of this process
(user + system, from getrusage). On a machine shared with other jobs the wall-clock ratio moves with
their load between the two halves of the run; the CPU-time ratio does not, so both are printed.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def records(n: int = 256) -> list[dict]:
    lines = (REPO / "models" / "corpus" / "corpus.jsonl").read_text(encoding="utf-8").splitlines()
    texts = [json.loads(line)["text"] for line in lines if '"text"' in line]
    rng = random.Random(7)
    return [{"text": " ".join(rng.sample(texts, min(len(texts), int(rng.paretovariate(1.2)) % 12 + 1)))}
            for _ in range(n)]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def bench_ours(data: list[dict], steps: int) -> tuple[float, float, int]:
    from appliance.base_models import resolve_base_model
    from appliance.train.lm import train_lora
    from appliance.train.recipe import LoraRecipe

    recipe = LoraRecipe(max_steps=steps, batch_size=8, max_length=512, eval_every=10_000, warmup_ratio=0.0)
    started, cpu = time.perf_counter(), cpu_s()
    result = train_lora(resolve_base_model("tiny-deepseek-r1"), data, [], recipe)
    return time.perf_counter() - started, cpu_s() - cpu, result.real_tokens


def bench_hf_trainer(data: list[dict], steps: int) -> tuple[float, float, int]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    path = REPO / "models" / "tiny-deepseek-r1"
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, task_type="CAUSAL_LM",
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                             "up_proj", "down_proj"]))
    encoded = [tokenizer(tokenizer.bos_token + r["text"] + tokenizer.eos_token, add_special_tokens=False,
                         truncation=True, max_length=512)["input_ids"] for r in data]
    real_tokens = [0]

    def collate(batch):
        width = max(len(ids) for ids in batch)
        real_tokens[0] += sum(len(ids) for ids in batch)
        ids = torch.tensor([x + [tokenizer.pad_token_id] * (width - len(x)) for x in batch])
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in batch])
        labels = ids.masked_fill(mask == 0, -100)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    args = TrainingArguments(output_dir=str(Path("/dev/shm") / "airlock-bench-trainer"), max_steps=steps,
                             per_device_train_batch_size=8, learning_rate=2e-4, logging_strategy="no",
                             save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0,
                             disable_tqdm=True, remove_unused_columns=False)
    trainer = Trainer(model=model, args=args, train_dataset=encoded, data_collator=collate)
    started, cpu = time.perf_counter(), cpu_s()
    trainer.train()
    return time.perf_counter() - started, cpu_s() - cpu, real_tokens[0]


def run_side(side: str, steps: int) -> dict:
    """One side in a fresh process (this script with --side): its own peak RSS, no leftovers of the other."""
    import subprocess

    out = subprocess.run([sys.executable, __file__, "--side", side, "--steps", str(steps)], capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(side: str, steps: int) -> None:
    import peft  # noqa: F401
    import torch  # noqa: F401  (imported before the baseline RSS, as on both sides)
    import transformers  # noqa: F401

    import appliance  # noqa: F401  (offline environment)

    data = records()
    base_rss = peak_rss_mib()
    wall, cpu, tokens = (bench_hf_trainer if side == "hf" else bench_ours)(data, steps)
    print(json.dumps({"wall": wall, "cpu": cpu, "tokens": tokens, "base_rss": base_rss, "peak_rss": peak_rss_mib()}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--side", choices=["hf", "ours"])
    args = parser.parse_args()
    if args.side:
        measure(args.side, args.steps)
        return
    hf, ours = run_side("hf", args.steps), run_side("ours", args.steps)
    hf_rate, our_rate = hf["tokens"] / hf["wall"], ours["tokens"] / ours["wall"]
    hf_cpu_rate, our_cpu_rate = hf["tokens"] / hf["cpu"], ours["tokens"] / ours["cpu"]
    for name, r, rate, cpu_rate in (("HF Trainer + PEFT (padding)", hf, hf_rate, hf_cpu_rate),
                                    ("airlock train_lora (packed)", ours, our_rate, our_cpu_rate)):
        print(f"{name}: {rate:,.0f} real tokens/s ({r['tokens']:,} tokens in {r['wall']:.1f} s, "
              f"{cpu_rate:,.0f} per CPU second); peak RSS {r['peak_rss']:.0f} MiB "
              f"({r['peak_rss'] - r['base_rss']:+.0f} over the imports)")
    print(f"ratio: {our_rate / hf_rate:.2f}x (goal >= 1.5x; per CPU second {our_cpu_rate / hf_cpu_rate:.2f}x); "
          f"peak RSS ratio {ours['peak_rss'] / hf['peak_rss']:.2f}x (goal <= 1.0x; each side in its own process)")


if __name__ == "__main__":
    main()
