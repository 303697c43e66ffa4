"""The checks tests/gpu/device_check.sh runs on a lent GPU; each writes one JSON file to OUT.

    python tests/gpu/device_check.py lora OUT_DIR MODEL_DIR   # bf16 LoRA steps on the 1.5B shape
    python tests/gpu/device_check.py resume OUT_DIR           # CUDA resume exactness (tiny model, dropout on)
    torchrun --nproc-per-node 1 tests/gpu/device_check.py nccl OUT_DIR   # one NCCL rank through train_lora
    python tests/gpu/device_check.py classifier OUT_DIR       # the image classifier trains on CUDA

Nothing here downloads anything; the model is the random-weight 1.5B-shape one built by
models/build_random_r1_distill.py. Numbers are measured, never asserted against a hope: the JSON
holds them and a `pass` flag for the few things that must hold.
"""

from __future__ import annotations

import io
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def corpus_chats() -> list[dict]:
    lines = (REPO / "models" / "corpus" / "corpus.jsonl").read_text(encoding="utf-8").splitlines()
    return [r for r in map(json.loads, lines) if "messages" in r]


class MemoryStore:
    """A CheckpointStore in memory (the job uses the vault; the protocol is two methods)."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}

    def write_bytes(self, name: str, data: bytes) -> None:
        self.files[name] = data

    def read_bytes(self, name: str) -> bytes | None:
        return self.files.get(name)


def check_lora(out: Path, model_dir: Path) -> dict:
    import torch

    from appliance.base_models import resolve_base_model
    from appliance.train.lm import train_lora
    from appliance.train.memory_plan import plan_for
    from appliance.train.recipe import LoraRecipe

    base = resolve_base_model(str(model_dir))
    chats = corpus_chats()
    # Long rows: the corpus chats packed 4096 tokens a row; 6 steps, the first one warms up kernels.
    recipe = LoraRecipe(max_steps=6, eval_every=1000, batch_size=1, max_length=4096, gradient_checkpointing=True,
                        lr=1e-4, seed=0)
    plan = plan_for(base, recipe, device="cuda:0")
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    result = train_lora(base, chats * 20, chats[:4], recipe)
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated()
    params = 1_777_088_000
    tokens_per_s = result.real_tokens / seconds
    # MFU: 6 x params FLOPs per token (forward + backward), +1/3 for recomputation with checkpointing.
    flops = 8 * params * tokens_per_s
    report = {"check": "lora_bf16_1.5b_shape", "steps": result.steps, "seconds": seconds,
              "real_tokens": result.real_tokens, "tokens_per_s": tokens_per_s,
              "mfu_vs_989_tflops_bf16": flops / 989e12, "peak_allocated": peak,
              "planned_total": plan.total if plan else None,
              "planned_over_measured": (plan.total / peak) if plan and peak else None,
              "losses": result.train_losses,
              "pass": result.steps == 6 and all(loss == loss for loss in result.train_losses)}
    (out / "lora.json").write_text(json.dumps(report, indent=2))
    return report


def check_resume(out: Path) -> dict:
    import torch

    from appliance.base_models import resolve_base_model
    from appliance.train.lm import train_lora
    from appliance.train.recipe import LoraRecipe

    assert torch.cuda.is_available()
    chats = corpus_chats()
    train, val = chats[:48], chats[64:72]
    recipe = LoraRecipe(max_steps=8, eval_every=4, batch_size=2, max_length=128, lr=3e-3, dropout=0.1, seed=3)
    base = resolve_base_model("tiny-deepseek-r1")
    straight = train_lora(base, train, val, recipe)
    store, steps = MemoryStore(), []
    first = train_lora(base, train, val, recipe, checkpoints=store, should_stop=lambda: len(steps) >= 5,
                       on_progress=lambda p: steps.append(p.step))
    resumed = train_lora(base, train, val, recipe, checkpoints=store)
    diffs = [abs(a - b) for a, b in zip(resumed.train_losses, straight.train_losses, strict=True)]
    blob = torch.load(io.BytesIO(store.files["checkpoint.pt"]), weights_only=True)
    report = {"check": "cuda_resume", "stopped_at": first.steps, "steps": resumed.steps,
              "max_loss_diff": max(diffs), "checkpoint_has_cuda_rng": "cuda_rng" in blob,
              "straight": straight.train_losses, "resumed": resumed.train_losses,
              "pass": first.steps == 5 and resumed.steps == 8 and max(diffs) < 1e-4 and "cuda_rng" in blob}
    (out / "resume.json").write_text(json.dumps(report, indent=2))
    return report


def check_classifier(out: Path) -> dict:
    import torch

    from appliance.base_models import resolve_base_model
    from appliance.train.classifier import ClassifierRecipe, train_classifier
    from tests.appliance.train.test_classifier import LABELS, phantoms

    train, val, test = phantoms(96, seed=1), phantoms(32, seed=2), phantoms(32, seed=3)
    recipe = ClassifierRecipe(max_steps=60, batch_size=16, eval_every=20, lr=3e-3, seed=0)
    torch.cuda.reset_peak_memory_stats()
    result = train_classifier(resolve_base_model("tiny-resnet-cls"), train, val, recipe, labels=LABELS, test=test)
    report = {"check": "classifier_cuda", "steps": result.steps, "best_val_auc": result.best_val_auc,
              "test_accuracy": result.test.accuracy if result.test else None,
              "cuda_peak_allocated": torch.cuda.max_memory_allocated(),
              "pass": result.steps == 60 and torch.cuda.max_memory_allocated() > 0
              and (result.best_val_auc or 0) > 0.9}
    (out / "classifier.json").write_text(json.dumps(report, indent=2))
    return report


def check_nccl(out: Path) -> dict:
    import torch
    import torch.distributed as dist

    from appliance.base_models import resolve_base_model
    from appliance.train.lm import train_lora
    from appliance.train.recipe import LoraRecipe

    torch.cuda.set_device(0)
    dist.init_process_group("nccl")
    chats = corpus_chats()
    recipe = LoraRecipe(max_steps=4, eval_every=4, batch_size=1, max_length=192, lr=3e-3, dropout=0.0, seed=5,
                        grad_accumulation=2)
    result = train_lora(resolve_base_model("tiny-deepseek-r1"), chats[:8], chats[32:40], recipe)
    report = {"check": "torchrun_nccl_nproc1", "backend": dist.get_backend(), "steps": result.steps,
              "losses": result.train_losses, "micro_batches": result.micro_batches,
              "pass": result.steps == 4 and dist.get_backend() == "nccl"}
    dist.destroy_process_group()
    (out / "nccl.json").write_text(json.dumps(report, indent=2))
    return report


def check_packed(out: Path) -> dict:
    """Packed attention (train/packed_attention.py) on the GPU: a packed row's loss equals the per-example
    losses under transformers' SDPA (fp32, so the comparison is tight); runs on CPU too where no GPU is."""
    import torch

    from appliance.base_models import resolve_base_model
    from appliance.train.lm import build_lora_model
    from appliance.train.packed_attention import use_packed_attention
    from appliance.train.recipe import LoraRecipe
    from appliance.train.sft_data import encode_record, packed_batches

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = build_lora_model(resolve_base_model("tiny-deepseek-r1"),
                                        LoraRecipe(dropout=0.0, max_length=256, precision="fp32"))
    model.to(device).eval()
    examples = [encode_record(tokenizer, chat, 256) for chat in corpus_chats()[:6]]
    (batch,) = list(packed_batches(examples, token_budget=4096))
    counts = [e.label_tokens for e in examples]
    with torch.no_grad():
        alone = sum(model(input_ids=torch.tensor([e.input_ids], device=device),
                          labels=torch.tensor([e.labels], device=device)).loss.item() * n
                    for e, n in zip(examples, counts, strict=True)) / sum(counts)
        model.get_base_model().set_attn_implementation(use_packed_attention())
        packed = model(**{k: v.to(device) for k, v in batch.tensors().items()}).loss.item()
    report = {"check": "packed_attention", "device": device, "examples": len(examples), "packed_loss": packed,
              "per_example_loss": alone, "difference": abs(packed - alone), "pass": abs(packed - alone) < 1e-4}
    (out / "packed.json").write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    kind, out_dir = sys.argv[1], Path(sys.argv[2])
    out_dir.mkdir(parents=True, exist_ok=True)
    checks = {"lora": lambda: check_lora(out_dir, Path(sys.argv[3])), "resume": lambda: check_resume(out_dir),
              "nccl": lambda: check_nccl(out_dir), "classifier": lambda: check_classifier(out_dir),
              "packed": lambda: check_packed(out_dir)}
    print(json.dumps(checks[kind]()))
