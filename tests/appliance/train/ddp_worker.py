"""Run under torchrun by test_ddp.py: train on the corpus with gloo and FSDP, and write rank 0's result.

    torchrun --nproc_per_node 2 tests/appliance/train/ddp_worker.py OUT.json CHECKPOINT_DIR

The run uses strategy = "fsdp", stops after step 3 (checkpointing into files under
CHECKPOINT_DIR, rank 0 writing, every rank reading) and resumes to the end in a second `train_lora`:
the losses written are the resumed run's whole curve.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
# 8 chats packed into rows of 192 tokens: 4 rows unshuffled (2 steps of 2 ranks per epoch), but epoch 2's
# shuffle packs into 3 rows, so 6 steps cross a short epoch (tests/appliance/train/test_ddp.py).
RECIPE_FIELDS = dict(max_steps=6, eval_every=6, batch_size=1, max_length=192, lr=3e-3, dropout=0.0, seed=5)


def corpus_chats() -> tuple[list[dict], list[dict]]:
    lines = (REPO / "models" / "corpus" / "corpus.jsonl").read_text(encoding="utf-8").splitlines()
    chats = [r for r in map(json.loads, lines) if "messages" in r]
    return chats[:8], chats[32:40]


def adapter_checksum(adapter_state: dict) -> float:
    return sum(float(v.double().sum()) for v in adapter_state.values())


class FileCheckpoints:
    """The CheckpointStore protocol on plain files (the jobs use the vault's VaultCheckpoints)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def write_bytes(self, name: str, data: bytes) -> None:
        temp = self.folder / f".{name}.tmp"
        temp.write_bytes(data)
        temp.replace(self.folder / name)

    def read_bytes(self, name: str) -> bytes | None:
        path = self.folder / name
        return path.read_bytes() if path.exists() else None


def main() -> None:
    import torch
    import torch.distributed as dist

    from appliance.base_models import resolve_base_model
    from appliance.train.lm import train_lora
    from appliance.train.recipe import LoraRecipe

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    train, val = corpus_chats()
    base = resolve_base_model("tiny-deepseek-r1")
    recipe = LoraRecipe(**RECIPE_FIELDS, strategy="fsdp")
    store = FileCheckpoints(Path(sys.argv[2]))
    steps: list[int] = []
    first = train_lora(base, train, val, recipe, checkpoints=store, on_progress=lambda p: steps.append(p.step),
                       should_stop=lambda: bool(steps) and steps[-1] >= 3)
    assert first.steps == 3 and store.read_bytes("checkpoint.pt") is not None, first.steps
    dist.barrier()  # rank 0 has written the checkpoint that every rank resumes from
    result = train_lora(base, train, val, recipe, checkpoints=store)
    checksums = [None] * dist.get_world_size()
    dist.all_gather_object(checksums, adapter_checksum(result.adapter_state))
    micro_batches = [None] * dist.get_world_size()
    dist.all_gather_object(micro_batches, result.micro_batches)
    if dist.get_rank() == 0:
        Path(sys.argv[1]).write_text(json.dumps({"losses": result.train_losses, "checksums": checksums,
                                                 "micro_batches": micro_batches}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
