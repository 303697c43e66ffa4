"""torchrun with 2 CPU processes (gloo) and FSDP: ranks agree, stop and resume, and match one process accumulating
both halves.

Plain DDP's two ranks against one process are checked through the job system, where the product launches them
(test_train_ddp_job.py: losses, validation, test loss, adapters and gradient norms); a copy of that comparison
here, one level lower with the same launcher, was removed as a duplicate. The FSDP run below also checks that
every rank makes the same number of forward/backward passes in every epoch, the short epoch included.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.appliance.train.ddp_worker import RECIPE_FIELDS, adapter_checksum, corpus_chats
from tests.conftest import REPO, needs_loopback


def _two_ranks(tmp_path: Path, checkpoints: Path) -> dict:
    out = tmp_path / "ranks.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
                          str(REPO / "tests" / "appliance" / "train" / "ddp_worker.py"), str(out), str(checkpoints)],
                         capture_output=True, text=True, timeout=600, env=env, cwd=REPO, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow  # two ranks trained twice (stop, resume) and one reference run: ~30 s of CPU, minutes when shared
@needs_loopback
def test_fsdp_two_ranks_stopped_and_resumed_match_one_process(tmp_path: Path):
    """FSDP2 (fully_shard, gloo): the same run with every parameter sharded over the two ranks, stopped
    after step 3 and resumed from its checkpoint (gathered, written by rank 0, scattered back)."""
    from appliance.base_models import resolve_base_model
    from appliance.train.lm import train_lora
    from appliance.train.recipe import LoraRecipe

    checkpoints = tmp_path / "fsdp-checkpoints"
    checkpoints.mkdir()
    fsdp = _two_ranks(tmp_path, checkpoints)
    assert fsdp["checksums"][0] == pytest.approx(fsdp["checksums"][1], rel=1e-6)
    assert fsdp["micro_batches"] == [{"1": 1, "2": 2}] * 2  # the resumed half: step 4 ends epoch 1, 5-6 are epoch 2
    train, val = corpus_chats()
    single = train_lora(resolve_base_model("tiny-deepseek-r1"), train, val,
                        LoraRecipe(**RECIPE_FIELDS, grad_accumulation=2))
    assert fsdp["losses"] == pytest.approx(single.train_losses, rel=1e-4, abs=1e-5)
    assert fsdp["checksums"][0] == pytest.approx(adapter_checksum(single.adapter_state), rel=1e-4)


def test_every_epoch_has_the_same_number_of_micro_batches():
    """Epoch 2's shuffle of the worker's data packs into 3 rows, not 4: it repeats its first row."""
    from transformers import AutoTokenizer

    from appliance.base_models import resolve_base_model
    from appliance.train.lm import encode_records, epoch_batches, make_batches
    from appliance.train.recipe import LoraRecipe

    tokenizer = AutoTokenizer.from_pretrained(resolve_base_model("tiny-deepseek-r1").path, local_files_only=True)
    recipe = LoraRecipe(**RECIPE_FIELDS)
    examples = encode_records(tokenizer, corpus_chats()[0], recipe.max_length, "train")
    assert len(make_batches(examples, recipe, tokenizer.pad_token_id, order_seed=None)) == 4
    shuffled = make_batches(examples, recipe, tokenizer.pad_token_id, order_seed=recipe.seed * 1000 + 2)
    assert len(shuffled) == 3
    epochs = [epoch_batches(examples, recipe, tokenizer.pad_token_id, epoch, 4) for epoch in range(4)]
    assert [len(batches) for batches in epochs] == [4, 4, 4, 4]
    assert epochs[2] == [*shuffled, shuffled[0]]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
